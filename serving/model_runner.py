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

from serving.step import StepInput, StepOutput

ATTN_NAME = "engine_paged"


# Decode rows are attended in groups of at most this many sequences of similar context length: each
# group is padded only to its own longest context, not the batch's, and the scratch buffer it is
# gathered into stays the size of one group.
DECODE_GROUP_SIZE = 32


class StepTensors:
    """A StepInput's tensors on the rank's device, built once per step and shared by every layer."""

    def __init__(self, inp: StepInput, device: torch.device):
        bs, num_seqs = inp.block_size, len(inp.query_lens)
        width = max(len(t) for t in inp.block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in inp.block_tables], dtype=torch.long, device=device)
        # [B, max_context_len] flat slot (block * block_size + offset) of every context position
        context_slots = (table[:, :, None] * bs + torch.arange(bs, device=device)).view(num_seqs, -1)
        self.context_slots = context_slots[:, :max(inp.context_lens)]
        starts = [0, *itertools.accumulate(inp.query_lens)]  # first token of each sequence, then the total
        q = torch.tensor(inp.query_lens, device=device)
        first = torch.tensor(starts[:-1], device=device)
        row = torch.repeat_interleave(torch.arange(num_seqs, device=device), q)  # [T] sequence of each token
        computed = torch.tensor(inp.context_lens, device=device) - q
        self.input_ids = torch.tensor(inp.token_ids, dtype=torch.long, device=device)  # [T]
        self.positions = torch.arange(starts[-1], device=device) - first[row] + computed[row]  # [T]
        self.slot_mapping = self.context_slots[row, self.positions]  # [T]
        # [S] the last new token of each sampled sequence
        self.logits_indices = torch.tensor([starts[i + 1] - 1 for i in inp.sample_rows], dtype=torch.long, device=device)

        # (first token, query length, context length, row) of every sequence with more than one new token
        self.prefill = [(starts[i], n, inp.context_lens[i], i) for i, n in enumerate(inp.query_lens) if n != 1]
        decode = sorted((i for i, n in enumerate(inp.query_lens) if n == 1), key=lambda i: inp.context_lens[i])
        self.decode_groups = [self._decode_group(decode[g:g + DECODE_GROUP_SIZE], starts, inp.context_lens, device)
                              for g in range(0, len(decode), DECODE_GROUP_SIZE)]

    def _decode_group(self, rows: list[int], starts: list[int], context_lens: list[int], device) -> "_DecodeGroup":
        lens = [context_lens[i] for i in rows]
        width = max(lens)
        slots = self.context_slots[torch.tensor(rows, dtype=torch.long, device=device), :width].reshape(-1)
        mask = None
        if min(lens) != width:  # [n, 1, 1, width]: True where the key is inside the sequence
            ctx = torch.tensor(lens, dtype=torch.long, device=device)
            mask = (torch.arange(width, device=device)[None, :] < ctx[:, None])[:, None, None, :]
        token_idx = torch.tensor([starts[i] for i in rows], dtype=torch.long, device=device)
        return _DecodeGroup(token_idx, slots, width, mask)


@dataclass
class _DecodeGroup:
    token_idx: torch.Tensor  # [n] the group's tokens in the step's packed batch
    slots: torch.Tensor  # [n * width] their context slots, row after row (past a row's end: any slot, masked)
    width: int  # longest context in the group
    mask: Optional[torch.Tensor]  # [n, 1, 1, width], None when every context is `width` long


class _Meta:
    """What HF passes down to every attention call of one forward: the step and the pools."""

    def __init__(self, step: StepTensors, pools: "KVPools"):
        self.step = step
        self.pools = pools


class KVPools:
    """Per-layer key and value pools [num_blocks * block_size, kv_heads, head_dim], made on first use,
    plus one pair of scratch buffers that every layer gathers its context into."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_slots = num_blocks * block_size
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._scratch: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def get(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            # like: [1, kv_heads, T, head_dim] (this rank's heads only)
            shape = (self.num_slots, like.shape[1], like.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def scratch(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [rows, kv_heads, head_dim] buffers shaped like pool rows, reused across layers and steps.

        NOTE: gathering into fresh tensors cost a third of a decode step at batch 128 here: each
        allocation of several MB is new pages that the kernel must fault in and zero."""
        have = 0 if self._scratch is None else self._scratch[0].shape[0]
        if have < rows:
            shape = (max(rows, 2 * have), *like.shape[1:])  # at least doubling: few reallocations
            self._scratch = (torch.empty(shape, dtype=like.dtype, device=like.device),
                             torch.empty(shape, dtype=like.dtype, device=like.device))
        return self._scratch[0][:rows], self._scratch[1][:rows]


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged_meta=None, **kwargs):
    """Attention over engine-owned block pools. query: [1, H, T, D]; key/value: [1, KVH, T, D]."""
    meta: _Meta = paged_meta
    assert meta is not None, "the engine-paged attention needs paged_meta"
    step = meta.step
    k_pool, v_pool = meta.pools.get(module.layer_idx, key)
    k_pool.index_copy_(0, step.slot_mapping, key[0].transpose(0, 1))  # [T, KVH, D]
    v_pool.index_copy_(0, step.slot_mapping, value[0].transpose(0, 1))
    q_all = query[0]  # [H, T, D]
    out = torch.empty(q_all.shape[1], q_all.shape[0], q_all.shape[2], dtype=query.dtype, device=query.device)
    for g in step.decode_groups:
        q = q_all.index_select(1, g.token_idx).transpose(0, 1).unsqueeze(2)  # [n, H, 1, D]
        n = g.token_idx.shape[0]
        k_buf, v_buf = meta.pools.scratch(n * g.width, k_pool)
        # NOTE: index_select on the flat slots is several times faster than 2-D advanced indexing
        k = torch.index_select(k_pool, 0, g.slots, out=k_buf).view(n, g.width, *k_pool.shape[1:]).transpose(1, 2)
        v = torch.index_select(v_pool, 0, g.slots, out=v_buf).view(n, g.width, *v_pool.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=True)
        out[g.token_idx] = o[:, :, 0, :]
    for start, q_len, ctx_len, row in step.prefill:
        q = q_all[:, start:start + q_len, :].unsqueeze(0)  # [1, H, q, D]
        slots = step.context_slots[row, :ctx_len]
        k = k_pool.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        v = v_pool.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        if ctx_len == q_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            # queries sit at positions ctx_len - q_len ... ctx_len - 1 (bottom-right aligned causal mask)
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[start:start + q_len] = o[0].transpose(0, 1)
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
        out = self.model(
            input_ids=t.input_ids[None],
            position_ids=t.positions[None],
            use_cache=False,
            logits_to_keep=t.logits_indices,
            paged_meta=_Meta(t, self.pools),
        )
        return out.logits[0].float()


class StepRunner:
    """A rank's whole step: the forward, then (on the rank that samples) the sampler."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: str = "cpu",
                 samples: bool = True):
        from serving.sampling import Sampler

        self.runner = ModelRunner(model, num_blocks, block_size, device)
        self.sampler = Sampler(device) if samples else None

    def execute(self, inp: StepInput) -> Optional[StepOutput]:
        """Rank 0's sampled tokens and model time; None on ranks that do not sample."""
        t0 = time.perf_counter()
        logits = self.runner.forward(inp)
        if self.sampler is None:
            return None
        self.sampler.release(inp.released_seq_ids)
        tokens = self.sampler.sample(logits, inp.seq_ids, inp.temperatures, inp.top_ps, inp.top_ks, inp.seeds)
        return StepOutput(tokens, time.perf_counter() - t0)
