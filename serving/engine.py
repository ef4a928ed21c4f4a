"""The engine: three verbs, `add_request`, `step`, `abort`.

Each `step()` asks the scheduler for a batch, packs it into one `StepInput`, has the executor (a
worker group of tensor-parallel ranks, or one local rank) run it, and turns the sampled tokens
into per-request outputs (new text, finish reason). Streaming and `generate` are loops over it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from serving.block_manager import BlockManager
from serving.config import LLMConfig
from serving.detokenizer import IncrementalDetokenizer
from serving.errors import ContextLengthError, InvalidRequestError
from serving.model_loader import ModelInfo
from serving.protocol import GenerationOutput, TokenLogprob
from serving.sampling import SamplingParams
from serving.scheduler import ScheduledBatch, Scheduler
from serving.sequence import Sequence
from serving.stats import RequestStats, StepStats
from serving.step import Executor, StepInput

if TYPE_CHECKING:
    from serving.spec.speculator import Speculator


def num_kv_blocks_for(config: LLMConfig, info: ModelInfo) -> int:
    sched = config.scheduler
    if sched.num_kv_blocks is not None:
        return sched.num_kv_blocks
    per_block = info.kv_bytes_per_block(sched.block_size, config.model.dtype, config.parallel.tensor_parallel_size)
    return max(1, sched.kv_cache_memory_bytes // per_block)


class LLMEngine:
    def __init__(self, config: LLMConfig, info: ModelInfo, tokenizer, executor: Executor, num_kv_blocks: int,
                 speculator: Optional["Speculator"] = None):
        self.config = config
        self.speculator = speculator
        self.info = info
        self.tokenizer = tokenizer
        self.executor = executor
        self.blocks = BlockManager(num_kv_blocks, config.scheduler.block_size,
                                   config.scheduler.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._released: list[int] = []  # seq ids whose sampler state the ranks may drop
        self._finished_stats: list[RequestStats] = []  # taken by the owner (metrics): take_finished()
        self._token_texts: dict[int, str] = {}  # token id -> its text, for log-probabilities

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
        for param, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary", param=param)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: Optional[float] = None) -> None:
        """Queues a request; raises a 4xx `ServingError` for one that can never run."""
        if request_id in self._seqs:
            raise InvalidRequestError(f"duplicate request id {request_id}")
        self.check_request(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params, arrival_time)
        self._seqs[request_id] = seq
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                                         params.include_stop_str_in_output, params.min_tokens)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def check_health(self) -> None:
        """Raises if a rank or a draft worker is dead or does not answer."""
        self.executor.check_health()
        if self.speculator is not None:
            self.speculator.check_health()

    def shutdown(self) -> None:
        if self.speculator is not None:
            self.speculator.shutdown()
        self.executor.shutdown()

    def step(self) -> tuple[list[GenerationOutput], StepStats]:
        t0 = time.perf_counter()
        spec = self.speculator
        if spec is not None:
            spec.plan(self.scheduler.running)
        batch = self.scheduler.schedule(spec.lookahead if spec is not None else None)
        outputs: list[GenerationOutput] = []
        stats = StepStats(num_preempted=batch.num_preempted, num_seqs=len(batch.entries),
                          num_prefix_queried_tokens=batch.num_prefix_queried_tokens,
                          num_prefix_hit_tokens=batch.num_prefix_hit_tokens,
                          num_prefill_tokens=batch.num_prefill_tokens, num_decode_tokens=batch.num_decode_tokens)
        if batch:
            now = time.monotonic()
            for seq, _ in batch.entries:
                if seq.stats.first_scheduled_time is None:
                    seq.stats.first_scheduled_time = now
            proposals = {}
            if spec is not None and any(batch.lookahead):
                t_propose = time.perf_counter()
                proposals = spec.propose(batch)
                stats.propose_time_s = time.perf_counter() - t_propose
            inp, sampled = self._build_input(batch, proposals)
            num_tokens = len(inp.token_ids)
            scored = self._ask_prompt_logprobs(inp, batch)
            t1 = time.perf_counter()
            result = self.executor.execute(inp)
            stats.forward_time_s = time.perf_counter() - t1
            stats.model_time_s = result.model_time_s
            for seq, n in batch.entries:
                seq.num_computed_tokens += n
                self.blocks.register_computed(seq)
            if scored:
                self._take_prompt_logprobs(scored, result.prompt_logprobs)
            logprobs = dict(zip(inp.logprob_rows, result.logprobs))
            structured = dict(zip(inp.structured_rows, result.structured_finished))
            accepted = iter(result.accepted)
            now = time.monotonic()
            for j, (seq, token) in enumerate(zip(sampled, result.token_ids)):
                if inp.num_proposals and inp.num_proposals[j]:
                    emitted = next(accepted)
                    seq.num_computed_tokens += len(emitted) - 1  # the accepted proposals' K/V are kept
                    self.blocks.register_computed(seq)
                    spec.verified(seq, emitted, stats)
                    outputs.append(self._append_tokens(seq, emitted, now))
                else:
                    outputs.append(self._append_token(seq, token, now, logprobs.get(j), structured.get(j)))
        self._fill_counts(stats)
        stats.step_time_s = time.perf_counter() - t0
        if spec is not None and batch:
            # NOTE: the whole step but the proposers' rounds (measured on their own): the engine's own
            # bookkeeping per token counts as much as the forward's on a small model
            spec.observe_step(num_tokens, stats)
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

    def take_text(self, request_id: str) -> str:
        """The text of `request_id`'s tokens that its outputs have not carried yet ("" once it
        finished: its last output carried the rest)."""
        detok = self._detok.get(request_id)
        return detok.release() if detok is not None else ""

    def take_finished(self) -> list[RequestStats]:
        """Stats of the requests that ended since the last call (call from the engine's thread)."""
        done, self._finished_stats = self._finished_stats, []
        return done

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _build_input(self, batch: ScheduledBatch, proposals: dict) -> tuple[StepInput, list[Sequence]]:
        """Packs the batch as plain lists; each rank builds its tensors from them (StepTensors).
        proposals: seq id -> (proposed tokens, q or None), packed after the sequence's last token."""
        ids: list[int] = []
        qlens, ctxs, tables, rows, sampled = [], [], [], [], []
        num_proposals, draft_probs = [], []
        for i, (seq, n) in enumerate(batch.entries):
            nc = seq.num_computed_tokens
            ids.extend(seq.token_ids[nc:nc + n])
            tokens, q = proposals.get(seq.seq_id, ((), None))
            ids.extend(tokens)
            qlens.append(n + len(tokens))
            ctxs.append(nc + n + len(tokens))
            tables.append(seq.block_table)
            if nc + n == len(seq):
                rows.append(i)
                sampled.append(seq)
                num_proposals.append(len(tokens))
                draft_probs.append(q)
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
        if proposals:
            inp.num_proposals = num_proposals
            if any(q is not None for q in draft_probs):
                inp.draft_probs = draft_probs
        self._released = []
        self._ask_processing(inp, sampled, self.info.max_model_len)
        return inp, sampled

    # ---- per-row processing and log-probabilities (serving/logits_processors.py) --------------

    @staticmethod
    def _ask_processing(inp: StepInput, sampled: list[Sequence], max_model_len: int) -> None:
        """Fills the step's min-p, logits-processing, log-probability and structured-output fields for
        the sampled rows that use them; a step whose rows use none carries empty lists."""
        if any(s.params.min_p > 0.0 for s in sampled):
            inp.min_ps = [s.params.min_p for s in sampled]
        for j, seq in enumerate(sampled):
            p = seq.params
            if p.logprobs is not None:
                inp.logprob_rows.append(j)
                inp.num_top_logprobs.append(p.logprobs)
            if p.json_spec is not None:
                inp.structured_rows.append(j)
                inp.structured_tokens_left.append(min(p.max_tokens - seq.num_output_tokens,
                                                      max_model_len - len(seq)))
                # NOTE: a sampled row gets a token, so "no output yet" is exactly its first sampled step
                inp.structured_specs.append(p.json_spec if seq.num_output_tokens == 0 else None)
            # NOTE: the grammar decides where a constrained row ends: min_tokens must not hold EOS back
            banned = list(p.stop_token_ids) if seq.num_output_tokens < p.min_tokens and p.json_spec is None else []
            if not (p.logit_bias or banned or p.has_penalties):
                continue
            inp.proc_rows.append(j)
            inp.logit_biases.append(list(p.logit_bias))
            inp.banned_token_ids.append(banned)
            inp.repetition_penalties.append(p.repetition_penalty)
            inp.frequency_penalties.append(p.frequency_penalty)
            inp.presence_penalties.append(p.presence_penalty)
            prompt = None
            if p.has_penalties and not seq.sent_penalty_prompt:
                # NOTE: a sequence is first sampled at the end of its prompt; after that the rank adds
                # every token it samples itself (a preempted sequence keeps its seq id and history)
                assert seq.num_output_tokens == 0
                prompt = seq.token_ids[:seq.num_prompt_tokens]
                seq.sent_penalty_prompt = True
            inp.penalty_prompts.append(prompt)

    @staticmethod
    def _ask_prompt_logprobs(inp: StepInput, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Asks for the log-probability of each prompt token that this step's chunks predict and that
        was not scored yet (the logits at position p predict token p + 1). Returns (sequence, count)."""
        scored = []
        start = 0  # the sequence's first position in the packed row
        for seq, n in batch.entries:
            if seq.prompt_logprobs is not None:
                nc = seq.num_computed_tokens
                targets = range(max(len(seq.prompt_logprobs), nc + 1), min(nc + n, seq.num_prompt_tokens - 1) + 1)
                for t in targets:
                    inp.prompt_logprob_positions.append(start + t - 1 - nc)
                    inp.prompt_logprob_targets.append(seq.token_ids[t])
                    inp.prompt_num_top_logprobs.append(seq.params.prompt_logprobs)
                if targets:
                    scored.append((seq, len(targets)))
            start += n
        return scored

    def _take_prompt_logprobs(self, scored: list[tuple[Sequence, int]], results: list) -> None:
        i = 0
        for seq, count in scored:
            targets = seq.token_ids[len(seq.prompt_logprobs):len(seq.prompt_logprobs) + count]
            seq.prompt_logprobs += [self._token_logprob(t, r) for t, r in zip(targets, results[i:i + count])]
            i += count

    def _token_logprob(self, token: int, result: tuple[float, list[int], list[float]]) -> TokenLogprob:
        logprob, top_ids, top_logprobs = result
        return TokenLogprob(self._token_text(token), logprob,
                            [(self._token_text(t), lp) for t, lp in zip(top_ids, top_logprobs)])

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            # NOTE: the fast tokenizer's Rust object: the HF wrapper's decode cost ~1 ms a call here
            backend = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
            text = self._token_texts[token] = backend.decode([token], skip_special_tokens=False)
        return text

    def _append_token(self, seq: Sequence, token: int, now: float, logprob=None,
                      structured: Optional[str] = None) -> GenerationOutput:
        """structured: the finish reason rank 0 gave a constrained row whose document is now complete."""
        seq.token_ids.append(token)
        st = seq.stats
        first = st.first_token_time is None
        if first:
            st.first_token_time = now
        st.token_times.append(now)
        detok = self._detok[seq.request_id]
        reason = None
        # NOTE: min_tokens keeps stop ids out of the sampler's reach until then (a banned logit)
        if token in seq.params.stop_token_ids:
            reason = "stop"
            if seq.params.include_stop_str_in_output:
                detok.add(token)
        else:
            detok.add(token)
            if detok.stopped:
                reason = "stop"
        if reason is None:
            reason = structured  # nothing but EOS could follow: end now rather than sample it
        if reason is None and (seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.info.max_model_len):
            reason = "length"
        # NOTE: a middle token of a request without stop strings leaves its text to `take_text`,
        # called when its output is published: one decode per published item instead of per token
        text = detok.release(final=reason is not None) if first or reason is not None or detok.stop else ""
        out = GenerationOutput(request_id=seq.request_id, text=text, token_ids=[token],
                               finished=reason is not None, finish_reason=reason,
                               num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                               num_cached_tokens=seq.num_cached_prompt_tokens)
        if logprob is not None:
            out.logprobs = [self._token_logprob(token, logprob)]
        if first and seq.prompt_logprobs is not None:
            out.prompt_logprobs = [TokenLogprob(self._token_text(seq.token_ids[0]), None), *seq.prompt_logprobs[1:]]
        if reason is not None:
            self._finish(seq, reason)
        return out

    def _append_tokens(self, seq: Sequence, tokens: list[int], now: float) -> GenerationOutput:
        """Several tokens of one step (speculation), each checked for stops and limits as if alone:
        one output with all that were emitted before the sequence finished."""
        out = None
        for token in tokens:
            item = self._append_token(seq, token, now)
            if out is None:
                out = item
            else:
                out.text += item.text
                out.token_ids += item.token_ids
                out.finished, out.finish_reason = item.finished, item.finish_reason
                out.num_output_tokens = item.num_output_tokens
            if item.finished:
                break
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self.speculator is not None:
            self.speculator.release(seq)
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
