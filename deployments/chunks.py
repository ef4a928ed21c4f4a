"""OpenAI response pieces made from engine outputs: usage, log-probabilities, stream chunks.

The router (deployments/router.py) assembles responses with these; they hold no state beyond one
stream's (`StreamChunks`).
"""

from __future__ import annotations

import json
import time
from typing import Optional

from serving.protocol import (
    AnyRequest, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, CompletionChoice, CompletionChunk,
    DeltaMessage, GenerationOutput, PromptTokensDetails, TokenLogprob, Usage, unique_id,
)


def usage_of(lasts: list[GenerationOutput]) -> Usage:
    """Usage of a request from each choice's last output (the prompt is counted once)."""
    prompt = lasts[0].num_prompt_tokens
    completion = sum(out.num_output_tokens for out in lasts)
    # NOTE: prompt tokens computed by an earlier request; with n > 1 the later choices take the first
    # one's blocks, which the prompt (counted once) did not get from the cache
    cached = min(out.num_cached_tokens for out in lasts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    """OpenAI chat's `choices[].logprobs`."""
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": _token_bytes(lp.token),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": _token_bytes(t)} for t, v in lp.top]}
                        for lp in logprobs], "refusal": None}


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict:
    """OpenAI completions' `choices[].logprobs`; `offset`: where the first token's text starts in the
    choice's text. A prompt's first token (with echo) has neither log-probability nor top ones."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) if lp.logprob is not None else None for lp in logprobs],
            "text_offset": offsets}


_TEXT = "\u2063TEXT\u2063"  # a placeholder that no generated text equals


class StreamChunks:
    """One stream's OpenAI chunks, as pydantic objects (handles) or as SSE lines (HTTP).

    NOTE: the middle chunks of a stream (new text only) are most of its items; their SSE line is
    a template made once per stream with the text spliced in, not a pydantic model per item."""

    def __init__(self, request: AnyRequest, prompt_text: str = ""):
        self.request = request
        self.is_chat = isinstance(request, ChatCompletionRequest)
        self.id = unique_id("chatcmpl" if self.is_chat else "cmpl")
        self.created = int(time.time())
        self._template: Optional[tuple[str, str]] = None
        # With echo (completions): the prompt's text, sent at the start of each choice's text.
        self.prompt_text = prompt_text
        # NOTE: only a stream of one choice with nothing but text takes the template's fast path
        self.plain = (request.n == 1 and not request.return_token_ids and request.num_logprobs is None
                      and not self.prompt_text and not request.continuous_usage)
        self._offsets = [0] * request.n  # text already sent per choice (completions' text_offset)
        self.lasts: dict[int, GenerationOutput] = {}  # each finished choice's last output
        self._latest: dict[int, GenerationOutput] = {}  # each choice's newest output (continuous usage)

    def chunk(self, index: int, out: GenerationOutput, cached: bool, first: bool):
        request = self.request
        reason = out.finish_reason if out.finished else None
        if out.finished:
            self.lasts[index] = out
        usage = None
        if request.continuous_usage:
            self._latest[index] = out
            usage = usage_of(list(self._latest.values()))
        ids = out.token_ids if request.return_token_ids and not cached else None
        if self.is_chat:
            delta = DeltaMessage(role="assistant" if first else None, content=out.text)
            logprobs = chat_logprobs(out.logprobs) if out.logprobs is not None else None
            return ChatCompletionChunk(id=self.id, created=self.created, model=request.model, cached=cached,
                                       usage=usage, choices=[ChatChunkChoice(index=index, delta=delta,
                                                                             finish_reason=reason, logprobs=logprobs,
                                                                             token_ids=ids)])
        text, logprobs = out.text, out.logprobs
        if first and self.prompt_text:
            text = self.prompt_text + text
            if logprobs is not None:
                logprobs = (out.prompt_logprobs or []) + logprobs
        lp = completion_logprobs(logprobs, self._offsets[index]) if logprobs is not None else None
        self._offsets[index] += len(text)
        return CompletionChunk(id=self.id, created=self.created, model=request.model, cached=cached, usage=usage,
                               choices=[CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=lp,
                                                         token_ids=ids)])

    @property
    def all_finished(self) -> bool:
        return len(self.lasts) == self.request.n

    def usage_chunk(self, cached: bool):
        cls = ChatCompletionChunk if self.is_chat else CompletionChunk
        return cls(id=self.id, created=self.created, model=self.request.model, choices=[],
                   usage=usage_of(list(self.lasts.values())), cached=cached)

    def sse_line(self, index: int, out: GenerationOutput, cached: bool, first: bool) -> str:
        if first or out.finished or cached or not self.plain:
            return f"data: {self.chunk(index, out, cached, first).model_dump_json()}\n\n"
        if self._template is None:
            line = f"data: {self.chunk(0, GenerationOutput('', _TEXT), False, False).model_dump_json()}\n\n"
            head, _, tail = line.partition(json.dumps(_TEXT, ensure_ascii=False))
            self._template = (head, tail)
        head, tail = self._template
        return head + json.dumps(out.text, ensure_ascii=False) + tail
