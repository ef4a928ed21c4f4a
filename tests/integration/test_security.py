"""API keys and request limits on a served app: 401 without a right key, the key's own cache
tenant, and a 4xx naming the field for every limit, with the server serving on afterwards."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from ray import serve

KEY_A, KEY_B = "sk-test-alpha-0123456789", "sk-test-beta-9876543210"
MODEL = "secure"
LIMITS = {"max_body_bytes": 8192, "max_output_tokens": 32, "max_stop_len": 16, "max_num_messages": 4,
          "max_prompt_chars": 2000}


@pytest.fixture(scope="module")
def secure_app(serve_port, tiny_model, tmp_path_factory):
    """A second app with keys on (from a file: replicas do not see this process's environment),
    small limits, a 64-token context and the cache on; one process for the engine."""
    from deployments import build_app
    from serving.config import (AppConfig, CacheConfig, LimitsConfig, LLMConfig, ModelConfig, ParallelConfig,
                                RouterConfig, SchedulerConfig, ServeOptions)

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# keys of the security test\n{KEY_A}\n\n{KEY_B}\n")
    config = AppConfig(models=(LLMConfig(
        model=ModelConfig(path=tiny_model, name=MODEL, max_model_len=64),
        parallel=ParallelConfig(engine_process=False),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=8, default_max_tokens=16),
        serve=ServeOptions(num_replicas=1),
    ),), cache=CacheConfig(capacity_bytes=2**20, embedding_batch_size=8, timeout_s=5.0, max_timeout_s=5.0),
        router=RouterConfig(api_keys_file=str(keys), limits=LimitsConfig(**LIMITS)))
    assert KEY_A not in repr(config)
    serve.run(build_app(config), name="secure", route_prefix="/secure")
    yield f"http://127.0.0.1:{serve_port}/secure"
    serve.delete("secure")


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def ask(base, content, key, user="bob"):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, "user": user}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=bearer(key), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_cached(base, content, key) -> dict:
    """Inserts happen off the response path: poll (bounded) until the entry is visible."""
    deadline = time.monotonic() + 30
    while True:
        res = ask(base, content, key)
        if res["cached"] or time.monotonic() > deadline:
            return res
        time.sleep(0.2)


def assert_401(r: httpx.Response):
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", None, "invalid_api_key")
    assert err["message"] and "sk-" not in err["message"]


COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"authorization": KEY_A},
                                     {"authorization": f"Basic {KEY_A}"}, bearer(KEY_A + "x")])
def test_missing_or_wrong_key_gets_401(secure_app, headers):
    assert_401(httpx.post(secure_app + "/v1/completions", json=COMPLETION, headers=headers, timeout=30))
    assert_401(httpx.get(secure_app + "/v1/models", headers=headers, timeout=30))
    assert_401(httpx.post(secure_app + "/tokenize", json={"model": MODEL, "prompt": "x"}, headers=headers,
                          timeout=30))


def test_the_key_is_checked_before_the_body_is_read(secure_app):
    big = b"x" * (2 * LIMITS["max_body_bytes"])
    assert_401(httpx.post(secure_app + "/v1/completions", content=big, timeout=30))


def test_right_key_through_the_openai_client_and_health_without_one(secure_app):
    client = openai.OpenAI(base_url=secure_app + "/v1", api_key=KEY_B, max_retries=0, timeout=60)
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 3
    assert [m.id for m in client.models.list().data] == [MODEL]
    wrong = openai.OpenAI(base_url=secure_app + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    for path in ("/health", "/v1/health"):
        assert httpx.get(secure_app + path, timeout=30).status_code == 200


def test_two_keys_never_share_a_cache_entry(secure_app):
    question = "What is the capital of France?"
    first = ask(secure_app, question, KEY_A)
    assert first["cached"] is False
    assert wait_cached(secure_app, question, KEY_A)["cached"] is True  # the same key's repeat is a hit
    assert ask(secure_app, question, KEY_B)["cached"] is False  # same prompt, same `user`, other key
    assert wait_cached(secure_app, question, KEY_B)["cached"] is True
    assert ask(secure_app, question, KEY_A, user="carol")["cached"] is False  # `user` still splits a key's


def chunked(data: bytes, size: int = 1024):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def chat(n=1, content="hi", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}] * n, "temperature": 0, **kw}


OVER = [  # (path, body, status, param, code)
    ("/v1/completions", {**COMPLETION, "max_tokens": 33}, 400, "max_tokens", None),
    ("/v1/chat/completions", chat(max_completion_tokens=33), 400, "max_completion_tokens", None),
    ("/v1/completions", {**COMPLETION, "stop": ["x" * 17]}, 400, "stop", None),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),  # the protocol's 4
    ("/v1/chat/completions", chat(5, max_tokens=2), 400, "messages", None),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 2001}, 400, "prompt", None),
    ("/v1/chat/completions", chat(2, "y" * 1001, max_tokens=2), 400, "messages", None),
    ("/tokenize", {"model": MODEL, "prompt": "x" * 2001}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 100}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 100, "stream": True}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", chat(1, "word " * 100, max_tokens=2), 400, "messages", "context_length_exceeded"),
    ("/v1/completions", b'{"prompt": "' + b"x" * 9000 + b'"}', 413, None, "request_too_large"),
    ("/v1/completions", chunked(b'{"prompt": "' + b"x" * 9000 + b'"}'), 413, None, "request_too_large"),
]


@pytest.mark.parametrize("path,body,status,param,code", OVER)
def test_each_limit_gets_a_4xx_naming_its_field_and_serving_goes_on(secure_app, path, body, status, param, code):
    headers = bearer(KEY_A)
    if isinstance(body, dict):
        kw = {"json": body}
    else:  # bytes: with a Content-Length; a generator: chunked, with none
        kw = {"content": body}
        headers["content-type"] = "application/json"
    r = httpx.post(secure_app + path, headers=headers, timeout=60, **kw)
    assert r.status_code == status, r.text
    if not isinstance(body, (dict, bytes)):
        assert "content-length" not in r.request.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    ok = httpx.post(secure_app + "/v1/completions", json=COMPLETION, headers=bearer(KEY_A), timeout=60)
    assert ok.status_code == 200, ok.text
