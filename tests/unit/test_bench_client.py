"""The streaming client against a fake OpenAI server (httpx.MockTransport); no Ray, no sockets."""

import asyncio
import json

import httpx
import pytest

from bench import client
from bench.workload import BenchRequest


def _sse(*objs) -> bytes:
    return b"".join(f"data: {json.dumps(o)}\n\n".encode() for o in objs) + b"data: [DONE]\n\n"


def _chunk(text, usage=None):
    return {"id": "c", "object": "text_completion", "model": "m",
            "choices": [] if text is None else [{"index": 0, "text": text, "finish_reason": None}], "usage": usage}


def _send(handler, stream=True):
    seen = {}

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["body"] = json.loads(request.content)
        return handler(request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(wrapped)) as c:
            res = client.RequestResult(0, 0.0)
            return await client.send_completion(c, "http://x/v1/completions", "m", BenchRequest("hi", 5), res,
                                                t0=0.0, stream=stream, extra_body={"user": "bench"})
    return asyncio.run(go()), seen


def test_stream_counts_chunks_and_usage():
    body = _sse(_chunk(""), _chunk("a"), _chunk("b"), _chunk("c"),
                _chunk(None, {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}))
    res, seen = _send(lambda r: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}))
    assert res.ok and res.error is None
    assert res.num_chunks == 3 and len(res.itl_s) == 2
    assert res.output_tokens == 4 and res.usage_reported and res.prompt_tokens == 2
    assert 0 <= res.ttft_s <= res.e2e_s
    assert seen["body"] == {"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}, "user": "bench"}


def test_stream_without_usage_counts_chunks():
    res, _ = _send(lambda r: httpx.Response(200, content=_sse(_chunk("a"), _chunk("b"))))
    assert res.ok and res.output_tokens == 2 and not res.usage_reported


def test_http_error_is_recorded():
    res, _ = _send(lambda r: httpx.Response(429, json={"error": {"message": "too many", "type": "x"}}))
    assert not res.ok and res.error == "HTTP 429: too many" and res.e2e_s is None


def test_error_event_in_stream():
    res, _ = _send(lambda r: httpx.Response(200, content=_sse(_chunk("a"), {"error": {"message": "boom"}})))
    assert not res.ok and "boom" in res.error


def test_non_streaming_ttft_is_e2e():
    resp = {"choices": [{"text": "abc"}], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}
    res, seen = _send(lambda r: httpx.Response(200, json=resp), stream=False)
    assert res.ok and res.output_tokens == 3 and res.itl_s == []
    assert res.ttft_s == pytest.approx(res.e2e_s, abs=1e-3)
    assert "stream_options" not in seen["body"]


@pytest.mark.parametrize("base, url", [
    ("http://h:1", "http://h:1/v1/completions"),
    ("http://h:1/", "http://h:1/v1/completions"),
    ("http://h:1/v1", "http://h:1/v1/completions"),
    ("http://h:1/baseline/", "http://h:1/baseline/v1/completions"),
])
def test_completions_url(base, url):
    assert client.completions_url(base) == url
