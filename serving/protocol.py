"""OpenAI-compatible request and response models.

The same pydantic types travel over HTTP (validated by the router) and through Serve
deployment handles, so a Python caller and an HTTP caller see one API.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from serving.errors import InvalidRequestError
from serving.structured import JsonSpec, parse_response_format


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
    continuous_usage_stats: bool = False  # vLLM's extension: every chunk carries the usage so far


class ParamError(ValueError):
    """A request field's value is invalid; `param` names the field (the error body's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def request_body(raw: bytes) -> dict:
    """The JSON object an HTTP request's body holds; an `InvalidRequestError` for anything else."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    # NOTE: JSON can hold half a surrogate pair ("\ud800", or its raw bytes, which json.loads lets
    # through), and no UTF-8 text can: the tokenizer, and the error body that echoes it, would fail.
    # Only a body with an escape or such bytes can hold one; only that body is encoded to check.
    if b"\\u" in raw or b"\xed" in raw:
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequestError("the request body holds a lone surrogate, which is not Unicode text") from None
    return body


def invalid_request(model: type[BaseModel], e: ValidationError) -> InvalidRequestError:
    """The 400 for a body that `model` rejected, naming the parameter as a dotted field path."""
    # NOTE: each member of a union reports its error; the deepest went furthest into the input
    error = max(e.errors(), key=lambda err: len(err.get("loc", ())))
    cause = error.get("ctx", {}).get("error")
    param = cause.param if isinstance(cause, ParamError) else _field_path(model, error)
    return InvalidRequestError(f"{error.get('msg', 'invalid request')} (param: {param})", param=param)


def _field_path(model: type[BaseModel], error: dict) -> Optional[str]:
    """`messages.content` for an error at ("messages", 0, "content", "str"): list indices, dict keys
    and a union member's tag (`str`, `list[int]`) are no fields; an unknown field is named."""
    names = []
    for part in error.get("loc", ()):
        fields = getattr(model, "model_fields", None) or {}
        if part in fields:
            names.append(part)
            model = _model_in(fields[part].annotation)
    if error.get("type") == "extra_forbidden" and error.get("loc"):
        names.append(str(error["loc"][-1]))
    return ".".join(names) or None


def _model_in(annotation) -> Optional[type[BaseModel]]:
    """The pydantic model inside a field's type (`Optional[list[ChatMessage]]` -> ChatMessage), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


# Parameters OpenAI defines that we accept only at a neutral value (None always is); anything else is a 400.
_NEUTRAL: dict[str, tuple] = {
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),  # meaningless without tools
    "functions": ([],),
    "function_call": ("none",),
}

# Output-changing parameters beyond the core ones, at their defaults: a request that sets any of
# them is neither read from nor written to the semantic cache (its key does not hold them).
_EXTENSION_DEFAULTS: dict[str, Any] = {
    "n": 1, "echo": False, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "logit_bias": None, "ignore_eos": False, "min_tokens": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "stop_token_ids": None, "include_stop_str_in_output": False,
    "skip_special_tokens": True,
}

TokenId = Annotated[int, Field(ge=0)]  # and below the model's vocabulary size, which the engine checks
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # top log-probabilities per token (vLLM's default limit; OpenAI's is 20 for chat)


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
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[int, float]] = None  # token id (a JSON string key) -> bias in [-100, 100]
    # Extensions, as vLLM takes them in the body.
    return_token_ids: bool = False  # the generated token ids with each choice
    ignore_eos: bool = False  # do not stop at the model's EOS token
    min_tokens: int = Field(default=0, ge=0)  # no EOS, stop token or stop string before this many tokens
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    stop_token_ids: Optional[list[TokenId]] = None  # more tokens that end the output (not in its text)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output (serving/structured): text, json_object or json_schema; validated into _json_spec.
    response_format: Optional[dict] = None
    _json_spec: Optional[JsonSpec] = PrivateAttr(default=None)
    # Accepted only at their neutral values (see _NEUTRAL).
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Optional[Any] = None

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, v):
        return 1 if v is None else v  # the openai client may send "n": null

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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v and any(not -100.0 <= b <= 100.0 for b in v.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        return v

    @model_validator(mode="after")
    def _neutral_only(self):
        for name, neutral in self._neutral().items():
            value = getattr(self, name)
            if value is None or any(value == v and type(value) is type(v) or
                                    (isinstance(v, float) and isinstance(value, (int, float)) and value == v)
                                    for v in neutral):
                continue
            raise ParamError(name, f"parameter '{name}'={value!r} is not supported "
                                   f"(only {' or '.join(map(repr, neutral))})")
        try:
            self._json_spec = parse_response_format(self.response_format)
        except ValueError as e:
            raise ParamError("response_format", str(e)) from None
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                                           f"({self.max_tokens})")
        return self

    @classmethod
    def _neutral(cls) -> dict[str, tuple]:
        return _NEUTRAL

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def uses_extensions(self) -> bool:
        """Sets an output-changing parameter that the semantic cache's key does not hold."""
        return self.num_logprobs is not None or self.json_spec is not None or any(
            getattr(self, name) not in (None, default) for name, default in _EXTENSION_DEFAULTS.items())

    @property
    def json_spec(self) -> Optional[JsonSpec]:
        """The JSON the output must be (`response_format`); None: free text."""
        return self._json_spec

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((self.logit_bias or {}).items())

    @property
    def num_logprobs(self) -> Optional[int]:
        """Top log-probabilities per generated token (0: the token's own only); None: none asked."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        """The same for the prompt's tokens (completions with `echo`); None: none asked."""
        return None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[TokenId]]
    echo: bool = False  # the prompt before the completion (and its tokens' log-probabilities)
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        return self.logprobs if self.echo else None


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextContentPart]]
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in v):
            raise ValueError("only text content parts are supported")  # clearer than the union's errors
        return v

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None  # vLLM's chat echo: not supported

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v):
        return False if v is None else v

    @model_validator(mode="after")
    def _max_tokens_and_logprobs(self):
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @classmethod
    def _neutral(cls) -> dict[str, tuple]:
        return {**_NEUTRAL, "echo": (False,)}

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


AnyRequest = Union[CompletionRequest, ChatCompletionRequest]


class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize for a prompt."""

    model: str
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """vLLM's /tokenize for a conversation: its chat template applied, as the chat endpoint does."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Strict):
    model: str
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens not computed again: their KV blocks were shared


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


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
class TokenLogprob:
    """One token's log-probability under the model, and the most likely tokens at its position."""

    token: str
    logprob: Optional[float]  # None for a prompt's first token (nothing predicts it)
    top: list[tuple[str, float]] = field(default_factory=list)  # best first


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
    logprobs: Optional[list[TokenLogprob]] = None  # one per new token id, when asked
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # on the first output, when asked
    num_cached_tokens: int = 0  # prompt tokens whose KV blocks came from the prefix cache


def merge_outputs(outs: list[GenerationOutput]) -> GenerationOutput:
    """One request's consecutive outputs as one item: their texts, token ids and log-probabilities
    joined, the last one's state; the prompt log-probabilities (sent once) kept."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    logprobs = None if last.logprobs is None else [lp for o in outs for lp in o.logprobs or ()]
    prompt_logprobs = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
    return GenerationOutput(last.request_id, "".join(o.text for o in outs), [t for o in outs for t in o.token_ids],
                            last.finished, last.finish_reason, last.num_prompt_tokens, last.num_output_tokens,
                            logprobs, prompt_logprobs, last.num_cached_tokens)
