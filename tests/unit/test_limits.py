"""Request limits: the body's size (declared and read), then the parsed request's fields."""

import asyncio

import pytest

from serving.config import LimitsConfig
from serving.errors import InvalidRequestError, RequestTooLargeError
from serving.limits import check_limits, read_body
from serving.protocol import ChatCompletionRequest, CompletionRequest, TokenizeChatRequest, TokenizeCompletionRequest

LIMITS = LimitsConfig(max_body_bytes=1024, max_output_tokens=64, max_stop_len=8, max_num_messages=3,
                      max_prompt_chars=100)


async def chunks(*parts: bytes):
    for p in parts:
        yield p


def read(parts, content_length=None):
    return asyncio.run(read_body(chunks(*parts), content_length, 1024))


def test_body_within_the_limit_is_returned_whole():
    assert read([b"a" * 1000, b"b" * 24], "1024") == b"a" * 1000 + b"b" * 24


def test_declared_length_over_the_limit_is_refused_before_reading():
    async def never():
        raise AssertionError("read although the declared length was too large")
        yield b""

    with pytest.raises(RequestTooLargeError) as info:
        asyncio.run(read_body(never(), "1025", 1024))
    assert info.value.status_code == 413 and info.value.code == "request_too_large"


def test_undeclared_body_is_cut_while_reading():
    with pytest.raises(RequestTooLargeError):
        read([b"a" * 600, b"b" * 600])
    with pytest.raises(RequestTooLargeError):  # a Content-Length that lies
        read([b"a" * 2000], "10")


def test_bad_content_length_is_a_400():
    with pytest.raises(InvalidRequestError) as info:
        read([b"{}"], "ten")
    assert info.value.status_code == 400


def param_of(request) -> str:
    with pytest.raises(InvalidRequestError) as info:
        check_limits(request, LIMITS)
    assert info.value.status_code == 400
    return info.value.param


def chat(n=1, content="hi", **kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": content}] * n, **kw)


def test_requests_within_the_limits_pass():
    check_limits(CompletionRequest(model="m", prompt="x" * 100, max_tokens=64, stop=["12345678"]), LIMITS)
    check_limits(chat(3, "x" * 33, max_completion_tokens=64), LIMITS)
    check_limits(CompletionRequest(model="m", prompt=[1] * 500), LIMITS)  # token ids meet the context check
    check_limits(TokenizeCompletionRequest(model="m", prompt="x" * 100), LIMITS)


@pytest.mark.parametrize("request_, param", [
    (CompletionRequest(model="m", prompt="x", max_tokens=65), "max_tokens"),
    (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=65), "max_tokens"),
    (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=65),
     "max_completion_tokens"),
    (CompletionRequest(model="m", prompt="x", stop=["ok", "123456789"]), "stop"),
    (CompletionRequest(model="m", prompt="x" * 101), "prompt"),
    (TokenizeCompletionRequest(model="m", prompt="x" * 101), "prompt"),
    (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}] * 4), "messages"),
    (ChatCompletionRequest(model="m", messages=[{"role": "system", "content": "x" * 60},
                                                {"role": "user", "content": "y" * 41}]), "messages"),
    (TokenizeChatRequest(model="m", messages=[{"role": "user", "content": "x"}] * 4), "messages"),
])
def test_each_limit_names_its_field(request_, param):
    assert param_of(request_) == param


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        LimitsConfig(max_output_tokens=0)
    with pytest.raises(ValueError):
        LimitsConfig(max_body_bytes=10)
