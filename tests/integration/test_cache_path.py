"""The semantic cache in the request path: hits never touch the model, and never cross tenants,
models or output-changing parameters."""

from __future__ import annotations

import time

import httpx
from ray import serve

from tests.conftest import TINY_NAME


def llm_requests() -> int:
    handle = serve.get_deployment_handle(f"LLMServer:{TINY_NAME}", app_name="llm")
    return handle.stats.remote().result(timeout_s=30)["num_requests"]


def ask(base, content, user="alice", **kw):
    body = {"model": TINY_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, "user": user, **kw}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def wait_cached(base, content, **kw) -> dict:
    """Inserts happen off the response path: poll (bounded) until the entry is visible."""
    deadline = time.monotonic() + 30
    while True:
        res = ask(base, content, **kw)
        if res["cached"] or time.monotonic() > deadline:
            return res
        time.sleep(0.2)


def test_repeat_and_paraphrase_hit_without_the_model(llm_app):
    first = ask(llm_app, "What is the capital of France?")
    assert first["cached"] is False
    again = wait_cached(llm_app, "What is the capital of France?")
    assert again["cached"] is True
    before = llm_requests()
    repeat = ask(llm_app, "  what is the capital of france?  ")
    para = ask(llm_app, "Tell me the capital of France.")
    assert repeat["cached"] and para["cached"]
    assert repeat["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert para["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert llm_requests() == before  # the model was not called
    unrelated = ask(llm_app, "How do I bake sourdough bread at home?")
    assert unrelated["cached"] is False
    assert llm_requests() == before + 1


def test_no_hit_across_tenants_or_parameters(llm_app):
    wait_cached(llm_app, "Name three primary colours.", user="bob")
    assert ask(llm_app, "Name three primary colours.", user="carol")["cached"] is False
    assert ask(llm_app, "Name three primary colours.", user="bob", max_tokens=9)["cached"] is False
    assert ask(llm_app, "Name three primary colours.", user="bob", stop=["x"])["cached"] is False
    assert ask(llm_app, "Name three primary colours.", user="bob", temperature=0.5,
               cache={"allow_sampled": True})["cached"] is False
    assert ask(llm_app, "Name three primary colours.", user="bob", cache={"skip": True})["cached"] is False
    assert ask(llm_app, "Name three primary colours.", user="bob")["cached"] is True
