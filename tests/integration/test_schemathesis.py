"""The published OpenAPI document, and schemathesis fuzzing the live session app from it.

Schemathesis generates request bodies from `/openapi.json` for each POST route, valid ones
(positive) and ones that break the schema (negative). No answer may be a 5xx, a 4xx must be the
OpenAI error body, and every answer must be what the document says (status, media type, schema).
A body hook keeps each request cheap and the shared app's state as it was (see `cheap`)."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from schemathesis.core.failures import FailureGroup

from tests.conftest import TINY_NAME

OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"]
EXAMPLES = 70  # per operation and mode: 4 x 2 x 70 = 560 requests, ~20 s here
MAX_TOKENS, MAX_N = 4, 2
MAX_TEXT, MAX_IDS, MAX_MESSAGES = 200, 64, 8
ERROR_KEYS = {"message", "type", "param", "code"}


def test_openapi_json_publishes_the_request_schemas(llm_app):
    doc = httpx.get(llm_app + "/openapi.json", timeout=30).json()
    components = doc["components"]["schemas"]
    for path, model in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/detokenize", "DetokenizeRequest")]:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    tokenize = doc["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [r["$ref"].rsplit("/", 1)[1] for r in tokenize["oneOf"]] == ["TokenizeCompletionRequest",
                                                                        "TokenizeChatRequest"]
    completion = components["CompletionRequest"]
    assert set(completion["required"]) == {"model", "prompt"} and completion["additionalProperties"] is False
    assert completion["properties"]["n"]["maximum"] == 16
    messages = components["ChatCompletionRequest"]["properties"]["messages"]
    assert messages["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    assert components["TextContentPart"]["properties"]["type"]["const"] == "text"
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionResponse"}
    assert "text/event-stream" in responses["200"]["content"]
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(components["ErrorInfo"]["properties"]) == ERROR_KEYS
    assert "Retry-After" in responses["429"]["headers"]


def _cap(body: dict, key: str, cap: int, upto: int) -> None:
    value = body.get(key)
    if type(value) is int and cap < value <= upto:
        body[key] = cap


def cheap(body, generates: bool, max_model_len: int):
    """`body` made cheap: a few tokens and choices, short prompts, and answers never stored in the
    semantic cache (it is read). Values the server rejects anyway (past the context, more than 16
    choices, not integers) stay as they are, so those 400s are fuzzed too."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        _cap(body, key, MAX_TOKENS, max_model_len)
    _cap(body, "n", MAX_N, 16)
    if generates:
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS  # NOTE: the default (up to 256 tokens) would cost seconds
        if body.get("cache") is None or isinstance(body["cache"], dict):
            body["cache"] = {**(body.get("cache") or {}), "no_store": True}
    if isinstance(body.get("prompt"), (str, list)):
        body["prompt"] = body["prompt"][:MAX_TEXT if isinstance(body["prompt"], str) else MAX_IDS]
    if isinstance(body.get("messages"), list):
        body["messages"] = [{**m, "content": m["content"][:MAX_TEXT]}
                            if isinstance(m, dict) and isinstance(m.get("content"), str) else m
                            for m in body["messages"][:MAX_MESSAGES]]
    return body


@pytest.fixture(scope="module")
def schema(llm_app):
    max_model_len = httpx.get(llm_app + "/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    schema = schemathesis.openapi.from_url(llm_app + "/openapi.json")

    @schema.hook
    def flatmap_body(context, body):
        """Half the bodies name the served model (a random name only ever gets a 404)."""
        generates = context.operation.path.startswith("/v1/")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return st.just(cheap(body, generates, max_model_len))
        return st.sampled_from([TINY_NAME, body["model"]]).map(
            lambda model: cheap({**body, "model": model}, generates, max_model_len))

    return schema


def send(client: httpx.Client, case, base_url: str) -> httpx.Response:
    """`case` sent with httpx. NOTE: not `case.call()`: its requests transport breaks on the
    urllib3-future package that this venv carries (a dependency of niquests) in place of urllib3."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    if "data" in kwargs:  # a raw body (`null`)
        kwargs["content"] = kwargs.pop("data")
    return client.request(**kwargs)


def problems_of(case, response: httpx.Response) -> list[str]:
    """What is wrong with one answer ([] when nothing is)."""
    if response.status_code >= 500:
        return [f"{response.status_code}: {response.text[:300]}"]
    out = []
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            shaped = set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"]
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not shaped:
            out.append(f"{response.status_code} without the OpenAI error body: {response.text[:300]}")
    try:
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                 response_schema_conformance])
    except FailureGroup as e:
        out += [f"{response.status_code} off the document: {f.title}: {f.message[:300]}" for f in e.exceptions]
    return out


@pytest.mark.timeout(240)
def test_fuzzed_requests_never_get_5xx_and_4xx_are_openai_errors(schema, llm_app):
    statuses, failures = [], []
    start = time.monotonic()
    with httpx.Client(timeout=30) as client:
        for label in OPERATIONS:
            operation = schema.find_operation_by_label(label)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    response = send(client, case, llm_app)
                    statuses.append(response.status_code)
                    failures.extend(f"{label} {case.body!r:.400} -> {p}" for p in problems_of(case, response))

                run()
    elapsed = time.monotonic() - start
    assert not failures, f"{len(failures)} of {len(statuses)} failed:\n" + "\n".join(failures[:20])
    assert len(statuses) >= 500, len(statuses)  # each a response received
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    print(f"{len(statuses)} requests in {elapsed:.1f} s: "
          + ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses))))
    ok = httpx.post(llm_app + "/v1/completions", timeout=60,
                    json={"model": TINY_NAME, "prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200
