"""Token bitmasks and their application to a batch's logits (pure tensor functions)."""

from __future__ import annotations

from typing import Sequence

import torch


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab_size / 32)] int32 on the CPU, where llguidance writes its masks."""
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Sets logits[rows[i], t] to -inf for every token t that bitmask[i] does not allow, in place.

    logits: [S, V] float, any device; rows: [R] distinct indices into logits; bitmask: [>= R, W] int32
    with W * 32 >= V, bit j of word w allowing token 32 * w + j. Rows not in `rows` are untouched;
    with no rows nothing runs. The mask is unpacked on logits' device, so only R * W words travel.
    NOTE: apply it after every other logits processor and before temperature, top-k and top-p, so
    truncation keeps the best allowed tokens; a masked token has probability exactly 0.
    """
    num_rows = len(rows)
    if num_rows == 0:
        return
    vocab, dev = logits.shape[-1], logits.device
    words = bitmask[:num_rows].to(dev, non_blocking=True)  # [R, W]
    assert words.shape[1] * 32 >= vocab, "bitmask narrower than the vocabulary"
    bits = torch.arange(32, dtype=torch.int32, device=dev)
    blocked = ((words.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab] == 0  # [R, V]
    if num_rows == logits.shape[0] and list(rows) == list(range(num_rows)):
        logits.masked_fill_(blocked, float("-inf"))  # every row, in order: no gather or scatter
        return
    index = torch.as_tensor(rows, device=dev)
    logits[index] = logits[index].masked_fill_(blocked, float("-inf"))
