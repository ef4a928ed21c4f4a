"""The engine: three verbs, `add_request`, `step`, `abort`.

Each `step()` asks the scheduler for a batch, packs it into one `StepInput`, has the executor (a
worker group of tensor-parallel ranks, or one local rank) run it, and turns the sampled tokens
into per-request outputs (new text, finish reason). Streaming and `generate` are loops over it.
"""

from __future__ import annotations

import time
from typing import Optional

from serving.block_manager import BlockManager
from serving.config import LLMConfig
from serving.detokenizer import IncrementalDetokenizer
from serving.errors import ContextLengthError, InvalidRequestError
from serving.model_loader import ModelInfo
from serving.protocol import GenerationOutput
from serving.sampling import SamplingParams
from serving.scheduler import ScheduledBatch, Scheduler
from serving.sequence import Sequence
from serving.stats import RequestStats, StepStats
from serving.step import Executor, StepInput


def num_kv_blocks_for(config: LLMConfig, info: ModelInfo) -> int:
    sched = config.scheduler
    if sched.num_kv_blocks is not None:
        return sched.num_kv_blocks
    per_block = info.kv_bytes_per_block(sched.block_size, config.model.dtype, config.parallel.tensor_parallel_size)
    return max(1, sched.kv_cache_memory_bytes // per_block)


class LLMEngine:
    def __init__(self, config: LLMConfig, info: ModelInfo, tokenizer, executor: Executor, num_kv_blocks: int):
        self.config = config
        self.info = info
        self.tokenizer = tokenizer
        self.executor = executor
        self.blocks = BlockManager(num_kv_blocks, config.scheduler.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._released: list[int] = []  # seq ids whose sampler state the ranks may drop
        self._finished_stats: list[RequestStats] = []  # taken by the owner (metrics): take_finished()

    # ---- the three verbs ----------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises a 4xx `ServingError` for a request that can never run. Reads only immutable state."""
        n = len(prompt_token_ids)
        limit = self.info.max_model_len
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if n + params.max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion).")
        if self.blocks.blocks_for(n + params.max_tokens) > self.blocks.num_blocks:
            raise ContextLengthError(
                f"The request needs {n + params.max_tokens} tokens of KV cache; this server holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}.")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary", param="prompt")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: Optional[float] = None) -> None:
        """Queues a request; raises a 4xx `ServingError` for one that can never run."""
        if request_id in self._seqs:
            raise InvalidRequestError(f"duplicate request id {request_id}")
        self.check_request(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params, arrival_time)
        self._seqs[request_id] = seq
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def step(self) -> tuple[list[GenerationOutput], StepStats]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        outputs: list[GenerationOutput] = []
        stats = StepStats(num_preempted=batch.num_preempted, num_seqs=len(batch.entries),
                          num_prefill_tokens=batch.num_prefill_tokens, num_decode_tokens=batch.num_decode_tokens)
        if batch:
            now = time.monotonic()
            for seq, _ in batch.entries:
                if seq.stats.first_scheduled_time is None:
                    seq.stats.first_scheduled_time = now
            inp, sampled = self._build_input(batch)
            t1 = time.perf_counter()
            result = self.executor.execute(inp)
            stats.forward_time_s = time.perf_counter() - t1
            stats.model_time_s = result.model_time_s
            for seq, n in batch.entries:
                seq.num_computed_tokens += n
            now = time.monotonic()
            for seq, token in zip(sampled, result.token_ids):
                outputs.append(self._append_token(seq, token, now))
        self._fill_counts(stats)
        stats.step_time_s = time.perf_counter() - t0
        return outputs, stats

    # ---- helpers ------------------------------------------------------------------------------

    def current_stats(self) -> StepStats:
        """The queue and KV counts now, outside any step (num_seqs 0)."""
        return self._fill_counts(StepStats())

    def _fill_counts(self, stats: StepStats) -> StepStats:
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.num_kv_blocks_used = self.blocks.num_used_blocks
        stats.num_kv_blocks_free = self.blocks.num_free_blocks
        return stats

    def take_finished(self) -> list[RequestStats]:
        """Stats of the requests that ended since the last call (call from the engine's thread)."""
        done, self._finished_stats = self._finished_stats, []
        return done

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _build_input(self, batch: ScheduledBatch) -> tuple[StepInput, list[Sequence]]:
        """Packs the batch as plain lists; each rank builds its tensors from them (StepTensors)."""
        ids: list[int] = []
        qlens, ctxs, tables, rows, sampled = [], [], [], [], []
        for i, (seq, n) in enumerate(batch.entries):
            nc = seq.num_computed_tokens
            ids.extend(seq.token_ids[nc:nc + n])
            qlens.append(n)
            ctxs.append(nc + n)
            tables.append(seq.block_table)
            if nc + n == len(seq):
                rows.append(i)
                sampled.append(seq)
        params = [s.params for s in sampled]
        inp = StepInput(
            token_ids=ids,
            query_lens=qlens,
            context_lens=ctxs,
            block_tables=tables,
            block_size=self.blocks.block_size,
            sample_rows=rows,
            seq_ids=[s.seq_id for s in sampled],
            temperatures=[p.temperature for p in params],
            top_ps=[p.top_p for p in params],
            top_ks=[p.top_k for p in params],
            seeds=[p.seed for p in params],
            released_seq_ids=self._released,
        )
        self._released = []
        return inp, sampled

    def _append_token(self, seq: Sequence, token: int, now: float) -> GenerationOutput:
        seq.token_ids.append(token)
        st = seq.stats
        if st.first_token_time is None:
            st.first_token_time = now
        st.token_times.append(now)
        detok = self._detok[seq.request_id]
        reason = None
        if token in seq.params.stop_token_ids:
            reason = "stop"
        else:
            detok.add(token)
            if detok.stopped:
                reason = "stop"
        if reason is None and (seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.info.max_model_len):
            reason = "length"
        text = detok.release(final=reason is not None)
        out = GenerationOutput(request_id=seq.request_id, text=text, token_ids=[token],
                               finished=reason is not None, finish_reason=reason,
                               num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens)
        if reason is not None:
            self._finish(seq, reason)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._released.append(seq.seq_id)
        del self._seqs[seq.request_id]
        del self._detok[seq.request_id]
        seq.stats.finished_time = time.monotonic()
        seq.stats.finish_reason = reason
        seq.stats.num_output_tokens = seq.num_output_tokens
        self._finished_stats.append(seq.stats)
        if len(self._finished_stats) > 10_000:  # bounded when nobody takes them
            del self._finished_stats[:5_000]
