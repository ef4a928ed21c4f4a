"""The API beyond the core fields, over HTTP on the deployed app (TP=2): vLLM's sampling
extensions, penalties, logit bias, log-probabilities, n > 1, /tokenize and /detokenize. Every
response and stream chunk is validated by the official `openai` package's own pydantic types,
strictly; effects are checked against Hugging Face on the same folder."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import TINY_NAME

EOS = 1  # the tiny tokenizer's <|eos|>
NO_CACHE = {"cache": {"skip": True, "no_store": True}}


@pytest.fixture(scope="module")
def hf(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_model))


def post(base: str, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def stream(base: str, path: str, body: dict) -> list[dict]:
    """The `data:` payloads of an SSE response, up to [DONE]."""
    events = []
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def completion(base: str, **body) -> Completion:
    return Completion.model_validate(post(base, "/v1/completions", {"model": TINY_NAME, **NO_CACHE, **body}),
                                     strict=True)


def chat(base: str, **body) -> ChatCompletion:
    body.setdefault("messages", [{"role": "user", "content": "Hello there"}])
    return ChatCompletion.model_validate(post(base, "/v1/chat/completions", {"model": TINY_NAME, **NO_CACHE, **body}),
                                         strict=True)


def completion_chunk(data: dict) -> dict:
    """A completions stream chunk, validated strictly by the openai package's `Completion` type.
    NOTE: that type says finish_reason is never null, yet OpenAI streams null before a choice's last
    chunk (the client parses without validating): only that one field of a middle chunk is let through."""
    checked = copy.deepcopy(data)
    for choice in checked["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
    Completion.model_validate(checked, strict=True)
    return data


def log_softmax(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf[0](torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_chat_logprobs_plain_and_streamed(llm_app, hf):
    tok = hf[1]
    res = chat(llm_app, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, return_token_ids=True)
    choice = res.choices[0]
    ids = choice.model_extra["token_ids"]
    content = choice.logprobs.content
    assert len(content) == len(ids) == res.usage.completion_tokens
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                         tokenize=False), add_special_tokens=False).input_ids
    reference = log_softmax(hf, prompt + ids)
    for j, (token, lp) in enumerate(zip(ids, content)):
        row = reference[len(prompt) - 1 + j]
        assert abs(lp.logprob - row[token].item()) < 1e-4
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
        assert abs(lp.top_logprobs[0].logprob - row.max().item()) < 1e-4
        assert lp.bytes == list(lp.token.encode())

    chunks = stream(llm_app, "/v1/chat/completions", {
        "model": TINY_NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
        "temperature": 0, "logprobs": True, "top_logprobs": 3, "stream_options": {"include_usage": True}, **NO_CACHE})
    parsed = [ChatCompletionChunk.model_validate(c, strict=True) for c in chunks]
    streamed = [lp for c in parsed if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.model_dump() for lp in streamed] == [lp.model_dump() for lp in content]
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == choice.message.content
    assert parsed[-1].usage.completion_tokens == len(ids)


def test_completions_echo_logprobs_score_the_prompt(llm_app, hf):
    """NOTE: the prompt's first token has no log-probability: null, as OpenAI and vLLM send it, though
    the openai package's own type says a list of floats. The client parses it (it does not validate
    responses); strict validation is checked on the same request without echo."""
    from openai import OpenAI

    tok = hf[1]
    prompt = "A journey of a thousand miles"
    client = OpenAI(base_url=llm_app + "/v1", api_key="unused", timeout=60, max_retries=0)
    res = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                    echo=True, extra_body=NO_CACHE)
    plain = completion(llm_app, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)  # strictly validated
    choice = res.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    assert choice.logprobs.token_logprobs[-5:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    prompt_ids = tok(prompt).input_ids
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == len(prompt_ids) + res.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:len(prompt_ids)] == [tok.decode([t]) for t in prompt_ids]
    reference = log_softmax(hf, prompt_ids)
    for p in range(1, len(prompt_ids)):
        assert abs(lp.token_logprobs[p] - reference[p - 1, prompt_ids[p]].item()) < 1e-4
        assert len(lp.top_logprobs[p]) <= 2
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chunks = list(client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=5, temperature=0,
                                            logprobs=2, echo=True, stream=True, extra_body=NO_CACHE))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    for c in stream(llm_app, "/v1/completions", {"model": TINY_NAME, "prompt": prompt, "max_tokens": 5,
                                                  "temperature": 0, "logprobs": 2, **NO_CACHE}):
        completion_chunk(c)


@pytest.mark.parametrize("stream", [False, True])
def test_n2_whose_choices_fail_with_a_4xx_gets_that_4xx_not_a_503(llm_app, stream):
    # NOTE: each choice is its own request; its error (here: too long for the context) is the
    # answer's, not a dead replica's (it was once turned into 503 replica_died)
    body = {"model": TINY_NAME, "prompt": "word " * 500, "max_tokens": 900, "n": 2, "stream": stream, **NO_CACHE}
    r = httpx.post(llm_app + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == "prompt"


def test_seeded_n2_is_reproducible_its_choices_differ_and_streams_with_indexes(llm_app):
    body = dict(prompt="The quick brown fox", max_tokens=12, temperature=1.0, seed=11, n=2)
    a, b = completion(llm_app, **body), completion(llm_app, **body)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 24
    chunks = [completion_chunk(c) for c in stream(llm_app, "/v1/completions", {
        "model": TINY_NAME, **body, "stream_options": {"include_usage": True}, **NO_CACHE})]
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert [texts[0], texts[1]] == [c.text for c in a.choices]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == 2
    assert chunks[-1]["usage"]["completion_tokens"] == 24 and not chunks[-1]["choices"]

    res = chat(llm_app, max_tokens=6, temperature=0.8, seed=5, n=2, return_token_ids=True)
    assert [c.index for c in res.choices] == [0, 1]
    assert res.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in res.choices)
    chunks = [ChatCompletionChunk.model_validate(c, strict=True) for c in stream(llm_app, "/v1/chat/completions", {
        "model": TINY_NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
        "temperature": 0.8, "seed": 5, "n": 2, "logprobs": True, "top_logprobs": 1, **NO_CACHE})]
    for i, choice in enumerate(res.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == choice.finish_reason
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) == len(choice.model_extra["token_ids"])


def test_ignore_eos_min_tokens_and_stop_token_ids(llm_app):
    eos_first = {"prompt": "Numbers: 0 1 2", "temperature": 0, "logit_bias": {str(EOS): 100}, "max_tokens": 7}
    stopped = completion(llm_app, **eos_first)
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    ignored = completion(llm_app, ignore_eos=True, **eos_first)
    assert ignored.usage.completion_tokens == 7 and ignored.choices[0].finish_reason == "length"
    held = completion(llm_app, min_tokens=4, return_token_ids=True, **eos_first)
    ids = held.choices[0].model_extra["token_ids"]
    assert len(ids) == 5 and EOS not in ids[:4] and ids[4] == EOS

    base = completion(llm_app, prompt="Numbers: 0 1 2", temperature=0, max_tokens=8, return_token_ids=True)
    ids = base.choices[0].model_extra["token_ids"]
    cut = completion(llm_app, prompt="Numbers: 0 1 2", temperature=0, max_tokens=8, stop_token_ids=[ids[2]])
    assert cut.usage.completion_tokens == ids.index(ids[2]) + 1 and cut.choices[0].finish_reason == "stop"
    for extra in ({"min_p": 0.2, "temperature": 0.9, "seed": 1}, {"include_stop_str_in_output": True, "stop": ["e"]},
                  {"skip_special_tokens": False}, {"presence_penalty": 1.0, "frequency_penalty": 0.5}):
        assert completion(llm_app, prompt="Numbers", max_tokens=4, **extra).choices[0].finish_reason
        assert chat(llm_app, max_tokens=4, **extra).choices[0].finish_reason


def test_repetition_penalty_equals_hf_generate(llm_app, hf):
    model, tok = hf
    ids = tok("To be or not to be, that").input_ids
    res = completion(llm_app, prompt=ids, max_tokens=16, temperature=0, repetition_penalty=1.4, return_token_ids=True)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, repetition_penalty=1.4,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert res.choices[0].model_extra["token_ids"] == out[0, len(ids):].tolist()


def test_n_choices_share_the_prompts_kv_blocks_and_each_equals_hf_generate(llm_app, hf):
    """n = 3 greedy: one replica's engine runs the choices, which take the first choice's prompt
    blocks (block_size 8 here) instead of computing them again; each choice is HF's greedy answer."""
    from ray import serve

    model, tok = hf
    ids = tok("The history of the city begins with a small settlement on the river, where traders "
              "from the north and the south met to exchange salt, grain and cloth").input_ids
    handle = serve.get_deployment_handle(f"LLMServer:{TINY_NAME}", app_name="llm")
    before = handle.stats.remote().result(timeout_s=30)
    res = completion(llm_app, prompt=ids, max_tokens=8, temperature=0, n=3, return_token_ids=True)
    after = handle.stats.remote().result(timeout_s=30)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    assert [c.model_extra["token_ids"] for c in res.choices] == [out[0, len(ids):].tolist()] * 3
    hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert hit >= 2 * ((len(ids) - 1) // 8 * 8), (hit, len(ids))  # choices 1 and 2 took choice 0's full blocks
    assert after["prefix_cache_queried_tokens"] - before["prefix_cache_queried_tokens"] == 3 * len(ids)


def test_tokenize_and_detokenize(llm_app, hf):
    tok = hf[1]
    text = "Hello, world! How are"
    res = post(llm_app, "/tokenize", {"model": TINY_NAME, "prompt": text, "return_token_strs": True})
    assert res["tokens"] == tok(text).input_ids and res["count"] == len(res["tokens"])
    assert res["token_strs"] == tok.convert_ids_to_tokens(res["tokens"]) and res["max_model_len"] > 0
    assert post(llm_app, "/detokenize", {"model": TINY_NAME, "tokens": res["tokens"]})["prompt"] == tok.decode(
        res["tokens"])
    messages = [{"role": "user", "content": "Hello there"}]
    templated = post(llm_app, "/tokenize", {"model": TINY_NAME, "messages": messages})
    assert templated["count"] == chat(llm_app, messages=messages, max_tokens=1, temperature=0).usage.prompt_tokens
    err = post(llm_app, "/detokenize", {"model": TINY_NAME, "tokens": [10 ** 9]}, 400)["error"]
    assert err["param"] == "tokens"
    assert post(llm_app, "/tokenize", {"model": "nope", "prompt": "x"}, 404)["error"]["param"] == "model"


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"n": 0}, "n"),
    ({"n": 2, "best_of": 3}, "best_of"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": [10 ** 6], "echo": True}, "prompt"),  # found by the schemathesis run: it said "tokens"
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"logprobs": 99}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
])
def test_errors_name_their_parameter(llm_app, body, param):
    err = post(llm_app, "/v1/completions", {"model": TINY_NAME, "prompt": "x", **body}, 400)["error"]
    assert err["param"] == param, err


def test_a_too_long_prompt_names_its_field(llm_app):
    err = post(llm_app, "/v1/completions", {"model": TINY_NAME, "prompt": "word " * 3000}, 400)["error"]
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    err = post(llm_app, "/v1/chat/completions", {"model": TINY_NAME, "messages": [
        {"role": "user", "content": "word " * 3000}]}, 400)["error"]
    assert err["param"] == "messages"


def test_chat_errors_name_their_parameter(llm_app):
    base = {"model": TINY_NAME, "messages": [{"role": "user", "content": "x"}]}
    assert post(llm_app, "/v1/chat/completions", {**base, "top_logprobs": 2}, 400)["error"]["param"] == "top_logprobs"
    assert post(llm_app, "/v1/chat/completions", {**base, "echo": True}, 400)["error"]["param"] == "echo"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_benchmark_client_request(llm_app, path):
    """What guidellm sends for a fixed output length: ignore_eos, stop null, stream_options with
    vLLM's continuous_usage_stats (usage in every chunk)."""
    body = {"model": TINY_NAME, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "ignore_eos": True, "stop": None, "logit_bias": {str(EOS): 100}, **NO_CACHE}
    if path == "/v1/completions":
        chunks = [completion_chunk(c) for c in stream(llm_app, path, {**body, "prompt": "x", "max_tokens": 9})]
    else:
        chunks = [ChatCompletionChunk.model_validate(c, strict=True).model_dump() for c in stream(llm_app, path, {
            **body, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9})]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 9 and all(c["usage"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
