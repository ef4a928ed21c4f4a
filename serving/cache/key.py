"""The cache key: what must be equal for two requests to share an answer.

The key is a hard partition: a cached answer is served only to a request with an equal key (same
model, request kind, tenant, output-changing sampling parameters and conversation context). Within a
partition, the prompt text (`cache_query_text`) is matched by meaning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Union

from serving.protocol import ChatCompletionRequest, CompletionRequest

Request = Union[CompletionRequest, ChatCompletionRequest]


@dataclass(frozen=True)
class CacheKey:
    """Hashable, picklable partition key. `context` is a digest of the conversation before the last
    user turn (chat) or "" (completion), so the key stays small however long the history is."""

    model: str
    kind: str  # "chat" | "completion"
    tenant: str
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    max_tokens: Optional[int]
    stop: tuple[str, ...]
    context: str
    digest: str = field(default="", compare=False, repr=False)

    def __post_init__(self):
        # NOTE: the digest is derived from every other field; it is excluded from __eq__/__hash__
        # because it adds nothing to them.
        if not self.digest:
            object.__setattr__(self, "digest", _digest(self.fields()))

    def fields(self) -> dict:
        """The key as a plain JSON-able dict (without the digest); `CacheKey(**d)` rebuilds it."""
        return {"model": self.model, "kind": self.kind, "tenant": self.tenant,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "max_tokens": self.max_tokens, "stop": list(self.stop),
                "context": self.context}

    @classmethod
    def from_fields(cls, d: dict) -> "CacheKey":
        d = dict(d)
        d["stop"] = tuple(d.get("stop") or ())
        return cls(**d)


@dataclass(frozen=True)
class CachePolicy:
    """Whether this request may be answered from the cache (`read`) and its answer stored (`write`)."""

    read: bool
    write: bool


def _digest(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _context_digest(request: Request) -> str:
    if isinstance(request, CompletionRequest):
        return ""
    messages = request.messages
    last_user = _last_user_index(request)
    # Everything except the last user message: system prompt, earlier turns, and anything after it.
    ctx = [[m.role, m.name or "", m.text] for i, m in enumerate(messages) if i != last_user]
    return _digest({"messages": ctx}) if ctx else ""


def _last_user_index(request: ChatCompletionRequest) -> Optional[int]:
    for i in range(len(request.messages) - 1, -1, -1):
        if request.messages[i].role == "user":
            return i
    return None


def build_cache_key(request: Request, model_id: str, tenant: Optional[str] = None) -> CacheKey:
    """The hard partition of `request` when served by `model_id`, for `tenant` (None: the request's
    `user`, or ""; with API keys on the router passes the key's tenant, serving/auth.py).

    Sampling parameters that change the output are part of the key; `stream`, `stream_options`,
    `user`-independent extensions like `cache` are not. `max_tokens=None` stays None (the server's
    default then applies equally to every request with the same key).
    """
    return CacheKey(
        model=model_id,
        kind="chat" if isinstance(request, ChatCompletionRequest) else "completion",
        tenant=(request.user or "") if tenant is None else tenant,
        temperature=float(request.temperature),
        top_p=float(request.top_p),
        top_k=int(request.top_k),
        seed=request.seed,
        max_tokens=request.max_tokens,
        stop=tuple(request.stop_list),
        context=_context_digest(request),
    )


def cache_query_text(request: Request) -> Optional[str]:
    """The text that is embedded and compared: the last user message (chat) or the prompt
    (completion). None means "not cacheable": a token-id prompt, or a chat without a user turn."""
    if isinstance(request, CompletionRequest):
        return request.prompt if isinstance(request.prompt, str) else None
    i = _last_user_index(request)
    return None if i is None else request.messages[i].text


def cache_policy(request: Request) -> CachePolicy:
    """Read/write permission from the request's `cache` field and its temperature.

    A sampled request (temperature > 0) is neither served from nor stored in the cache unless it
    sets `cache.allow_sampled`; `cache.skip` disables reading, `cache.no_store` disables writing.
    """
    ctl = request.cache
    sampled_ok = request.temperature == 0.0 or bool(ctl and ctl.allow_sampled)
    read = sampled_ok and not (ctl and ctl.skip)
    write = sampled_ok and not (ctl and ctl.no_store)
    return CachePolicy(read=read, write=write)


def partition_of(key: CacheKey, num_partitions: int) -> int:
    """Stable partition index of `key` in [0, num_partitions): the same on every process and run
    (a sha256 digest, not Python's salted `hash`)."""
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    return int(key.digest[:16], 16) % num_partitions
