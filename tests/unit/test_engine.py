"""The engine on the tiny model (float32, one local rank): token-for-token equal to Hugging Face
`generate` under continuous batching, chunked prefill and preemption; every block comes back;
finish reasons, request errors and seeded sampling."""

import random

import pytest
import torch

from serving.config import LLMConfig, ModelConfig, SchedulerConfig
from serving.detokenizer import REPLACEMENT
from serving.errors import ContextLengthError, InvalidRequestError
from parallel.build import build_engine
from serving.sampling import SamplingParams

FIRST_TEXT_ID = 7  # ids 0-6 are the tiny tokenizer's special tokens
KV_SLOTS = 112  # a small KV cache: the longest request below needs 91 slots
SMALL_KV = dict(block_size=4, num_kv_blocks=KV_SLOTS // 4)


class Engines:
    """engines(block_size, num_kv_blocks, ...) -> a local engine, built once per configuration."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.built = {}

    def __call__(self, block_size=4, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=16):
        key = (block_size, num_kv_blocks, max_num_seqs, max_num_batched_tokens)
        if key not in self.built:
            self.built[key] = build_engine(LLMConfig(
                model=ModelConfig(path=self.model_path, dtype="float32"),
                scheduler=SchedulerConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens)))
        engine = self.built[key]
        assert_idle(engine)
        return engine


@pytest.fixture(scope="module")
def engines(tiny_model):
    return Engines(tiny_model)


@pytest.fixture(autouse=True)
def no_leftovers(engines):
    """A failed test must not fail the next ones: drop whatever it left in the shared engines."""
    yield
    for engine in engines.built.values():
        for request_id in list(engine._seqs):
            engine.abort(request_id)
        engine.blocks.reset_prefix_cache()  # each test sees its own prompts' blocks only


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy tokens of one request alone, from Hugging Face's own generate (cached)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cache = {}

    def generate(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                                     eos_token_id=None, pad_token_id=2)
            cache[key] = out[0, len(prompt):].tolist()
            assert len(cache[key]) == max_tokens
        return cache[key]

    return generate


def assert_idle(engine) -> None:
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert sorted(engine.blocks._free) == list(range(engine.blocks.num_blocks))


def prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_TEXT_ID, vocab) for _ in range(n)] for n in lengths]


def run(engine, requests: list[tuple[str, list[int], SamplingParams, int]], max_steps: int = 5000):
    """Adds each (request_id, prompt, params, arrival_step) at its step and steps until all finish.

    Returns ({request_id: {"tokens", "text", "reason", "num_output_tokens"}}, [StepStats]).
    """
    results = {rid: {"tokens": [], "text": "", "reason": None} for rid, *_ in requests}
    all_stats = []
    for t in range(max_steps):
        for rid, prompt, params, arrival in requests:
            if arrival == t:
                engine.add_request(rid, prompt, params)
        if t > max(a for *_, a in requests) and not engine.has_unfinished():
            break
        outputs, stats = engine.step()
        all_stats.append(stats)
        assert stats.num_kv_blocks_used + stats.num_kv_blocks_free == engine.blocks.num_blocks
        for out in outputs:
            r = results[out.request_id]
            assert r["reason"] is None, "output after the request finished"
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["num_output_tokens"] = out.num_output_tokens
            r["num_cached_tokens"] = out.num_cached_tokens
            assert out.num_output_tokens == len(r["tokens"])
            if out.finished:
                r["reason"] = out.finish_reason
    else:
        pytest.fail("requests did not finish")
    return results, all_stats


MIXED_LENGTHS = [1, 3, 8, 16, 17, 31, 50, 80]
MIXED_MAX_TOKENS = [8, 12, 5, 10, 9, 7, 6, 11]
MIXED_ARRIVALS = [0, 0, 1, 2, 2, 4, 5, 7]


def mixed_requests(vocab: int) -> list[tuple[str, list[int], SamplingParams, int]]:
    return [(f"r{i}", p, SamplingParams(max_tokens=m, temperature=0.0), a)
            for i, (p, m, a) in enumerate(zip(prompts(0, MIXED_LENGTHS, vocab), MIXED_MAX_TOKENS, MIXED_ARRIVALS))]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_batched_greedy_equals_hf_generate_alone(engines, reference, block_size):
    engine = engines(block_size=block_size)
    requests = mixed_requests(engine.info.vocab_size)
    results, stats = run(engine, requests)
    for rid, prompt, params, _ in requests:
        assert results[rid]["tokens"] == reference(prompt, params.max_tokens), rid
        assert results[rid]["reason"] == "length"
    # the 80-token prompt was chunked while others decoded in the same steps
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats)
    assert max(s.num_prefill_tokens + s.num_decode_tokens for s in stats) <= 16
    # every prompt token once, and every output token but the last once: nothing recomputed, nothing skipped
    total = sum(s.num_prefill_tokens + s.num_decode_tokens for s in stats)
    assert total == sum(MIXED_LENGTHS) + sum(m - 1 for m in MIXED_MAX_TOKENS)
    assert_idle(engine)


def test_decode_in_small_groups_equals_hf_generate(engines, reference, monkeypatch):
    """Decode rows attend in length-sorted groups (DECODE_GROUP_SIZE); with groups of 3 every step
    has several groups, some of mixed context lengths (masked) and some not."""
    import serving.model_runner

    monkeypatch.setattr(serving.model_runner, "DECODE_GROUP_SIZE", 3)
    engine = engines(block_size=4)
    requests = mixed_requests(engine.info.vocab_size)
    results, stats = run(engine, requests)
    assert max(s.num_decode_tokens for s in stats) > 3
    for rid, prompt, params, _ in requests:
        assert results[rid]["tokens"] == reference(prompt, params.max_tokens), rid
    assert_idle(engine)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_greedy_equals_hf_generate_under_preemption(engines, reference, block_size):
    engine = engines(block_size=block_size, num_kv_blocks=KV_SLOTS // block_size, max_num_batched_tokens=32)
    requests = mixed_requests(engine.info.vocab_size)
    results, stats = run(engine, requests)
    assert sum(s.num_preempted for s in stats) > 0, "the KV budget should force preemption"
    for rid, prompt, params, _ in requests:
        assert results[rid]["tokens"] == reference(prompt, params.max_tokens), rid
    assert_idle(engine)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefix_caching_shares_computed_blocks_and_equals_hf_generate(engines, reference, block_size):
    """Prompts that share a prefix (a system prompt; the same prompt twice, as n choices send it) at
    the same step and later: they compute only what is not cached, and every output is HF's."""
    engine = engines(block_size=block_size, max_num_batched_tokens=64)
    vocab = engine.info.vocab_size
    system, = prompts(1, [37], vocab)
    tails = prompts(2, [5, 11, 1], vocab)
    same = system + tails[0]
    greedy = lambda m: SamplingParams(max_tokens=m, temperature=0.0)  # noqa: E731
    requests = [("a", same, greedy(6), 0), ("a2", same, greedy(6), 0),  # together: a2 waits a step, then shares
                ("b", system + tails[1], greedy(5), 3), ("c", system + tails[2], greedy(4), 3),
                ("d", same + [9] * 4, greedy(3), 9)]
    results, stats = run(engine, requests)
    for rid, prompt, params, _ in requests:
        assert results[rid]["tokens"] == reference(prompt, params.max_tokens), rid
    hit = sum(s.num_prefix_hit_tokens for s in stats)
    prefill = sum(s.num_prefill_tokens for s in stats)
    full = lambda n: (n - 1) // block_size * block_size  # noqa: E731 - what a prompt of n tokens can take
    shared = len(system) // block_size * block_size
    assert results["a"]["num_cached_tokens"] == 0 and results["a2"]["num_cached_tokens"] == full(len(same))
    # a2 takes a's blocks; b and c take the system prompt's; d takes a's (and a's answer's first token)
    assert hit >= full(len(same)) + 2 * min(shared, full(len(system) + 1)) + full(len(same)), hit
    assert sum(s.num_prefix_queried_tokens for s in stats) == sum(len(p) for _, p, _, _ in requests)
    total = sum(len(p) for _, p, _, _ in requests)
    assert prefill + sum(s.num_decode_tokens for s in stats) == total - hit + sum(
        p.max_tokens - 1 for _, _, p, _ in requests)
    assert_idle(engine)


def test_prefix_caching_off_computes_every_prompt(tiny_model, reference):
    engine = build_engine(LLMConfig(model=ModelConfig(path=tiny_model, dtype="float32"), scheduler=SchedulerConfig(
        block_size=4, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False)))
    prompt, = prompts(3, [20], engine.info.vocab_size)
    requests = [(f"r{i}", prompt, SamplingParams(max_tokens=3, temperature=0.0), i) for i in range(3)]
    results, stats = run(engine, requests)
    assert all(results[r]["tokens"] == reference(prompt, 3) for r, *_ in requests)
    assert sum(s.num_prefix_hit_tokens for s in stats) == 0
    assert sum(s.num_prefill_tokens for s in stats) == 3 * len(prompt)
    engine.shutdown()


def test_many_queued_requests_all_complete_and_return_their_blocks(engines):
    engine = engines(**SMALL_KV, max_num_batched_tokens=32)
    rng = random.Random(1)
    vocab = engine.info.vocab_size
    requests = [(f"q{i}", [rng.randrange(FIRST_TEXT_ID, vocab) for _ in range(rng.randint(1, 24))],
                 SamplingParams(max_tokens=rng.randint(1, 6), temperature=rng.choice([0.0, 0.8])), 0)
                for i in range(200)]
    engine.take_finished()
    results, stats = run(engine, requests)
    for rid, _, params, _ in requests:
        assert results[rid]["reason"] == "length"
        assert len(results[rid]["tokens"]) == params.max_tokens
    assert max(s.num_kv_blocks_used for s in stats) <= SMALL_KV["num_kv_blocks"]
    assert max(s.num_running for s in stats) <= 8
    assert len(engine.take_finished()) == 200
    assert_idle(engine)


def test_abort_frees_blocks_at_once(engines):
    engine = engines()
    a, b, c = prompts(2, [12, 3, 9], engine.info.vocab_size)
    engine.add_request("a", a, SamplingParams(max_tokens=50, temperature=0.0))
    engine.add_request("b", b, SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    used = engine.blocks.num_used_blocks
    a_blocks = len(engine._seqs["a"].block_table)
    assert a_blocks == 3  # the 12 prompt tokens in blocks of 4
    engine.abort("a")
    assert engine.blocks.num_used_blocks == used - a_blocks
    assert engine.take_finished()[-1].finish_reason == "abort"
    outputs, stats = engine.step()
    assert [o.request_id for o in outputs] == ["b"] and stats.num_running == 1
    engine.add_request("c", c, SamplingParams(max_tokens=50))
    engine.abort("c")  # still waiting: never scheduled
    engine.abort("b")
    engine.abort("no-such-request")
    outputs, stats = engine.step()
    assert outputs == [] and stats.num_kv_blocks_used == 0
    assert_idle(engine)


def test_max_tokens_and_eos_finish_reasons(engines):
    engine = engines()
    prompt, = prompts(3, [12], engine.info.vocab_size)
    results, _ = run(engine, [("one", prompt, SamplingParams(max_tokens=1, temperature=0.0), 0),
                              ("six", prompt, SamplingParams(max_tokens=6, temperature=0.0), 0)])
    assert results["one"]["reason"] == "length" and len(results["one"]["tokens"]) == 1
    greedy = results["six"]["tokens"]
    assert results["six"]["reason"] == "length" and len(greedy) == 6
    # a token greedy decoding first produces at step j stands in for an EOS id the random model never picks
    j = next(i for i in range(1, 6) if greedy[i] not in greedy[:i])
    eos = greedy[j]
    results, _ = run(engine, [
        ("eos", prompt, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=(eos,)), 0),
        ("cut", prompt, SamplingParams(max_tokens=j, temperature=0.0), 0),
    ])
    assert results["eos"]["reason"] == "stop"
    assert results["eos"]["tokens"] == greedy[:j + 1]  # the EOS id is returned as a token...
    assert results["eos"]["text"] == results["cut"]["text"]  # ...but never as text
    assert_idle(engine)


def test_stop_string_finishes_with_the_text_before_it(engines):
    engine = engines()
    prompt, = prompts(4, [6], engine.info.vocab_size)
    results, _ = run(engine, [("free", prompt, SamplingParams(max_tokens=20, temperature=0.0), 0)])
    text = results["free"]["text"]
    clean = text.split(REPLACEMENT)[0]
    # a two-character stop string starting inside the clean text, at its first occurrence
    start = next(i for i in range(1, len(clean) - 1) if text.find(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    results, _ = run(engine, [("stop", prompt, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)), 0)])
    assert results["stop"]["reason"] == "stop"
    assert results["stop"]["text"] == text[:start]
    assert_idle(engine)


def test_check_request_errors(engines):
    engine = engines()
    assert engine.info.max_model_len == 1024
    with pytest.raises(ContextLengthError, match="maximum context length is 1024"):
        engine.check_request([FIRST_TEXT_ID] * 1000, SamplingParams(max_tokens=25))
    engine.check_request([FIRST_TEXT_ID] * 1000, SamplingParams(max_tokens=24))  # exactly the window
    small = engines(**SMALL_KV, max_num_batched_tokens=32)
    with pytest.raises(ContextLengthError, match="KV cache"):
        small.check_request([FIRST_TEXT_ID] * 100, SamplingParams(max_tokens=13))
    small.check_request([FIRST_TEXT_ID] * 100, SamplingParams(max_tokens=12))
    for bad in (engine.info.vocab_size, -1, 10**9):
        with pytest.raises(InvalidRequestError, match="outside the vocabulary") as info:
            engine.check_request([FIRST_TEXT_ID, bad], SamplingParams(max_tokens=4))
        assert not isinstance(info.value, ContextLengthError) and info.value.status_code == 400
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.check_request([], SamplingParams())
    # add_request refuses the same way and keeps nothing
    with pytest.raises(ContextLengthError):
        engine.add_request("long", [FIRST_TEXT_ID] * 1020, SamplingParams(max_tokens=16))
    assert not engine.has_unfinished()
    engine.add_request("dup", [FIRST_TEXT_ID], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        engine.add_request("dup", [FIRST_TEXT_ID], SamplingParams(max_tokens=1))
    assert engine.num_waiting == 1
    outputs, _ = engine.step()
    assert [(o.request_id, o.finished) for o in outputs] == [("dup", True)]
    assert_idle(engine)


def test_seeded_sampling_does_not_depend_on_batch_companions(engines):
    engine = engines()
    vocab = engine.info.vocab_size
    target, p1, p2, p3 = prompts(5, [9, 30, 4, 17], vocab)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=42)
    alone, _ = run(engine, [("x", target, params, 0)])
    companions = [
        ("c1", p1, SamplingParams(max_tokens=15, temperature=0.9, seed=7), 0),
        ("c2", p2, SamplingParams(max_tokens=10, temperature=1.0), 0),  # unseeded
        ("c3", p3, SamplingParams(max_tokens=14, temperature=0.0), 1),
    ]
    first, _ = run(engine, companions + [("x", target, params, 0)])  # last in the first batch
    later, _ = run(engine, companions + [("x", target, params, 3)])  # joins while the others decode
    assert first["x"]["tokens"] == alone["x"]["tokens"]
    assert later["x"]["tokens"] == alone["x"]["tokens"]
    other_seed, _ = run(engine, [("x", target, SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=43), 0)])
    assert other_seed["x"]["tokens"] != alone["x"]["tokens"], "the seed should matter"
    assert_idle(engine)
