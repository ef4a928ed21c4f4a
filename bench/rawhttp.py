"""A minimal HTTP/1.1 streaming client for load generation on the machine under test.

httpx costs about 1.2-1.8 ms of CPU per streamed request here, as much as the router: on two
cores the load generator would take what it measures. This client keeps one keep-alive
connection per simulated user, writes each request as one buffer, and reads server-sent events
from the chunked response (about 0.2 ms per request). It speaks only what the benchmarks need:
`POST` with a JSON body, a chunked or sized response.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Iterable, Optional, Sized
from urllib.parse import urlsplit

from bench.client import RequestResult, RunResult, _body, _error_text, completions_url
from bench.workload import BenchRequest


class Connection:
    """One keep-alive HTTP/1.1 connection to `host:port`, reopened when the server closes it."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path or "/"
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None

    async def _open(self) -> None:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def post(self, body: bytes):
        """Sends the request; returns (status, headers dict, async iterator of body pieces)."""
        await self._open()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self._writer.write(head + body)
        status_line = await self._reader.readline()
        if not status_line:  # NOTE: the server closed an idle keep-alive connection: retry once
            self.close()
            await self._open()
            self._writer.write(head + body)
            status_line = await self._reader.readline()
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers, self._body(headers)

    async def _body(self, headers: dict):
        reader = self._reader
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                piece = await reader.readexactly(size)
                await reader.readexactly(2)
                yield piece
        else:
            yield await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()


async def send_completion(conn: Connection, model: str, req: BenchRequest, result: RequestResult, t0: float,
                          extra_body: Optional[dict] = None) -> RequestResult:
    """A streamed completion over `conn`, recorded as `bench.client.send_completion` records it."""
    body = json.dumps(_body(model, req, True, extra_body)).encode()
    start = time.perf_counter()
    result.sent_s = start - t0
    last = usage = None
    try:
        status, headers, pieces = await conn.post(body)
        if status != 200:
            result.error = _error_text(status, b"".join([p async for p in pieces]))
            return result
        buf = b""
        async for piece in pieces:
            buf += piece
            *events, buf = buf.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                obj = json.loads(event[6:])
                if obj.get("error"):
                    result.error = f"stream error: {obj['error']}"[:240]
                    conn.close()
                    return result
                if any(c.get("text") for c in obj.get("choices") or ()):
                    last = result.add_text_chunk(now, start, last)
                usage = obj.get("usage") or usage
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        conn.close()
        result.error = f"{type(e).__name__}: {e}"[:240]
        return result
    result.e2e_s = time.perf_counter() - start
    result.ok = True
    result.output_tokens = int(usage["completion_tokens"]) if usage else result.num_chunks
    result.prompt_tokens = usage.get("prompt_tokens") if usage else None
    result.usage_reported = usage is not None
    return result


async def run_closed_loop(target: str, base_url: str, model: str, requests: Iterable[BenchRequest],
                          concurrency: int, timeout_s: float = 600.0, extra_body: Optional[dict] = None,
                          duration_s: Optional[float] = None) -> RunResult:
    """`concurrency` users, each on its own connection, send the requests in order, streamed. With
    `duration_s` none is sent after that many seconds, so `requests` may be endless."""
    url = completions_url(base_url)
    results: list[RequestResult] = []
    work = enumerate(requests)  # NOTE: one shared iterator, so each request is sent exactly once
    t0 = time.perf_counter()

    async def user() -> None:
        conn = Connection(url)
        try:
            for i, req in work:
                if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                    return
                result = RequestResult(i, None)
                results.append(result)
                try:
                    await asyncio.wait_for(send_completion(conn, model, req, result, t0, extra_body), timeout_s)
                except TimeoutError:
                    conn.close()
                    result.error = f"timed out after {timeout_s:.0f} s"
        finally:
            conn.close()

    users = min(concurrency, len(requests)) if isinstance(requests, Sized) else concurrency
    await asyncio.gather(*(user() for _ in range(users)))
    return RunResult(target, "closed", float(concurrency), time.perf_counter() - t0,
                     sorted(results, key=lambda r: r.index))
