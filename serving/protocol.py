"""OpenAI-compatible request and response models.

The same pydantic types travel over HTTP (validated by the router) and through Serve
deployment handles, so a Python caller and an HTTP caller see one API.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


_ID_PREFIX = uuid.uuid4().hex[:12]  # random per process
_id_counter = itertools.count()


def unique_id(prefix: str) -> str:
    """`prefix-` and 24 hex digits: a random per-process part and a counter. Unique across
    processes (48 random bits each) and cheap: no os.urandom call per request."""
    return f"{prefix}-{_ID_PREFIX}{next(_id_counter):012x}"


class _Strict(BaseModel):
    # NOTE: unknown fields are an error, never silently ignored (an unsupported parameter -> 400).
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Strict):
    """Per-request semantic-cache control, sent by the openai client as `extra_body={"cache": {...}}`."""

    skip: bool = False  # do not read the cache for this request
    no_store: bool = False  # do not store this answer
    allow_sampled: bool = False  # a temperature > 0 request may be served from / stored in the cache


class StreamOptions(_Strict):
    include_usage: bool = False


# Parameters OpenAI defines that we accept only at a neutral value (None always is); anything else is a 400.
_NEUTRAL: dict[str, tuple] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "frequency_penalty": (0.0,),
    "presence_penalty": (0.0,),
    "logprobs": (False,),  # chat: a bool (default false); completions: an int
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True, False),  # meaningless without tools
    "functions": ([],),
    "function_call": ("none",),
}


class _SamplingFields(_Strict):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    cache: Optional[CacheControl] = None
    # Extension (as in vLLM): return the generated token ids with each choice.
    return_token_ids: bool = False
    # Accepted only at their neutral values (see _NEUTRAL).
    n: Optional[int] = 1
    best_of: Optional[int] = None
    echo: Optional[bool] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[Any] = None
    top_logprobs: Optional[int] = None
    logit_bias: Optional[dict] = None
    suffix: Optional[str] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Optional[Any] = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k must be -1 (disabled) or a positive integer")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are supported")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral_only(self):
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name)
            if value is None or any(value == v and type(value) is type(v) or
                                    (isinstance(v, float) and isinstance(value, (int, float)) and value == v)
                                    for v in neutral):
                continue
            raise ValueError(f"parameter '{name}'={value!r} is not supported (only {' or '.join(map(repr, neutral))})")
        return self

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int]]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _messages(self):
        for m in self.messages:
            _ = m.text  # raises for non-text parts
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


AnyRequest = Union[CompletionRequest, ChatCompletionRequest]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    logprobs: Optional[Any] = None
    token_ids: Optional[list[int]] = None  # with return_token_ids


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: unique_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    cached: bool = False  # extension: answered by the semantic cache


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    logprobs: Optional[Any] = None
    token_ids: Optional[list[int]] = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: unique_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None
    cached: bool = False


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    logprobs: Optional[Any] = None
    token_ids: Optional[list[int]] = None  # with return_token_ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    cached: bool = False


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    cached: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "serving"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


@dataclass(slots=True)
class GenerationOutput:
    """One stream item of a generation, as the LLM server yields it (engine-level, not OpenAI).

    NOTE: a slotted dataclass, not a pydantic model: one is made per sequence per step and pickled
    once per item per Serve hop; this is the serving path's hot loop."""

    request_id: str
    text: str  # new text since the previous output (never a partial UTF-8 character)
    token_ids: list[int] = field(default_factory=list)  # new token ids
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop", "length" or "abort" once finished
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
