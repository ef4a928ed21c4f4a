"""Request state inside the engine: one `Sequence` per request (each of n choices is its own request)."""

from __future__ import annotations

import enum
import itertools
import time
from typing import Optional

from serving.sampling import SamplingParams
from serving.stats import RequestStats


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not holding KV blocks (new, or preempted)
    RUNNING = "running"  # holding KV blocks
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """Token ids (prompt then output) and how many of them the KV cache already holds."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: Optional[float] = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in this sequence's blocks
        self.block_table: list[int] = []
        self.num_registered_blocks = 0  # of block_table, the first ones registered for prefix caching
        self.num_cached_prompt_tokens = 0  # prompt tokens taken from the prefix cache when first admitted
        self.finish_reason: Optional[str] = None
        self.num_preemptions = 0
        # With params.prompt_logprobs: one entry per prompt token scored so far (the first, unscored: None).
        self.prompt_logprobs: Optional[list] = [None] if params.prompt_logprobs is not None else None
        self.sent_penalty_prompt = False  # the sampling rank holds this sequence's token history
        self.stats = RequestStats(request_id, arrival_time if arrival_time is not None else time.monotonic(),
                                  num_prompt_tokens=self.num_prompt_tokens)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last token still needs its K/V computed (new prompt, or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
