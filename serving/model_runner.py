"""One forward of an unmodified Hugging Face causal LM over a packed ragged batch, with the
engine owning the KV cache in blocks.

How (NOTES.md, "An engine-owned block KV cache"): we register an attention function with
transformers' `AttentionInterface` and call the model with `input_ids`/`position_ids` of shape
[1, T] (prefill chunks and decode tokens of many sequences packed together), `use_cache=False`
and one extra keyword argument, `paged_meta`, that HF passes down to every attention call. The
function writes the step's new keys/values into per-layer block pools and attends each sequence
over its own blocks. The pools are sized from the tensors the function receives, so under
tensor parallelism each rank holds only its heads.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from serving.logits_processors import LogitsProcessor, token_logprobs
from serving.spec import verify as spec_verify
from serving.step import StepInput, StepOutput

ATTN_NAME = "engine_paged"


# Decode rows are attended in groups of at most this many sequences of similar context length: each
# group is padded only to its own longest context, not the batch's, and the scratch buffer it is
# gathered into stays the size of one group.
DECODE_GROUP_SIZE = 32
# Rows of at most this many new tokens attend in such groups too (one group per query length): a
# speculating row's last token and proposals, short prompts. Longer ones attend one by one.
MAX_GROUPED_QUERY_LEN = 17


class StepTensors:
    """A StepInput's tensors on the rank's device, built once per step and shared by every layer.

    NOTE: at small batches a torch call costs more than the work it does, so this is built from plain
    Python ints, sent as one tensor (one host-to-device copy) and split into views."""

    def __init__(self, inp: StepInput, device: torch.device):
        bs, qlens, ctx, tables = inp.block_size, inp.query_lens, inp.context_lens, inp.block_tables
        num_seqs, num_tokens, num_sampled = len(qlens), len(inp.token_ids), len(inp.sample_rows)
        width = max(len(t) for t in tables)
        starts = [0, *itertools.accumulate(qlens)]  # first token of each sequence, then the total
        positions = [p for c, n in zip(ctx, qlens) for p in range(c - n, c)]  # [T]
        slots = [t[p // bs] * bs + p % bs for t, c, n in zip(tables, ctx, qlens) for p in range(c - n, c)]  # [T]
        # A sampled row keeps the logits of its last new token and, verifying m proposals, of the m
        # positions before it too (its last token's and each proposal's but the last).
        props = inp.num_proposals or [0] * num_sampled
        num_kept = num_sampled + sum(props)
        # NOTE: every query length is >= 1, so keeping as many positions as tokens is a step that keeps
        # every position: logits_to_keep=0 keeps them all without an index
        # (prompt log-probabilities keep more positions, after the sampled ones)
        keep_all = num_kept == num_tokens and not inp.prompt_logprob_positions
        logits_rows = [] if keep_all else [*(p for i, m in zip(inp.sample_rows, props)  # [S + proposals]
                                             for p in range(starts[i + 1] - 1 - m, starts[i + 1])),
                                           *inp.prompt_logprob_positions]
        padded = itertools.chain.from_iterable(t + [0] * (width - len(t)) for t in tables)  # [B * width]
        ints = torch.tensor([*inp.token_ids, *positions, *slots, *ctx, *logits_rows, *padded],
                            dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, ctx_t, logits_indices, table = ints.split_with_sizes(
            [num_tokens, num_tokens, num_tokens, num_seqs, len(logits_rows), num_seqs * width])
        self.logits_to_keep = 0 if keep_all else logits_indices
        table = table.view(num_seqs, width)  # [B, width] block ids (past a table's end: block 0)

        self.prefill = [_Prefill(starts[i], n, ctx[i], table[i, :-(-ctx[i] // bs)], device)
                        for i, n in enumerate(qlens) if n > MAX_GROUPED_QUERY_LEN]
        # Short rows (decode tokens; a speculating row's last token and proposals) attend in groups of
        # one query length each
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(qlens):
            if n <= MAX_GROUPED_QUERY_LEN:
                by_len.setdefault(n, []).append(i)
        self.decode_groups = []
        for q_len, rows in by_len.items():
            if len(rows) > DECODE_GROUP_SIZE:
                rows.sort(key=ctx.__getitem__)  # similar lengths together: each group pads to its own longest
            self.decode_groups += [_DecodeGroup(rows[g:g + DECODE_GROUP_SIZE], q_len, starts, ctx, ctx_t, table, bs)
                                   for g in range(0, len(rows), DECODE_GROUP_SIZE)]


class _DecodeGroup:
    """Sequences with q_len new tokens each (1: decoding; more: a speculating row, or a short prompt),
    attended together over their gathered blocks."""

    def __init__(self, rows: list[int], q_len: int, starts: list[int], ctx: list[int], ctx_t: torch.Tensor,
                 table: torch.Tensor, block_size: int):
        self.n, self.q_len = len(rows), q_len
        self.width = max(ctx[i] for i in rows)  # longest context in the group
        dev = table.device
        if rows == list(range(rows[0], rows[0] + self.n)):  # consecutive rows: views, no index
            sel = slice(rows[0], rows[0] + self.n)
            first = starts[rows[0]]
            self.tokens = slice(first, first + self.n * q_len)
        else:
            sel = torch.tensor(rows, dtype=torch.long, device=dev)
            self.tokens = torch.tensor([p for i in rows for p in range(starts[i], starts[i] + q_len)],
                                       dtype=torch.long, device=dev)
        # [n * num_blocks] the group's blocks, row after row (past a row's end: any block, masked)
        self.blocks = table[sel, :-(-self.width // block_size)].reshape(-1)
        # [n, 1, q_len, width]: True where the key is inside the sequence and not after the query
        # (query t of a row with context c sits at position c - q_len + t); None if nothing is masked
        self.mask = None
        if q_len > 1:
            last = ctx_t[sel, None] - q_len + torch.arange(q_len, device=dev)  # [n, q_len]
            self.mask = (torch.arange(self.width, device=dev) <= last[:, :, None])[:, None]
        elif min(ctx[i] for i in rows) != self.width:
            self.mask = (torch.arange(self.width, device=dev) < ctx_t[sel, None])[:, None, None, :]
        self._buffers: Optional[tuple[torch.Tensor, ...]] = None

    def attend(self, q: torch.Tensor, kv: "_LayerKV", pools: "KVPools", scaling) -> torch.Tensor:
        """q: [n, H, q_len, D] -> [n, H, q_len, D], each row over its own sequence's context in one layer's pools.

        NOTE: every layer gathers into the same scratch buffers, so their views are made once per step."""
        if self._buffers is None:
            k_buf, v_buf = pools.scratch(self.blocks.shape[0], kv.k_blocks)  # [n * num_blocks, block_size, KVH, D]
            heads, dim = kv.k_blocks.shape[2:]
            self._buffers = (k_buf, v_buf, *(b.view(self.n, -1, heads, dim)[:, :self.width].transpose(1, 2)
                                             for b in (k_buf, v_buf)))  # [n, KVH, width, D]
        k_buf, v_buf, k, v = self._buffers
        # NOTE: index_select into a reused buffer is several times faster than advanced indexing
        torch.index_select(kv.k_blocks, 0, self.blocks, out=k_buf)
        torch.index_select(kv.v_blocks, 0, self.blocks, out=v_buf)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scaling, enable_gqa=True)


class _Prefill:
    """One sequence with several new tokens: its queries sit at the last `q_len` of `ctx_len` positions."""

    def __init__(self, start: int, q_len: int, ctx_len: int, blocks: torch.Tensor, device):
        self.start, self.q_len, self.ctx_len = start, q_len, ctx_len
        self.blocks = blocks  # [num_blocks] the blocks of its context
        self.mask = None  # [q_len, ctx_len] bottom-right aligned causal mask; None: plain causal (no cache)
        if ctx_len != q_len:
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=device)
            self.mask = torch.arange(ctx_len, device=device)[None, :] <= qpos[:, None]


class _Meta:
    """What HF passes down to every attention call of one forward: the step and the pools."""

    def __init__(self, step: StepTensors, pools: "KVPools"):
        self.step = step
        self.pools = pools


@dataclass
class _LayerKV:
    k_blocks: torch.Tensor  # [num_blocks, block_size, KVH, D], gathered by block
    v_blocks: torch.Tensor
    # NOTE: the same memory as [1, KVH, num_blocks * block_size, D], the layout HF hands us keys in: written
    # with index_copy_ along dim 2 straight from `key`, without a view of it per call
    k_slots: torch.Tensor
    v_slots: torch.Tensor


class KVPools:
    """Per-layer key and value pools, made on first use, plus one pair of scratch buffers that every
    layer gathers its context into."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers: dict[int, _LayerKV] = {}
        self._scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def get(self, layer: int, like: torch.Tensor) -> _LayerKV:
        kv = self.layers.get(layer)
        if kv is None:
            # like: [1, kv_heads, T, head_dim] (this rank's heads only)
            shape = (self.num_blocks, self.block_size, like.shape[1], like.shape[3])
            k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            v = torch.zeros(shape, dtype=like.dtype, device=like.device)
            kv = self.layers[layer] = _LayerKV(k, v, *(p.flatten(0, 1).transpose(0, 1)[None] for p in (k, v)))
        return kv

    def scratch(self, num_blocks: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [num_blocks, block_size, KVH, D] buffers shaped like pool blocks, reused across layers and steps.

        NOTE: gathering into fresh tensors cost a third of a decode step at batch 128 here: each
        allocation of several MB is new pages that the kernel must fault in and zero."""
        have = 0 if self._scratch is None else self._scratch[0].shape[0]
        if have < num_blocks:
            shape = (max(num_blocks, 2 * have), *like.shape[1:])  # at least doubling: few reallocations
            self._scratch = (torch.empty(shape, dtype=like.dtype, device=like.device),
                             torch.empty(shape, dtype=like.dtype, device=like.device))
        return self._scratch[0][:num_blocks], self._scratch[1][:num_blocks]


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged_meta=None, **kwargs):
    """Attention over engine-owned block pools. query: [1, H, T, D]; key/value: [1, KVH, T, D]."""
    meta: _Meta = paged_meta
    assert meta is not None, "the engine-paged attention needs paged_meta"
    step, pools = meta.step, meta.pools
    kv = pools.get(module.layer_idx, key)
    kv.k_slots.index_copy_(2, step.slot_mapping, key)
    kv.v_slots.index_copy_(2, step.slot_mapping, value)
    q_all = query.transpose(0, 2)  # [T, H, 1, D]: one query row per token
    out = torch.empty(q_all.shape[0], q_all.shape[1], q_all.shape[3], dtype=query.dtype, device=query.device)
    for g in step.decode_groups:
        if g.q_len == 1:
            out[g.tokens] = g.attend(q_all[g.tokens], kv, pools, scaling)[:, :, 0]  # a slice or an index
        else:  # [n * q_len, H, 1, D] -> [n, H, q_len, D] and back
            q = q_all[g.tokens][:, :, 0].unflatten(0, (g.n, g.q_len)).transpose(1, 2)
            out[g.tokens] = g.attend(q, kv, pools, scaling).transpose(1, 2).flatten(0, 1)
    for p in step.prefill:
        q = query[:, :, p.start:p.start + p.q_len]  # [1, H, q, D]
        k = kv.k_blocks.index_select(0, p.blocks).flatten(0, 1)[:p.ctx_len].transpose(0, 1)  # [KVH, ctx, D]
        v = kv.v_blocks.index_select(0, p.blocks).flatten(0, 1)[:p.ctx_len].transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scaling, enable_gqa=True)
        out[p.start:p.start + p.q_len] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None  # [1, T, H, D]


def register_paged_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)


class ModelRunner:
    """Runs steps of one model (or one tensor-parallel shard of it) over its own KV pools."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: str = "cpu"):
        register_paged_attention()
        self.model = model
        self.device = torch.device(device)
        inner = getattr(model, "module", model)
        inner.set_attn_implementation(ATTN_NAME)
        self.pools = KVPools(num_blocks, block_size)

    @torch.inference_mode()
    def forward(self, inp: StepInput) -> torch.Tensor:
        """Returns the logits of the sampled positions, [S, vocab] float32."""
        t = StepTensors(inp, self.device)
        config = getattr(self.model, "module", self.model).config
        num_layers = config.num_hidden_layers
        if inp.exit_layers:
            # NOTE: HF's decoder loops over layers[:config.num_hidden_layers]: fewer layers is an early exit
            # through the same final norm and LM head; their K/V go to the same pools, as a full pass would
            config.num_hidden_layers = min(inp.exit_layers, num_layers)
        try:
            out = self.model(
                input_ids=t.input_ids[None],
                position_ids=t.positions[None],
                use_cache=False,
                logits_to_keep=t.logits_to_keep,
                paged_meta=_Meta(t, self.pools),
            )
        finally:
            config.num_hidden_layers = num_layers
        logits = out.logits[0]
        return logits if logits.dtype == torch.float32 else logits.float()  # NOTE: even a no-op call costs here


class StepRunner:
    """A rank's whole step: the forward, then (on the rank that samples) the sampler."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: str = "cpu",
                 samples: bool = True):
        from serving.sampling import Sampler

        self.runner = ModelRunner(model, num_blocks, block_size, device)
        self.sampler = Sampler() if samples else None
        self.processor = LogitsProcessor()
        self._structured = None  # StructuredOutputs, built on the first constrained row (`_structured_for`)

    @torch.inference_mode()
    def execute(self, inp: StepInput) -> Optional[StepOutput]:
        """Rank 0's sampled tokens (with their log-probabilities where asked) and model time; None on
        ranks that do not sample."""
        t0 = time.perf_counter()
        logits = self.runner.forward(inp)  # [S + proposals + prompt positions, V]
        if self.sampler is None:
            return None
        if inp.exit_layers:
            tokens, q = spec_verify.propose(logits, inp, self.sampler)
            return StepOutput(tokens, probs=q, model_time_s=time.perf_counter() - t0)
        self.sampler.release(inp.released_seq_ids)
        self.processor.release(inp.released_seq_ids)
        num_sampled = len(inp.sample_rows)
        num_kept = num_sampled + sum(inp.num_proposals)
        if num_kept == num_sampled:
            sample_logits = logits[:num_sampled]  # NOTE: a view, processed in place
        else:  # each row's last kept position: where it samples when it does not speculate
            sample_logits = logits[[end - 1 for end in itertools.accumulate(m + 1 for m in inp.num_proposals)]]
        raw = sample_logits[inp.logprob_rows] if inp.logprob_rows else None  # a copy: before processing
        if self._structured is not None:
            self._structured.release(inp.released_seq_ids)
        self.processor.apply(sample_logits, inp)
        constrained = [inp.seq_ids[r] for r in inp.structured_rows]
        if constrained:
            structured = self._structured_for(sample_logits.shape[-1])
            for seq_id, spec in zip(constrained, inp.structured_specs):
                if spec is not None:
                    structured.add(seq_id, spec)
            structured.mask(sample_logits, inp.structured_rows, constrained, inp.structured_tokens_left)
        tokens = self.sampler.sample(sample_logits, inp.seq_ids, inp.temperatures, inp.top_ps, inp.top_ks,
                                     inp.seeds, inp.min_ps)
        self.processor.record(tokens)
        out = StepOutput(tokens)
        if constrained:
            done = structured.accept(constrained, [tokens[r] for r in inp.structured_rows])
            out.structured_finished = [("length" if structured.closed_early(s) else "stop") if d else None
                                       for s, d in zip(constrained, done)]
        if raw is not None:
            out.logprobs = token_logprobs(raw, torch.tensor([tokens[r] for r in inp.logprob_rows]),
                                          inp.num_top_logprobs)
        if inp.prompt_logprob_positions:
            out.prompt_logprobs = token_logprobs(logits[num_kept:], torch.tensor(inp.prompt_logprob_targets),
                                                 inp.prompt_num_top_logprobs)
        if num_kept != num_sampled:
            out.accepted = spec_verify.verify(logits, inp, self.sampler)
        out.model_time_s = time.perf_counter() - t0
        return out

    def _structured_for(self, vocab_size: int):
        """Rank 0's grammar state, made once: the tokenizer is read from the model's own folder.

        NOTE: lazily, so a server that never sees response_format never loads a second tokenizer."""
        if self._structured is None:
            from serving.config import ModelConfig
            from serving.model_loader import load_model_info, load_tokenizer
            from serving.structured.grammar import GrammarCompiler
            from serving.structured.outputs import StructuredOutputs

            path = getattr(self.runner.model, "module", self.runner.model).config.name_or_path
            eos = load_model_info(ModelConfig(path=path)).eos_token_ids
            self._structured = StructuredOutputs(GrammarCompiler(load_tokenizer(path), vocab_size, eos))
        return self._structured
