"""Load generation against an OpenAI-compatible `/v1/completions` endpoint.

Every request is a streaming completion (`stream=True`, `stream_options.include_usage`) at
temperature 0 with the workload's max_tokens. Timings are taken on the client's monotonic clock:

- TTFT: from sending the request to the first SSE chunk that carries non-empty text;
- inter-token latency (ITL): the gaps between consecutive non-empty chunks (a chunk may carry more
  than one token, e.g. after speculative decoding; it is still one gap);
- end-to-end (E2E): from sending to the end of the stream (`[DONE]`).

Output tokens are taken from the final `usage` chunk (the server may stop early at EOS, since
`ignore_eos` is not supported); without one, the number of non-empty chunks is used. A
non-streaming server (`stream=False`) gives TTFT = E2E and no ITL.

Two load patterns: open loop (`run_open_loop`: each request is sent at its `arrival_s`, whether or
not earlier ones finished) and closed loop (`run_closed_loop`: `concurrency` users, each sending its
next request as soon as the previous one finished).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import httpx
from tqdm.auto import tqdm

from bench.workload import BenchRequest


@dataclass
class RequestResult:
    """What the client saw for one request; times in seconds, offsets from the run's start."""

    index: int  # position in the workload
    scheduled_s: Optional[float]  # when it was due (open loop); None in closed loop
    sent_s: float = 0.0  # when it was actually sent
    ok: bool = False
    error: Optional[str] = None
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: Optional[int] = None
    output_tokens: int = 0
    usage_reported: bool = False  # output_tokens came from the server's usage, not a chunk count
    num_chunks: int = 0  # non-empty text chunks received

    def add_text_chunk(self, now: float, start: float, last: Optional[float]) -> float:
        """A chunk with text arrived at `now` (request sent at `start`, previous text chunk at
        `last`, None for the first); returns `now`, the next call's `last`."""
        if last is None:
            self.ttft_s = now - start
        else:
            self.itl_s.append(now - last)
        self.num_chunks += 1
        return now


@dataclass
class RunResult:
    """One run of one workload against one target at one load point."""

    target: str
    mode: str  # "open" or "closed"
    load: float  # offered request rate (open) or concurrency (closed)
    duration_s: float  # from the run's start to the last response's end
    results: list[RequestResult]


def completions_url(base_url: str) -> str:
    """`http://host:port[/prefix]` (with or without a trailing `/v1`) -> its `/v1/completions` URL."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/v1/completions"


def _body(model: str, req: BenchRequest, stream: bool, extra_body: Optional[dict]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                            "temperature": 0.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra_body or {})
    return body


def _error_text(status: int, raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {status}: {text[:200]}"


async def send_completion(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    req: BenchRequest,
    result: RequestResult,
    t0: float,
    stream: bool = True,
    extra_body: Optional[dict] = None,
) -> RequestResult:
    """Send one completion and fill `result` with what was seen (errors are recorded, not raised)."""
    body = _body(model, req, stream, extra_body)
    start = time.perf_counter()
    result.sent_s = start - t0
    last: Optional[float] = None
    usage: Optional[dict] = None
    try:
        if stream:
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    result.error = _error_text(resp.status_code, await resp.aread())
                    return result
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        result.error = f"stream error: {obj['error']}"[:240]
                        return result
                    now = time.perf_counter()
                    if any(c.get("text") for c in obj.get("choices") or ()):
                        last = result.add_text_chunk(now, start, last)
                    usage = obj.get("usage") or usage
        else:
            resp = await client.post(url, json=body)
            if resp.status_code != 200:
                result.error = _error_text(resp.status_code, resp.content)
                return result
            obj = resp.json()
            usage = obj.get("usage")
            if any(c.get("text") for c in obj.get("choices") or []):
                result.ttft_s = time.perf_counter() - start
                result.num_chunks = 1
    except (httpx.HTTPError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:240]
        return result
    result.e2e_s = time.perf_counter() - start
    result.ok = True
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = usage.get("prompt_tokens")
        result.usage_reported = True
    else:
        result.output_tokens = result.num_chunks
    return result


def _client(timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits)


async def run_open_loop(
    target: str,
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    rate: float,
    *,
    stream: bool = True,
    timeout_s: float = 600.0,
    extra_body: Optional[dict] = None,
    progress: bool = True,
) -> RunResult:
    """Send each request at its `arrival_s` offset (already set for `rate`) and wait for all."""
    url = completions_url(base_url)
    bar = tqdm(total=len(requests), desc=f"{target} rate={rate:g}/s", unit="req", disable=not progress)
    async with _client(timeout_s) as client:
        t0 = time.perf_counter()

        async def one(i: int, req: BenchRequest) -> RequestResult:
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            res = await send_completion(client, url, model, req, RequestResult(i, req.arrival_s), t0, stream, extra_body)
            bar.update(1)
            return res

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - t0
    bar.close()
    return RunResult(target, "open", rate, duration, list(results))


async def run_closed_loop(
    target: str,
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    concurrency: int,
    *,
    stream: bool = True,
    timeout_s: float = 600.0,
    extra_body: Optional[dict] = None,
    progress: bool = True,
) -> RunResult:
    """`concurrency` users send the requests in order, each waiting for its previous answer."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    url = completions_url(base_url)
    bar = tqdm(total=len(requests), desc=f"{target} concurrency={concurrency}", unit="req", disable=not progress)
    results: list[Optional[RequestResult]] = [None] * len(requests)
    next_index = iter(range(len(requests)))
    async with _client(timeout_s) as client:
        t0 = time.perf_counter()

        async def user() -> None:
            for i in next_index:  # NOTE: one shared iterator, so each request is sent exactly once
                results[i] = await send_completion(
                    client, url, model, requests[i], RequestResult(i, None), t0, stream, extra_body)
                bar.update(1)

        await asyncio.gather(*(user() for _ in range(min(concurrency, len(requests)))))
        duration = time.perf_counter() - t0
    bar.close()
    return RunResult(target, "closed", float(concurrency), duration, [r for r in results if r is not None])


async def wait_ready(base_url: str, timeout_s: float = 300.0) -> list[str]:
    """Poll `GET /v1/models` until it answers 200; return the served model ids."""
    url = completions_url(base_url).replace("/completions", "/models")
    deadline = time.monotonic() + timeout_s
    last_error = ""
    async with httpx.AsyncClient(timeout=10.0) as client:
        while time.monotonic() < deadline:
            try:
                resp = await client.get(url)
                if resp.status_code == 200:
                    return [m["id"] for m in resp.json().get("data", [])]
                last_error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as e:
                last_error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s ({last_error})")


async def warmup(base_url: str, model: str, requests: Sequence[BenchRequest], stream: bool = True,
                 extra_body: Optional[dict] = None) -> list[RequestResult]:
    """Send `requests` one after another (not measured), so lazy initialisation is out of the way."""
    url = completions_url(base_url)
    out = []
    async with _client(600.0) as client:
        t0 = time.perf_counter()
        for i, req in enumerate(requests):
            out.append(await send_completion(client, url, model, req, RequestResult(i, None), t0, stream, extra_body))
    return out
