"""The OpenAI request models: unknown or unsupported parameters are errors, neutral values pass; a
body that is no JSON object of text, or a value a model rejects, is a 400 naming its parameter."""

import pytest
from pydantic import ValidationError

from serving.errors import InvalidRequestError
from serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                              invalid_request, request_body)

MESSAGES = [{"role": "user", "content": "hi"}]


def completion(**kw) -> CompletionRequest:
    return CompletionRequest(model="m", prompt="hello", **kw)


def chat(**kw) -> ChatCompletionRequest:
    kw.setdefault("messages", MESSAGES)
    return ChatCompletionRequest(model="m", **kw)


def test_defaults():
    req = completion()
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.stop_list) == (None, 1.0, 1.0, -1, [])
    assert req.include_usage is False


@pytest.mark.parametrize("make", [completion, chat])
def test_unknown_fields_are_rejected(make):
    with pytest.raises(ValidationError, match="temprature"):
        make(temprature=0.5)


@pytest.mark.parametrize("kw", [
    {"best_of": 3}, {"suffix": "x"}, {"tools": [{"type": "function"}]},
])
def test_unsupported_parameters_are_rejected(kw):
    name = next(iter(kw))
    with pytest.raises(ValidationError, match=f"'{name}'.*not supported"):
        completion(**kw)
    with pytest.raises(ValidationError, match=f"'{name}'.*not supported"):
        chat(**kw)


@pytest.mark.parametrize("make", [completion, chat])
def test_response_format_becomes_a_json_spec_outside_the_cache(make):
    assert make().json_spec is None and make(response_format={"type": "text"}).json_spec is None
    assert not make(response_format={"type": "text"}).uses_extensions
    request = make(response_format={"type": "json_schema", "json_schema": {
        "name": "n", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    assert request.json_spec.schema == '{"type":"object","properties":{"a":{"type":"integer"}}}'
    assert request.json_spec.strict and request.uses_extensions  # the cache key does not hold the schema
    assert make(response_format={"type": "json_object"}).json_spec.schema == '{"type":"object"}'


@pytest.mark.parametrize("response_format", [
    {"type": "xml"}, {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "bogus"}}},
])
def test_a_bad_response_format_names_its_field(response_format):
    with pytest.raises(ValidationError, match="response_format") as e:
        chat(response_format=response_format)
    assert e.value.errors()[0]["ctx"]["error"].param == "response_format"


def test_chat_echo_is_not_supported():
    with pytest.raises(ValidationError, match="'echo'.*not supported"):
        chat(echo=True)


@pytest.mark.parametrize("kw", [
    {"n": 1}, {"best_of": 1}, {"echo": False}, {"frequency_penalty": 0}, {"frequency_penalty": 0.0},
    {"presence_penalty": 0}, {"logit_bias": None}, {"n": None},
])
def test_neutral_values_are_accepted(kw):
    completion(**kw)
    chat(**kw)


@pytest.mark.parametrize("kw", [
    {"max_tokens": -1}, {"max_tokens": 0}, {"top_k": 0}, {"top_k": -2}, {"temperature": -0.1},
    {"temperature": 2.5}, {"top_p": 0.0}, {"top_p": 1.5},
])
def test_out_of_range_sampling_values_are_rejected(kw):
    with pytest.raises(ValidationError):
        completion(**kw)


def test_in_range_sampling_values_are_accepted():
    req = completion(max_tokens=1, top_k=5, temperature=0.0, top_p=0.1, seed=7)
    assert (req.max_tokens, req.top_k, req.temperature, req.top_p, req.seed) == (1, 5, 0.0, 0.1, 7)
    assert completion(top_k=-1, temperature=2.0, top_p=1.0).top_k == -1


def test_stop_strings():
    assert completion(stop="END").stop_list == ["END"]
    assert completion(stop=["a", "b", "c", "d"]).stop_list == ["a", "b", "c", "d"]
    for bad in ("", [""], ["ok", ""], ["1", "2", "3", "4", "5"]):
        with pytest.raises(ValidationError):
            completion(stop=bad)


def test_max_completion_tokens_maps_to_max_tokens():
    assert chat(max_completion_tokens=7).max_tokens == 7
    assert chat(max_tokens=5, max_completion_tokens=7).max_tokens == 5  # the explicit one wins
    with pytest.raises(ValidationError):
        chat(max_completion_tokens=0)


def test_prompt_and_messages_must_not_be_empty():
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[])
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompt == [1, 2, 3]


def test_chat_content_parts():
    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[0].text == "ab"
    with pytest.raises(ValidationError, match="only text content"):
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "robot", "content": "hi"}])
    # found by the schemathesis run: /tokenize read a non-text part only after validation (a 500)
    with pytest.raises(ValidationError, match="only text content"):
        TokenizeChatRequest(model="m", messages=[{"role": "user", "content": [{}]}])


def test_stream_options_and_cache_control():
    req = chat(stream=True, stream_options={"include_usage": True}, cache={"skip": True})
    assert req.include_usage and req.cache.skip and not req.cache.no_store
    with pytest.raises(ValidationError):
        chat(cache={"skip_it": True})


def test_chat_logprobs_false_is_neutral():
    assert chat(logprobs=False).logprobs in (False, None)


@pytest.mark.parametrize("cls,body,param", [
    (CompletionRequest, {"prompt": [-1]}, "prompt"),  # not `prompt.str`: a union member's tag is no field
    (CompletionRequest, {"prompt": "x", "stop": 5}, "stop"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),  # nor a dict key
    (CompletionRequest, {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    (CompletionRequest, {"prompt": "x", "stream_options": {"x": 1}}, "stream_options.x"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.content.text"),
    (ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.role"),
    (DetokenizeRequest, {"tokens": [3, -1]}, "tokens"),
])
def test_a_400_names_its_parameter_as_a_field_path(cls, body, param):
    with pytest.raises(ValidationError) as e:
        cls.model_validate({"model": "m", **body})
    err = invalid_request(cls, e.value)
    assert err.param == param and err.status_code == 400 and f"(param: {param})" in err.message


@pytest.mark.parametrize("raw,message", [
    (b"{not json", "not valid JSON"), (b"\xff{}", "not valid JSON"), (b'["a list"]', "must be a JSON object"),
    (b"[" * 100_000, "nested too deeply"),  # a RecursionError (a 500) before
    (b'{"prompt": "\\ud800"}', "lone surrogate"),  # the tokenizer failed on it (a 500) before
    (b'{"model": "\\uDFFF"}', "lone surrogate"),  # so did the error body that names the model
    (b'{"prompt": "\xed\xa0\x80"}', "lone surrogate"),  # its raw bytes, which json.loads lets through
])
def test_a_body_that_is_no_json_object_of_text_is_a_400(raw, message):
    with pytest.raises(InvalidRequestError, match=message):
        request_body(raw)


def test_a_body_of_text_passes():
    assert request_body(b'{"prompt": "\\ud83d\\ude00 \xed\x95\x9c \\u00e9"}') == {"prompt": "\U0001F600 \ud55c \xe9"}
