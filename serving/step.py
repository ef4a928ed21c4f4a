"""The step contract between the engine and whatever runs the model: the wire types and the
`Executor` protocol. Plain Python, no torch: every rank receives the same `StepInput`, rank 0
answers with a `StepOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    from serving.structured import JsonSpec


@dataclass
class StepInput:
    """Everything a rank needs for one step; built by the engine, identical on every rank.

    Plain lists, turned into tensors on each rank (`serving.model_runner.StepTensors`): they pickle
    in microseconds, where torch tensors through a Ray call cost ~40 ms here.
    """

    token_ids: list[int]  # [T] the step's new tokens, sequence after sequence
    query_lens: list[int]  # [B] new tokens per sequence (1 = decode)
    context_lens: list[int]  # [B] tokens per sequence after this step (cached + new)
    block_tables: list[list[int]]  # [B][num_blocks] each sequence's KV blocks, in order
    block_size: int
    sample_rows: list[int]  # [S] sequences whose last new token is sampled
    # Sampling, one entry per sampled sequence (same order as sample_rows).
    seq_ids: list[int] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    top_ps: list[float] = field(default_factory=list)
    top_ks: list[int] = field(default_factory=list)
    seeds: list[Optional[int]] = field(default_factory=list)
    min_ps: list[float] = field(default_factory=list)
    # Logits processing (serving/logits_processors.py), only for the sampled rows that use any:
    # proc_rows are indices into the lists above; the lists below have one entry per proc row.
    proc_rows: list[int] = field(default_factory=list)
    logit_biases: list[list[tuple[int, float]]] = field(default_factory=list)  # (token id, bias)
    banned_token_ids: list[list[int]] = field(default_factory=list)  # min_tokens: stop ids not allowed yet
    repetition_penalties: list[float] = field(default_factory=list)
    frequency_penalties: list[float] = field(default_factory=list)
    presence_penalties: list[float] = field(default_factory=list)
    # A penalised sequence's prompt on its first sampled step (rank 0 keeps the history), else None.
    penalty_prompts: list[Optional[list[int]]] = field(default_factory=list)
    # Log-probabilities: of the tokens sampled in these rows (indices into the sampled lists) ...
    logprob_rows: list[int] = field(default_factory=list)
    num_top_logprobs: list[int] = field(default_factory=list)  # per logprob row
    # ... and of prompt tokens: the logits at these packed positions are kept too (after the
    # sampled ones), each scored against its target (the prompt's next token).
    prompt_logprob_positions: list[int] = field(default_factory=list)
    prompt_logprob_targets: list[int] = field(default_factory=list)
    prompt_num_top_logprobs: list[int] = field(default_factory=list)
    # Structured output (serving/structured), only for the constrained rows: indices into the sampled
    # lists; per row, the tokens it may still generate (this one included) and its JsonSpec on the
    # step that samples its first output token, else None (rank 0 keeps the grammar state).
    structured_rows: list[int] = field(default_factory=list)
    structured_tokens_left: list[int] = field(default_factory=list)
    structured_specs: list[Optional["JsonSpec"]] = field(default_factory=list)
    # Speculative decoding (serving/spec). Verifying: per sampled row, how many proposals follow its
    # last token in token_ids (its logits are kept at all of them, and rank 0 accepts or rejects
    # them); empty when no row speculates. draft_probs: rank 0 only (never sent to other ranks),
    # empty or one per sampled row: the proposer's q [num_proposals, V], or None where the row is
    # greedy or its proposals are deterministic (n-gram lookup: q is one-hot).
    num_proposals: list[int] = field(default_factory=list)
    draft_probs: list[Any] = field(default_factory=list)
    # Proposing by early exit: > 0 runs only the model's first exit_layers layers (then its norm and
    # LM head) and samples each row's proposal, returning q for the sampled rows (StepOutput.probs).
    exit_layers: int = 0
    # Sequences that ended since the last step: their per-request RNG state can go.
    released_seq_ids: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    """Rank 0's answer to one step."""

    token_ids: list[int]  # [S] one sampled token per sampled sequence, in sample_rows order
    # (log-probability, top ids, top log-probabilities): one per logprob row, one per prompt position
    logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    # One per structured row: None, or the finish reason once its document is complete ("stop"; "length"
    # where it was closed early for max_tokens)
    structured_finished: list[Optional[str]] = field(default_factory=list)
    # One per sampled row with proposals (num_proposals > 0), in row order: the 1..k + 1 tokens it emits
    # (accepted proposals, then the target's own token); such rows' token_ids entries are unused.
    accepted: list[list[int]] = field(default_factory=list)
    probs: Any = None  # an exit_layers pass: [sampled rows with temperature > 0, V] q of each proposal
    model_time_s: float = 0.0  # rank 0's forward + sampling (no transport)


class Executor(Protocol):
    """Runs steps on every rank of one model replica. Built by `parallel.build.build_executor`."""

    def execute(self, inp: StepInput) -> StepOutput:
        """Runs one step on every rank; raises if a rank failed."""
        ...

    def check_health(self) -> None:
        """Raises if any rank is dead or does not answer."""
        ...

    def shutdown(self) -> None:
        """Stops every rank; the executor is unusable afterwards."""
        ...
