"""Request limits (`router.limits`, serving/config.py): a body's size while it is read, then the
fields of the parsed request. Each refusal is a 4xx whose error names what was too large."""

from __future__ import annotations

from typing import AsyncIterator, Optional, Union

from serving.config import LimitsConfig
from serving.errors import InvalidRequestError, RequestTooLargeError
from serving.protocol import ChatCompletionRequest, CompletionRequest, TokenizeChatRequest, TokenizeCompletionRequest

Limited = Union[CompletionRequest, ChatCompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest]


def _too_large(max_bytes: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"The request body is larger than this server accepts ({max_bytes} bytes).")


async def read_body(chunks: AsyncIterator[bytes], content_length: Optional[str], max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to pass `max_bytes`: from its
    Content-Length before reading, and while reading (a chunked body declares no length)."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidRequestError("the Content-Length header is not a number") from None
        if declared > max_bytes:
            raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def check_limits(request: Limited, limits: LimitsConfig) -> None:
    """Raises `InvalidRequestError` (400, naming the field) for a request over one of `limits`."""
    if isinstance(request, (CompletionRequest, ChatCompletionRequest)):
        _check_sampling(request, limits)
    if isinstance(request, (ChatCompletionRequest, TokenizeChatRequest)):
        num = len(request.messages)
        if num > limits.max_num_messages:
            raise InvalidRequestError(f"{num} messages; this server accepts at most {limits.max_num_messages}",
                                      param="messages")
        _check_prompt_chars(sum(len(m.text) for m in request.messages), "messages", limits)
    elif isinstance(request.prompt, str):  # NOTE: a token-id prompt meets the engine's context check only
        _check_prompt_chars(len(request.prompt), "prompt", limits)


def _check_sampling(request: Union[CompletionRequest, ChatCompletionRequest], limits: LimitsConfig) -> None:
    bound = limits.max_output_tokens
    if request.max_tokens is not None and request.max_tokens > bound:
        # NOTE: a chat's max_completion_tokens arrives as max_tokens when max_tokens is not given
        param = "max_completion_tokens" if (isinstance(request, ChatCompletionRequest) and
                                            request.max_completion_tokens == request.max_tokens) else "max_tokens"
        raise InvalidRequestError(f"{param} is {request.max_tokens}; this server generates at most {bound} "
                                  f"tokens per request", param=param)
    longest = max((len(s) for s in request.stop_list), default=0)
    if longest > limits.max_stop_len:
        raise InvalidRequestError(f"a stop string of {longest} characters; this server accepts at most "
                                  f"{limits.max_stop_len}", param="stop")


def _check_prompt_chars(num_chars: int, param: str, limits: LimitsConfig) -> None:
    if num_chars > limits.max_prompt_chars:
        raise InvalidRequestError(f"the prompt has {num_chars} characters; this server accepts at most "
                                  f"{limits.max_prompt_chars}", param=param)
