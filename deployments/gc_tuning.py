"""Python's cyclic garbage collector in a serving process.

A request through a replica allocates thousands of short-lived objects (Serve's request wrappers,
Starlette's scope and messages, pydantic models, gRPC calls), so with Python's default thresholds
(a young-generation pass every 700 net allocations) the collector ran several times per request:
about a tenth of the router's busy CPU in a native profile under `bench.capacity` (py-spy
`--native`: `gc_collect_main`). Almost all of those objects die by reference counting; the
collector's passes find little. After a replica has started, `tune_gc`:

- freezes what start-up made (modules, the model's config, handles, the tokenizer): they move to
  a permanent generation that no pass walks again;
- raises the young generation's threshold, so a pass runs every `threshold` net allocations.

Cycles are still collected, later; the young generation holds at most `threshold` objects more.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("ray.serve")

YOUNG_THRESHOLD = 50_000  # net allocations between young-generation passes (Python's default: 700)


def tune_gc(threshold: int = YOUNG_THRESHOLD) -> None:
    """Call once, at the end of a replica's start-up."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    logger.info("gc: %d start-up objects frozen, young threshold %d", gc.get_freeze_count(), threshold)
