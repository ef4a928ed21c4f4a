"""Per-row logits processing and log-probabilities on the rank that samples (pure tensor functions).

Each operation is one batched tensor op over the rows of a step that use it; a row that uses
none is never touched (the engine lists the rows that do, `StepInput.proc_rows`). Order, as vLLM:
logit bias and the min_tokens ban, then the penalties, then (in the sampler) greedy argmax or
temperature, min-p, top-k/top-p.

Log-probabilities are those of the model's own distribution, log_softmax of the raw logits
(before any processing, as vLLM returns them by default).
"""

from __future__ import annotations

from typing import Optional

import torch

from serving.step import StepInput


def penalised(logits: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor, frequency: torch.Tensor,
              presence: torch.Tensor) -> torch.Tensor:
    """The penalised logits of tokens a sequence has seen (in its prompt or its output). All [K]:
    each seen token's logit, times generated, and its row's penalties.

    repetition (CTRL, as HF's RepetitionPenaltyLogitsProcessor): l / r when l > 0, else l * r;
    frequency and presence (OpenAI, over generated tokens only): l - f * count - p * (count > 0).
    NOTE: only seen tokens change (a generated one is seen too), a few hundred of a row's V, so only
    they are gathered: whole-row ops cost ~10x more here, mostly `torch.where` over a random sign pattern.
    """
    value = torch.where(logits > 0, logits / repetition, logits * repetition)
    return value - frequency * counts - presence * (counts > 0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   num_top: list[int]) -> list[tuple[float, list[int], list[float]]]:
    """logits: [L, V] raw; targets: [L] token ids -> per row (log p(target), top ids, top log-probs),
    the top `num_top[i]` best first."""
    logprobs = logits.log_softmax(dim=-1)  # [L, V]
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = max(num_top)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], targets[:, None][:, :0])
    values, ids = top_values.tolist(), top_ids.tolist()
    return [(chosen[i], ids[i][:n], values[i][:n]) for i, n in enumerate(num_top)]


class LogitsProcessor:
    """Applies a step's per-row processing in place; owns each penalised sequence's token history.

    NOTE: the history lives here, on the rank that samples, so a step carries a sequence's prompt
    once (`StepInput.penalty_prompts`, its first sampled step) instead of its whole history every
    step; each sampled token is added as it is sampled. Histories are rows of two pools, so a
    step gathers and updates all its penalised rows with one tensor op each."""

    def __init__(self):
        self._slots: dict[int, int] = {}  # seq id -> its row in the pools
        self._free: list[int] = []
        self._seen: Optional[torch.Tensor] = None  # [R, V] bool: in the prompt or the output
        self._counts: Optional[torch.Tensor] = None  # [R, V] float: times generated
        self._recording: Optional[tuple[list[int], torch.Tensor]] = None  # (rows, their slots) of this step

    def release(self, seq_ids) -> None:
        for sid in seq_ids:
            slot = self._slots.pop(sid, None)
            if slot is not None:
                self._free.append(slot)

    def apply(self, logits: torch.Tensor, inp: StepInput) -> None:
        """logits: [S, V] of the sampled rows, changed in place for the rows in `inp.proc_rows`."""
        self._recording = None
        if not inp.proc_rows:
            return
        dev = logits.device
        rows, cols, values = [], [], []
        for row, bias in zip(inp.proc_rows, inp.logit_biases):
            for token, b in bias:
                rows.append(row)
                cols.append(token)
                values.append(b)
        if rows:
            logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                              torch.tensor(values, device=dev), accumulate=True)
        banned = [(row, t) for row, ids in zip(inp.proc_rows, inp.banned_token_ids) for t in ids]
        if banned:
            index = torch.tensor(banned, device=dev)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        self._penalise(logits, inp)

    def _penalise(self, logits: torch.Tensor, inp: StepInput) -> None:
        picked = [j for j, (r, f, p) in enumerate(zip(inp.repetition_penalties, inp.frequency_penalties,
                                                      inp.presence_penalties)) if r != 1.0 or f != 0.0 or p != 0.0]
        if not picked:
            return
        dev = logits.device
        slots = []
        for j in picked:
            sid = inp.seq_ids[inp.proc_rows[j]]
            prompt = inp.penalty_prompts[j]
            slots.append(self._new_slot(sid, prompt, logits) if prompt is not None else self._slots[sid])
        rows = [inp.proc_rows[j] for j in picked]
        row_index, slot_index = torch.tensor([rows, slots], device=dev)  # [P] each
        params = torch.tensor([[inp.repetition_penalties[j], inp.frequency_penalties[j], inp.presence_penalties[j]]
                               for j in picked], device=dev)  # [P, 3]
        which, cols = self._seen.index_select(0, slot_index).nonzero(as_tuple=True)  # [K] seen (row, token)
        at = row_index[which]
        p = params[which]  # [K, 3]
        logits[at, cols] = penalised(logits[at, cols], self._counts[slot_index[which], cols], p[:, 0], p[:, 1], p[:, 2])
        self._recording = (rows, slot_index)

    def _new_slot(self, seq_id: int, prompt: list[int], like: torch.Tensor) -> int:
        if not self._free:
            have = 0 if self._seen is None else self._seen.shape[0]
            grow = max(8, have)  # at least doubling: few reallocations
            vocab, dev = like.shape[-1], like.device
            seen = torch.zeros(have + grow, vocab, dtype=torch.bool, device=dev)
            counts = torch.zeros(have + grow, vocab, device=dev)
            if have:
                seen[:have], counts[:have] = self._seen, self._counts
            self._seen, self._counts = seen, counts
            self._free.extend(range(have + grow - 1, have - 1, -1))
        slot = self._slots[seq_id] = self._free.pop()
        self._seen[slot].zero_()
        self._counts[slot].zero_()
        self._seen[slot, torch.tensor(prompt, device=like.device)] = True
        return slot

    def record(self, tokens: list[int]) -> None:
        """Adds the step's sampled tokens to the penalised sequences' histories."""
        if self._recording is None:
            return
        rows, slots = self._recording
        sampled = torch.tensor([tokens[r] for r in rows], device=slots.device)
        self._counts.index_put_((slots, sampled), torch.ones(len(rows), device=slots.device), accumulate=True)
        self._seen[slots, sampled] = True
        self._recording = None
