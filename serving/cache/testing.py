"""A model-free stand-in encoder for tests and benchmarks: bag-of-words hashing.

Like a real sentence embedding it scores reordered words ("string to integer" vs "integer to
string") at 1.0, which is what the second check exists for.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np


def hashing_encoder(dim: int = 64):
    """encode(texts) -> [n, dim] unit-norm float32, deterministic across processes."""

    def vector(word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)

    def encode(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i] += vector(word)
            norm = np.linalg.norm(out[i])
            out[i] = out[i] / norm if norm > 0 else vector("<empty>") / np.linalg.norm(vector("<empty>"))
        return out

    return encode
