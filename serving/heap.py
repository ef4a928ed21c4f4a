"""Handing the C heap's free pages back to the OS, so a long-running process's memory stays flat.

glibc's malloc keeps freed memory in its arenas for reuse. A serving process frees chunks of many
sizes and lifetimes (request bodies, protobufs, tensors whose shapes follow the batch), so the
arenas fragment: the free chunks between live ones are rarely the size the next request asks for,
the arenas grow, and their free pages stay resident. Measured in a soak (`python -m bench.soak`,
6 min at 102 clients): the router's bytes in use stayed at 34-36 MiB while the free bytes in its
arenas rose from 4 to 22 MiB, and the cache replica's free bytes from 38 to 252 MiB.
`malloc_trim(0)` returns every whole free page of every arena to the OS (madvise), leaving the
chunks in place for reuse; it releases the GIL (a plain ctypes call) and takes about a millisecond
for a router's heap.

`start_heap_trimmer` runs it every few seconds in a daemon thread, once per process; `heap_trimmer`
makes a function that a hot path calls right after freeing a lot (the embedder, after each batch).
Both are no-ops where the C library has no `malloc_trim` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Callable, Optional

DEFAULT_INTERVAL_S = 5.0

_lock = threading.Lock()
_thread: Optional[threading.Thread] = None


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def heap_trimmer(interval_s: float) -> Callable[[], None]:
    """A function that trims the heap if its last trim was `interval_s` or more ago."""
    trim = _malloc_trim()
    if trim is None:
        return lambda: None
    last = [time.monotonic()]

    def maybe_trim() -> None:
        now = time.monotonic()
        if now - last[0] >= interval_s:
            last[0] = now
            trim(0)
    return maybe_trim


def start_heap_trimmer(interval_s: float = DEFAULT_INTERVAL_S) -> bool:
    """Trim this process's heap every `interval_s` in a daemon thread. Later calls in the same
    process do nothing. Returns whether a thread runs (False without `malloc_trim`)."""
    global _thread
    trim = _malloc_trim()
    if trim is None:
        return False
    with _lock:
        if _thread is None:
            def run() -> None:
                while True:
                    time.sleep(interval_s)
                    trim(0)
            _thread = threading.Thread(target=run, name="heap-trim", daemon=True)
            _thread.start()
    return True
