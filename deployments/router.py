"""The ingress: an OpenAI-compatible HTTP API and the same API for Python handles.

(No `from __future__ import annotations` here: FastAPI must see real annotations.)

Every request goes: validate -> semantic cache (hit: answer now) -> the model's LLM server
(streaming) -> the answer, and on a finished miss an insert into the cache off the response path.
HTTP routes and `Router.generate` (for `DeploymentHandle` callers) share one async generator.
With API keys configured (serving/auth.py) every HTTP route but the health checks and
/openapi.json needs one, and the key, not the request's `user`, picks the cache tenant; HTTP
requests also meet `router.limits` (serving/limits.py). Handle callers are trusted Ray code: no key, no limits.
"""


import asyncio
import json
import logging
import os
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.auth import ApiKeys, cache_tenant, load_api_keys
from serving.config import AppConfig
from serving.heap import start_heap_trimmer
from serving.errors import AuthenticationError, ContextLengthError, ModelNotFoundError, ServingError, UnavailableError
from serving.limits import check_limits, read_body
from deployments.cache_client import CacheClient
from deployments.chunks import StreamChunks, chat_logprobs, completion_logprobs, usage_of
from deployments.openapi import operation, publish
from serving.protocol import (
    AnyRequest, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage, CompletionChoice,
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, GenerationOutput, ModelCard,
    ModelList, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse, invalid_request, request_body,
    unique_id,
)

logger = logging.getLogger("ray.serve")
# NOTE: /openapi.json is served without an API key: it describes the API and holds nothing secret
api = FastAPI(title="ray-llm-serving", docs_url=None, redoc_url=None)
publish(api)


def as_serving_error(e: BaseException, retry_after_s: float = 1.0) -> Optional[ServingError]:
    """The user-facing error inside `e`, also when it crossed a Ray handle (RayTaskError); a full
    queue of a model's replicas (Serve's back-pressure) is a 503 with Retry-After."""
    from ray.serve.exceptions import BackPressureError

    for candidate in (getattr(e, "cause", None), e):
        if isinstance(candidate, ServingError) and hasattr(candidate, "message"):
            return candidate
        if isinstance(candidate, BackPressureError):
            return UnavailableError("The model's replicas are at capacity and their queue is full; retry later.",
                                    code="overloaded", retry_after=retry_after_s)
    return None


def error_response(err: ServingError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else {}
    if isinstance(err, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: a 401 names the scheme it wants
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers or None)


def replica_died(e: BaseException) -> bool:
    """Whether `e` says that the replica serving the call died (not that it answered an error)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(e, (RayActorError, ActorUnavailableError))


class ReplicaDiedError(UnavailableError):
    def __init__(self):
        super().__init__("the model's replica failed during this request; send it again", code="replica_died",
                         retry_after=1.0)


def _router_telemetry():
    from deployments.telemetry import RouterTelemetry

    return RouterTelemetry()


DONE = "data: [DONE]\n\n"


async def _sse(first: str, rest) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them (`rest` yields finished `data:` lines; the last one
    ends with `DONE`); an error mid-stream becomes an error event, then `DONE`."""
    done = first.endswith(DONE)
    try:
        yield first
        async for line in rest:  # NOTE: to its end, also past `DONE`: the model's stream ends, not cancelled
            done = line.endswith(DONE)
            yield line
    except Exception as e:
        err = as_serving_error(e) or ServingError(f"internal error: {type(e).__name__}")
        yield f"data: {json.dumps(err.to_dict())}\n\n" + DONE
        return
    finally:
        await rest.aclose()
    if not done:  # a stream that ended without its last output
        yield DONE


class SSEResponse(StreamingResponse):
    """A stream of SSE lines whose last one (ending with `DONE`) closes the body in the same
    message: one socket write for the last chunk, the usage chunk, [DONE] and the end of the
    chunked body, where Starlette's StreamingResponse writes each separately.

    A client that goes away cancels the stream (its generators close, so the model's stream is
    cancelled and the engine aborts the sequence), as in Starlette; but one plain task listens for
    the disconnect, where Starlette runs both in an anyio task group (a group, a task and cancel
    scopes per response: about 5% of the router's CPU per 2-token request)."""

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        gone = False

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            streaming.cancel()  # NOTE: delivered at the stream's current await, inside stream_response

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone:
                raise
            streaming.uncancel()  # the client's disconnect, not a cancellation of this request
        finally:
            listener.cancel()

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for line in self.body_iterator:
            if not ended:
                ended = line.endswith(DONE)
                await send({"type": "http.response.body", "body": line.encode(), "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# NOTE: Serve pickles the ingress class by value; helpers it calls must be defined above it.
@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    def __init__(self, llm_handles: dict[str, DeploymentHandle], cache_handles: list[DeploymentHandle],
                 config: AppConfig):
        start_heap_trimmer()  # serving/heap.py: the soak's memory bar
        by_reference = config.router.handle_transport == "ray"
        self.llms = {name: h.options(_by_reference=by_reference) for name, h in llm_handles.items()}
        # NOTE: made once: `options()` (and `handle.generate`, which calls it) builds a new handle, a
        # cost on every request otherwise
        self._llm_generate = {name: h.options(stream=True, method_name="generate") for name, h in self.llms.items()}
        self._llm_choices = {name: h.options(stream=True, method_name="generate_choices")
                             for name, h in self.llms.items()}
        self.config = config
        keys = load_api_keys(config.router.api_keys_file, os.environ)
        self.api_keys = ApiKeys(keys) if keys else None  # None: keys are off
        logger.info("router: API keys %s", f"on ({len(keys)})" if keys else "off")
        self._cards: dict[str, dict] = {}
        self.telemetry = _router_telemetry()
        self.cache = CacheClient([h.options(_by_reference=by_reference) for h in cache_handles], config.cache,
                                 self.telemetry)
        # Each open request's current wait for its next output, by request: the drain ends them
        self._waits: dict[int, asyncio.Timeout] = {}
        self._shutting_down = False
        self._stop_watch: Optional[asyncio.Task] = None

    # ---- HTTP routes --------------------------------------------------------------------------

    @api.post("/v1/completions", openapi_extra=operation((CompletionRequest,), CompletionResponse, stream=True))
    async def http_completions(self, raw: Request):
        return await self._http(raw, CompletionRequest, "/v1/completions")

    @api.post("/v1/chat/completions",
              openapi_extra=operation((ChatCompletionRequest,), ChatCompletionResponse, stream=True))
    async def http_chat(self, raw: Request):
        return await self._http(raw, ChatCompletionRequest, "/v1/chat/completions")

    @api.post("/tokenize", openapi_extra=operation((TokenizeCompletionRequest, TokenizeChatRequest),
                                                   TokenizeResponse, errors=(400, 401, 404, 413)))
    async def http_tokenize(self, raw: Request):
        return await self._http(raw, None, "/tokenize")

    @api.post("/detokenize", openapi_extra=operation((DetokenizeRequest,), DetokenizeResponse,
                                                     errors=(400, 401, 404, 413)))
    async def http_detokenize(self, raw: Request):
        return await self._http(raw, DetokenizeRequest, "/detokenize")

    @api.get("/v1/models", openapi_extra=operation(response=ModelList, errors=(401,)))
    async def http_models(self, raw: Request):
        try:
            self._tenant_of_key(raw)
        except AuthenticationError as e:
            return error_response(e)
        return JSONResponse((await self.models()).model_dump())

    @api.get("/health")
    async def http_health(self):
        return {"status": "ok"}

    @api.get("/v1/health")
    async def http_v1_health(self):
        return {"status": "ok"}

    def _tenant_of_key(self, raw: Request) -> Optional[str]:
        """The tenant of the request's API key (None when keys are off); 401 without a right one."""
        if self.api_keys is None:
            return None
        return self.api_keys.tenant_of(raw.headers.get("authorization"))

    async def _http(self, raw: Request, model_cls, endpoint: str):
        status = 200
        try:
            tenant_of_key = self._tenant_of_key(raw)  # NOTE: before the body is read
            limits = self.config.router.limits
            body = request_body(await read_body(raw.stream(), raw.headers.get("content-length"),
                                                limits.max_body_bytes))
            if model_cls is None:  # /tokenize: a chat body has messages, as vLLM tells them apart
                model_cls = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
            try:
                request = model_cls.model_validate(body)
            except ValidationError as e:
                raise invalid_request(model_cls, e)
            if endpoint != "/detokenize":
                check_limits(request, limits)
            if endpoint in ("/tokenize", "/detokenize"):
                return JSONResponse(await self._tokenizer_call(request))
            tenant = cache_tenant(tenant_of_key, request.user)
            if not request.stream:
                return JSONResponse((await self._complete(request, tenant)).model_dump())
            stream = self._sse_lines(request, tenant)
            first = await stream.__anext__()  # errors before the first chunk still get a status code
            if first.endswith(DONE):  # the whole stream in its first item (a short answer, a cache hit)
                async for _ in stream:  # NOTE: the model's stream ends (nothing follows), not cancelled
                    pass
                return Response(first, media_type="text/event-stream")
            return SSEResponse(_sse(first, stream), media_type="text/event-stream")
        except Exception as e:
            err = as_serving_error(e, self.config.router.overload_retry_after_s)
            if err is None:
                logger.exception("internal error on %s", endpoint)
                err = ServingError(f"internal error: {type(e).__name__}")
            elif isinstance(err, ContextLengthError) and model_cls is CompletionRequest:
                err.param = "prompt"  # NOTE: the engine checks token counts; it does not know the field's name
            status = err.status_code
            self.telemetry.record_error(err)
            return error_response(err)
        finally:
            self.telemetry.record_http(endpoint, status)

    # ---- the Python handle API ----------------------------------------------------------------

    async def generate(self, request: AnyRequest):
        """For `DeploymentHandle` callers: the response object, or with `request.stream` (and
        `handle.options(stream=True)`) an async generator of chunk objects. Callers are trusted Ray
        code: no API key is asked and `router.limits` do not apply; the cache tenant is `user`."""
        if request.stream:
            return self._stream_chunks(request)
        return await self._complete(request, None)

    async def _tokenizer_call(self, request) -> dict:
        """/tokenize and /detokenize, answered by the model's LLM server (its tokenizer)."""
        handle = self.llms.get(request.model)
        if handle is None:
            raise ModelNotFoundError(f"The model '{request.model}' does not exist; see /v1/models.")
        if isinstance(request, DetokenizeRequest):
            return DetokenizeResponse(prompt=await handle.detokenize.remote(request.tokens)).model_dump()
        return await handle.tokenize_only.remote(request)

    async def models(self) -> ModelList:
        cards = []
        for name in self.llms:
            if name not in self._cards:
                self._cards[name] = await self.llms[name].model_card.remote()
            cards.append(ModelCard(id=name, max_model_len=self._cards[name]["max_model_len"]))
        return ModelList(data=cards)

    async def flush_cache(self, model: Optional[str] = None, tenant: Optional[str] = None) -> int:
        """Invalidates cached answers (all, one model's, or one tenant's); returns how many."""
        return await self.cache.flush(model, tenant)

    # ---- the shared path ----------------------------------------------------------------------

    async def _outputs(self, request: AnyRequest,
                       tenant: Optional[str]) -> AsyncIterator[tuple[int, GenerationOutput, bool]]:
        """(choice index, output, cached): one from the cache on a hit, else the model's stream(s).
        `tenant` partitions the cache (serving/auth.py `cache_tenant`; None: the request's `user`)."""
        handle = self._llm_generate.get(request.model)
        if handle is None:
            raise ModelNotFoundError(f"The model '{request.model}' does not exist; see /v1/models.")
        if request.n > 1:
            async for item in self._choices(request):
                yield item
            return
        lookup = self.cache.lookup_args(request, tenant)
        if lookup is not None and lookup[2].read:
            hit = await self.cache.lookup(lookup[0], lookup[1])
            if hit is not None:
                a = hit.answer
                yield 0, GenerationOutput(request_id="", text=a.text, finished=True, finish_reason=a.finish_reason,
                                       num_prompt_tokens=a.num_prompt_tokens,
                                       num_output_tokens=a.num_output_tokens), True
                return
        texts = []
        for attempt in (0, 1):
            try:
                async for out in handle.remote(request, unique_id("req")):
                    texts.append(out.text)
                    if out.finished and lookup is not None and lookup[2].write and out.finish_reason != "abort":
                        self.cache.insert_later(lookup, "".join(texts), out)
                    yield 0, out, False
                return
            except Exception as e:
                if not replica_died(e):
                    raise
                if texts or attempt:
                    raise ReplicaDiedError() from e
                # nothing was sent: the same request once more, on a live replica (Serve has dropped
                # the dead one from its routing)
                logger.warning("LLM replica of '%s' died before its first output; retrying once", request.model)

    async def _choices(self, request: AnyRequest):
        """n > 1: all choices go to one LLM replica (`LLMServer.generate_choices`), where they are
        sequences of one engine sharing the prompt's KV blocks. The cache is neither read nor
        written."""
        try:
            async for index, out in self._llm_choices[request.model].remote(request, unique_id("req")):
                yield index, out, False
        except Exception as e:
            if replica_died(e):
                raise ReplicaDiedError() from e
            raise  # NOTE: the choice's own error (a 400 stays a 400), not a dead replica

    async def _prompt_text(self, request: AnyRequest) -> str:
        """The prompt's text for `echo` (completions), else ""."""
        if not isinstance(request, CompletionRequest) or not request.echo:
            return ""
        if isinstance(request.prompt, str):
            return request.prompt
        handle = self.llms.get(request.model)
        if handle is None:
            raise ModelNotFoundError(f"The model '{request.model}' does not exist; see /v1/models.")
        return await handle.detokenize.remote(request.prompt, param="prompt")

    async def _gather(self, request: AnyRequest, tenant: Optional[str]):
        """A whole answer: per choice its texts, token ids, log-probabilities, prompt log-probabilities
        and last output, and whether it came from the cache."""
        n = request.n
        texts, ids, logprobs = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        lasts: list[Optional[GenerationOutput]] = [None] * n
        prompt_logprobs: list[list] = [[] for _ in range(n)]
        cached = False
        async for i, out, cached in self._with_timeout(request, tenant):
            texts[i].append(out.text)
            ids[i].extend(out.token_ids)
            if out.logprobs is not None:
                logprobs[i].extend(out.logprobs)
            if out.prompt_logprobs is not None:
                prompt_logprobs[i] = out.prompt_logprobs
            lasts[i] = out
        return texts, ids, logprobs, prompt_logprobs, lasts, cached

    async def _complete(self, request: AnyRequest,
                        tenant: Optional[str]) -> Union[CompletionResponse, ChatCompletionResponse]:
        prompt_text = await self._prompt_text(request)
        try:
            texts, ids, logprobs, prompt_logprobs, lasts, cached = await self._gather(request, tenant)
        except ReplicaDiedError:
            # NOTE: not streamed, so the client has seen nothing yet: the whole request once more
            logger.warning("LLM replica of '%s' died mid-request; retrying it once", request.model)
            texts, ids, logprobs, prompt_logprobs, lasts, cached = await self._gather(request, tenant)
        n = request.n
        usage = usage_of(lasts)
        asked = request.num_logprobs is not None
        choices = []
        for i in range(n):
            text = "".join(texts[i])
            token_ids = ids[i] if request.return_token_ids and not cached else None
            if isinstance(request, ChatCompletionRequest):
                choices.append(ChatChoice(index=i, message=ChatResponseMessage(content=text),
                                          finish_reason=lasts[i].finish_reason, token_ids=token_ids,
                                          logprobs=chat_logprobs(logprobs[i]) if asked else None))
            else:
                lp = completion_logprobs(prompt_logprobs[i] + logprobs[i], 0) if asked else None
                choices.append(CompletionChoice(index=i, text=prompt_text + text, finish_reason=lasts[i].finish_reason,
                                                logprobs=lp, token_ids=token_ids))
        cls = ChatCompletionResponse if isinstance(request, ChatCompletionRequest) else CompletionResponse
        return cls(model=request.model, usage=usage, cached=cached, choices=choices)

    async def _stream_chunks(self, request: AnyRequest):
        """OpenAI stream chunks; each choice's last carries its finish_reason, then (if asked) one usage chunk."""
        chunks = StreamChunks(request, await self._prompt_text(request))
        async for i, out, cached, first in self._stream_items(request, None):
            yield chunks.chunk(i, out, cached, first)
            if out.finished and chunks.all_finished and request.include_usage:
                yield chunks.usage_chunk(cached)

    async def _sse_lines(self, request: AnyRequest, tenant: Optional[str]):
        """The same chunks as `_stream_chunks`, as SSE `data:` lines; the last ends with `DONE`."""
        chunks = StreamChunks(request, await self._prompt_text(request))
        async for i, out, cached, first in self._stream_items(request, tenant):
            line = chunks.sse_line(i, out, cached, first)
            if out.finished and chunks.all_finished:  # the last line: one write with what follows it
                if request.include_usage:
                    line += f"data: {chunks.usage_chunk(cached).model_dump_json()}\n\n"
                line += DONE
            yield line

    async def _stream_items(self, request: AnyRequest, tenant: Optional[str]):
        """(choice index, output, cached, first) for every output a stream sends: an empty middle one
        is not, unless it carries token ids or log-probabilities that were asked for."""
        started = [False] * request.n
        bare = not request.return_token_ids and request.num_logprobs is None
        async for i, out, cached in self._with_timeout(request, tenant):
            if not out.text and not out.finished and started[i] and bare:
                continue
            yield i, out, cached, not started[i]
            started[i] = True

    async def _with_timeout(self, request: AnyRequest, tenant: Optional[str]):
        """The outputs, with a bound on the wait for each one (never a hung request). Once this
        replica stops and its drain timeout has passed, the wait ends with 503 `shutting_down`."""
        if self._stop_watch is None:  # NOTE: here, not in __init__: an event loop runs now
            self._stop_watch = asyncio.get_running_loop().create_task(self._drain_when_stopped())
        gen = self._outputs(request, tenant)
        timeout = self.config.router.request_timeout_s
        key = id(gen)
        try:
            while True:
                if self._shutting_down:
                    raise self._shutdown_error()
                try:
                    async with asyncio.timeout(timeout) as wait:  # no task per item, unlike wait_for
                        self._waits[key] = wait
                        item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if self._shutting_down:
                        raise self._shutdown_error()
                    raise UnavailableError(f"no output from the model within {timeout:.0f} s")
                yield item
        finally:
            self._waits.pop(key, None)
            await gen.aclose()

    def _shutdown_error(self) -> UnavailableError:
        return UnavailableError(
            f"this router is shutting down (a redeploy or a scale-down) and the request did not finish within "
            f"{self.config.router_shutdown.drain_timeout_s:.0f} s; retry it", code="shutting_down", retry_after=1.0)

    async def _drain_when_stopped(self) -> None:
        """Once Serve stops this replica, its open requests run for up to its drain timeout
        (`AppConfig.router_shutdown`: longer than the LLM servers', whose clean 503s come through
        first); then each ends with a 503 (an error event, then [DONE], for a stream) before Serve
        kills the replica, instead of a stream cut mid-body. Such a request is one the old router
        had routed to a *new* LLM replica."""
        from deployments.stopping import wait_until_stopping

        stop = self.config.router_shutdown
        period = stop.graceful_shutdown_wait_loop_s
        await wait_until_stopping(period, lambda: bool(self._waits))
        timeout = stop.drain_timeout_s
        logger.info("router stopping: %d requests open, draining for up to %.0f s", len(self._waits), timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._waits and loop.time() < deadline:
            await asyncio.sleep(min(period, 0.25))
        self._shutting_down = True
        ended = len(self._waits)
        for wait in list(self._waits.values()):
            try:
                wait.reschedule(loop.time())
            except RuntimeError:  # between two outputs: the next wait sees `_shutting_down`
                pass
        logger.info("router stopping: drained; %d requests ended unfinished", ended)

