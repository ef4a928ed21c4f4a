"""Structured output over HTTP on the deployed app (TP=2, tiny model): `response_format` json_object
and json_schema through the official `openai` client, greedy and seeded, plain and streamed. The
tiny model writes noise, so every document that parses and validates is the grammar's doing."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.conftest import TINY_NAME

NO_CACHE = {"cache": {"skip": True, "no_store": True}}
# NOTE: bounded strings and integers keep every document under the budget (closing near max_tokens
# cannot invent a required member that is still missing)
MAX_TOKENS = 64

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}},
        "required": ["scores"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": -9, "maximum": 999},
        "ok": {"type": "boolean"}},
        "required": ["color", "count", "ok"], "additionalProperties": False},
}


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def client(llm_app):
    from openai import OpenAI

    return OpenAI(base_url=llm_app + "/v1", api_key="unused", timeout=120, max_retries=0)


def check(text: str, name: str) -> None:
    doc = json.loads(text)
    if name == "json_object":
        assert isinstance(doc, dict)
    else:
        jsonschema.validate(doc, SCHEMAS[name])


SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 1.0, "seed": 7}}


@pytest.mark.parametrize("name", [*SCHEMAS, "json_object"])
@pytest.mark.parametrize("sampling", SAMPLING)
def test_chat_output_parses_and_validates(client, name, sampling):
    fmt = {"type": "json_object"} if name == "json_object" else schema_format(name)
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    res = client.chat.completions.create(model=TINY_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                         response_format=fmt, extra_body=NO_CACHE, **SAMPLING[sampling])
    choice = res.choices[0]
    check(choice.message.content, name)
    assert choice.finish_reason in ("stop", "length") and res.usage.completion_tokens <= MAX_TOKENS
    streamed = client.chat.completions.create(model=TINY_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                              response_format=fmt, extra_body=NO_CACHE, stream=True,
                                              **SAMPLING[sampling])
    chunks = list(streamed)
    check("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), name)
    if sampling == "greedy" or "seed" in SAMPLING[sampling]:  # the same tokens, streamed or not
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


@pytest.mark.parametrize("name", ["enum", "json_object"])
@pytest.mark.parametrize("extra", [{}, {"ignore_eos": True, "min_tokens": 4}])  # the grammar still ends it
def test_completion_output_parses_and_validates(client, name, extra):
    fmt = {"type": "json_object"} if name == "json_object" else schema_format(name)
    kw = dict(model=TINY_NAME, prompt="The answer in JSON:", max_tokens=MAX_TOKENS, seed=3, temperature=0.8,
              extra_body={"response_format": fmt, **extra, **NO_CACHE})
    check(client.completions.create(**kw).choices[0].text, name)
    check("".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices), name)


def test_a_constrained_row_leaves_its_batch_neighbours_alone(client):
    """A free-text request gives the same greedy tokens alone and next to constrained ones."""
    from concurrent.futures import ThreadPoolExecutor

    def free():
        return client.completions.create(model=TINY_NAME, prompt="Once upon a time", max_tokens=16,
                                         temperature=0.0, extra_body=NO_CACHE).choices[0].text

    def constrained():
        return client.completions.create(model=TINY_NAME, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=0.0,
                                         extra_body={"response_format": schema_format("nested"), **NO_CACHE})

    alone = free()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(constrained) for _ in range(3)]
        mixed = pool.submit(free)
        assert mixed.result() == alone
        for f in others:
            check(f.result().choices[0].text, "nested")


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "bogus"}}},
    {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
    {"type": "yaml"},
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_response_format_is_a_400_naming_it(llm_app, fmt, path):
    body = {"model": TINY_NAME, "response_format": fmt}
    body |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = httpx.post(llm_app + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"
