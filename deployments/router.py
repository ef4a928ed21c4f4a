"""The ingress: an OpenAI-compatible HTTP API and the same API for Python handles.

(No `from __future__ import annotations` here: FastAPI must see real annotations.)

Every request goes: validate -> semantic cache (hit: answer now) -> the model's LLM server
(streaming) -> the answer, and on a finished miss an insert into the cache off the response path.
HTTP routes and `Router.generate` (for `DeploymentHandle` callers) share one async generator.
"""


import asyncio
import json
import logging
import time
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.config import AppConfig
from serving.errors import InvalidRequestError, ModelNotFoundError, ServingError, UnavailableError
from serving.protocol import (
    AnyRequest, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatResponseMessage, CompletionChoice, CompletionChunk, CompletionRequest,
    CompletionResponse, DeltaMessage, GenerationOutput, ModelCard, ModelList, Usage, unique_id,
)

logger = logging.getLogger("ray.serve")
api = FastAPI(title="ray-llm-serving", docs_url=None, redoc_url=None)


def as_serving_error(e: BaseException) -> Optional[ServingError]:
    """The user-facing error inside `e`, also when it crossed a Ray handle (RayTaskError)."""
    for candidate in (getattr(e, "cause", None), e):
        if isinstance(candidate, ServingError) and hasattr(candidate, "message"):
            return candidate
    return None


def error_response(err: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else None
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers)


def _validation_error(e: ValidationError) -> InvalidRequestError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or None
    return InvalidRequestError(f"{first.get('msg', 'invalid request')} (param: {param})", param=param)


def _router_telemetry():
    from deployments.telemetry import RouterTelemetry

    return RouterTelemetry()


def _usage(out: GenerationOutput) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                 total_tokens=out.num_prompt_tokens + out.num_output_tokens)


async def _sse(first: str, rest) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them (`rest` yields finished `data:` lines), ending with
    `data: [DONE]`; an error mid-stream becomes an error event."""
    try:
        yield first
        async for line in rest:
            yield line
    except Exception as e:
        err = as_serving_error(e) or ServingError(f"internal error: {type(e).__name__}")
        yield f"data: {json.dumps(err.to_dict())}\n\n"
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


_TEXT = "\u2063TEXT\u2063"  # a placeholder that no generated text equals


class _Chunks:
    """One stream's OpenAI chunks, as pydantic objects (handles) or as SSE lines (HTTP).

    NOTE: the middle chunks of a stream (new text only) are most of its items; their SSE line is
    a template made once per stream with the text spliced in, not a pydantic model per item."""

    def __init__(self, request: AnyRequest):
        self.request = request
        self.is_chat = isinstance(request, ChatCompletionRequest)
        self.id = unique_id("chatcmpl" if self.is_chat else "cmpl")
        self.created = int(time.time())
        self._template: Optional[tuple[str, str]] = None

    def chunk(self, out: GenerationOutput, cached: bool, first: bool):
        request = self.request
        reason = out.finish_reason if out.finished else None
        ids = out.token_ids if request.return_token_ids and not cached else None
        if self.is_chat:
            delta = DeltaMessage(role="assistant" if first else None, content=out.text)
            return ChatCompletionChunk(id=self.id, created=self.created, model=request.model, cached=cached,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=reason, token_ids=ids)])
        return CompletionChunk(id=self.id, created=self.created, model=request.model, cached=cached,
                               choices=[CompletionChoice(text=out.text, finish_reason=reason, token_ids=ids)])

    def usage_chunk(self, out: GenerationOutput, cached: bool):
        cls = ChatCompletionChunk if self.is_chat else CompletionChunk
        return cls(id=self.id, created=self.created, model=self.request.model, choices=[], usage=_usage(out),
                   cached=cached)

    def sse_line(self, out: GenerationOutput, cached: bool, first: bool) -> str:
        if first or out.finished or cached or self.request.return_token_ids:
            return f"data: {self.chunk(out, cached, first).model_dump_json()}\n\n"
        if self._template is None:
            line = f"data: {self.chunk(GenerationOutput('', _TEXT), False, False).model_dump_json()}\n\n"
            head, _, tail = line.partition(json.dumps(_TEXT, ensure_ascii=False))
            self._template = (head, tail)
        head, tail = self._template
        return head + json.dumps(out.text, ensure_ascii=False) + tail


# NOTE: Serve pickles the ingress class by value; helpers it calls must be defined above it.
@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    def __init__(self, llm_handles: dict[str, DeploymentHandle], cache_handles: list[DeploymentHandle],
                 config: AppConfig):
        by_reference = config.router.handle_transport == "ray"
        self.llms = {name: h.options(_by_reference=by_reference) for name, h in llm_handles.items()}
        # NOTE: made once: `options()` builds a new handle, a cost on every request otherwise
        self._llm_streams = {name: h.options(stream=True) for name, h in self.llms.items()}
        self.caches = [h.options(_by_reference=by_reference) for h in cache_handles]
        self.config = config
        self._cards: dict[str, dict] = {}
        self._background: set[asyncio.Task] = set()
        self.telemetry = _router_telemetry()

    # ---- HTTP routes --------------------------------------------------------------------------

    @api.post("/v1/completions")
    async def http_completions(self, raw: Request):
        return await self._http(raw, CompletionRequest, "/v1/completions")

    @api.post("/v1/chat/completions")
    async def http_chat(self, raw: Request):
        return await self._http(raw, ChatCompletionRequest, "/v1/chat/completions")

    @api.get("/v1/models")
    async def http_models(self):
        return JSONResponse((await self.models()).model_dump())

    @api.get("/health")
    async def http_health(self):
        return {"status": "ok"}

    @api.get("/v1/health")
    async def http_v1_health(self):
        return {"status": "ok"}

    async def _http(self, raw: Request, model_cls, endpoint: str):
        status = 200
        try:
            try:
                body = await raw.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InvalidRequestError("the request body is not valid JSON")
            if not isinstance(body, dict):
                raise InvalidRequestError("the request body must be a JSON object")
            try:
                request = model_cls.model_validate(body)
            except ValidationError as e:
                raise _validation_error(e)
            if not request.stream:
                return JSONResponse((await self._complete(request)).model_dump())
            stream = self._sse_lines(request)
            first = await stream.__anext__()  # errors before the first chunk still get a status code
            return StreamingResponse(_sse(first, stream), media_type="text/event-stream")
        except Exception as e:
            err = as_serving_error(e)
            if err is None:
                logger.exception("internal error on %s", endpoint)
                err = ServingError(f"internal error: {type(e).__name__}")
            status = err.status_code
            self.telemetry.record_error(err)
            return error_response(err)
        finally:
            self.telemetry.record_http(endpoint, status)

    # ---- the Python handle API ----------------------------------------------------------------

    async def generate(self, request: AnyRequest):
        """For `DeploymentHandle` callers: the response object, or with `request.stream` (and
        `handle.options(stream=True)`) an async generator of chunk objects."""
        if request.stream:
            return self._stream_chunks(request)
        return await self._complete(request)

    async def models(self) -> ModelList:
        cards = []
        for name in self.llms:
            if name not in self._cards:
                self._cards[name] = await self.llms[name].model_card.remote()
            cards.append(ModelCard(id=name, max_model_len=self._cards[name]["max_model_len"]))
        return ModelList(data=cards)

    async def flush_cache(self, model: Optional[str] = None, tenant: Optional[str] = None) -> int:
        """Invalidates cached answers (all, one model's, or one tenant's); returns how many."""
        counts = await asyncio.gather(*(c.flush.remote(model, tenant) for c in self.caches))
        return sum(counts)

    # ---- the shared path ----------------------------------------------------------------------

    async def _outputs(self, request: AnyRequest) -> AsyncIterator[tuple[GenerationOutput, bool]]:
        """(output, cached) pairs: one from the cache on a hit, else the model's stream."""
        handle = self._llm_streams.get(request.model)
        if handle is None:
            raise ModelNotFoundError(f"The model '{request.model}' does not exist; see /v1/models.")
        lookup = self._cache_lookup_args(request)
        if lookup is not None and lookup[2].read:
            hit = await self._cache_for(lookup[0]).lookup.remote(lookup[0], lookup[1])
            if hit is not None:
                a = hit.answer
                yield GenerationOutput(request_id="", text=a.text, finished=True, finish_reason=a.finish_reason,
                                       num_prompt_tokens=a.num_prompt_tokens,
                                       num_output_tokens=a.num_output_tokens), True
                return
        request_id = unique_id("req")
        stream = handle.generate.remote(request, request_id)
        texts = []
        async for out in stream:
            texts.append(out.text)
            yield out, False
            if out.finished and lookup is not None and lookup[2].write and out.finish_reason != "abort":
                self._insert_later(lookup, "".join(texts), out)

    def _cache_lookup_args(self, request: AnyRequest):
        """(key, query text, policy) when the cache may be read or written for `request`, else None."""
        if not self.caches or not self.config.cache.enabled:
            return None
        from serving.cache.key import build_cache_key, cache_policy, cache_query_text

        query = cache_query_text(request)
        if query is None:
            return None
        policy = cache_policy(request)
        if not (policy.read or policy.write):
            return None
        return build_cache_key(request, request.model), query, policy

    def _cache_for(self, key) -> DeploymentHandle:
        from serving.cache.key import partition_of

        return self.caches[partition_of(key, len(self.caches))]

    def _insert_later(self, lookup, text: str, last: GenerationOutput) -> None:
        from serving.cache.types import CachedAnswer

        key, query = lookup[0], lookup[1]
        answer = CachedAnswer(text=text, finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
                              num_output_tokens=last.num_output_tokens)

        async def insert():
            try:
                await self._cache_for(key).insert.remote(key, query, answer)
            except Exception:
                logger.exception("cache insert failed")

        task = asyncio.get_running_loop().create_task(insert())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _complete(self, request: AnyRequest) -> Union[CompletionResponse, ChatCompletionResponse]:
        texts, ids, last, cached = [], [], None, False
        async for out, cached in self._with_timeout(request):
            texts.append(out.text)
            ids.extend(out.token_ids)
            last = out
        usage = _usage(last)
        text = "".join(texts)
        token_ids = ids if request.return_token_ids and not cached else None
        if isinstance(request, ChatCompletionRequest):
            return ChatCompletionResponse(model=request.model, usage=usage, cached=cached, choices=[
                ChatChoice(message=ChatResponseMessage(content=text), finish_reason=last.finish_reason,
                           token_ids=token_ids)])
        return CompletionResponse(model=request.model, usage=usage, cached=cached, choices=[
            CompletionChoice(text=text, finish_reason=last.finish_reason, token_ids=token_ids)])

    async def _stream_chunks(self, request: AnyRequest):
        """OpenAI stream chunks; the last carries finish_reason, then (if asked) a usage chunk."""
        chunks = _Chunks(request)
        async for out, cached, first in self._stream_items(request):
            yield chunks.chunk(out, cached, first)
            if out.finished and request.include_usage:
                yield chunks.usage_chunk(out, cached)

    async def _sse_lines(self, request: AnyRequest):
        """The same chunks as `_stream_chunks`, as SSE `data:` lines."""
        chunks = _Chunks(request)
        async for out, cached, first in self._stream_items(request):
            yield chunks.sse_line(out, cached, first)
            if out.finished and request.include_usage:
                yield f"data: {chunks.usage_chunk(out, cached).model_dump_json()}\n\n"

    async def _stream_items(self, request: AnyRequest):
        """(output, cached, first) for every output a stream sends (an empty middle one is not)."""
        first = True
        async for out, cached in self._with_timeout(request):
            if not out.text and not out.finished and not first and not request.return_token_ids:
                continue
            yield out, cached, first
            first = False

    async def _with_timeout(self, request: AnyRequest):
        """The outputs, with a bound on the wait for each one (never a hung request)."""
        gen = self._outputs(request)
        timeout = self.config.router.request_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):  # no task per item, unlike wait_for
                        item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise UnavailableError(f"no output from the model within {timeout:.0f} s")
                yield item
        finally:
            await gen.aclose()

