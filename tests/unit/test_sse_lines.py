"""The router's SSE lines equal the pydantic chunks they stand for, for every kind of item."""

import json

import pytest

from deployments.chunks import StreamChunks
from serving.protocol import ChatCompletionRequest, CompletionRequest, GenerationOutput

TEXTS = ["hello", "", ' "quoted" \\ back\\slash\n', "ünïcödé ✓ 中文", "\u2063TEXT\u2063"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("return_token_ids", [False, True])
def test_sse_line_equals_the_pydantic_chunk(chat, return_token_ids):
    common = dict(model="m", return_token_ids=return_token_ids, stream=True)
    request = (ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **common) if chat
               else CompletionRequest(prompt="x", **common))
    chunks = StreamChunks(request)
    for text in TEXTS:
        for first, finished, cached in [(False, False, False), (True, False, False), (False, True, False),
                                        (False, False, True)]:
            out = GenerationOutput("r", text, [5, 6], finished, "stop" if finished else None, 3, 2)
            line = chunks.sse_line(0, out, cached, first)
            assert line.startswith("data: ") and line.endswith("\n\n")
            expected = chunks.chunk(0, out, cached, first).model_dump(mode="json")
            assert json.loads(line[6:]) == expected
