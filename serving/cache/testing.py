"""A model-free stand-in encoder for tests and benchmarks: bag-of-words hashing.

Like a real sentence embedding it scores reordered words ("string to integer" vs "integer to
string") at 1.0, which is what the verifier exists for.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from serving.cache.embedder import Encoded


def hashing_encoder(dim: int = 64):
    """encode(texts) -> `Encoded`: [n, dim] unit-norm float32, deterministic across processes, and
    each word's own hashed vector as its word vector (so only identical words align)."""

    def vector(word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)

    def encode(texts: list[str]) -> Encoded:
        out = np.zeros((len(texts), dim), dtype=np.float32)
        words = []
        for i, text in enumerate(texts):
            words.append({})
            for word in re.findall(r"\w+", text.lower()):
                v = vector(word)
                out[i] += v
                words[-1][word] = (v / np.linalg.norm(v)).astype(np.float16)
            norm = np.linalg.norm(out[i])
            out[i] = out[i] / norm if norm > 0 else vector("<empty>") / np.linalg.norm(vector("<empty>"))
        return Encoded(out, words)

    return encode
