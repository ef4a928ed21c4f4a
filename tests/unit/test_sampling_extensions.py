"""vLLM's sampling extensions, OpenAI's penalties and logit bias, and log-probabilities, in the
engine on the tiny model (float32, one local rank), each against a reference: greedy tokens equal
Hugging Face `generate` with the equivalent logits processors, each row alone, in one mixed batch;
log-probabilities equal log_softmax of Hugging Face's logits."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, MinPLogitsWarper

from parallel.build import build_engine
from serving.config import LLMConfig, ModelConfig, SchedulerConfig
from serving.logits_processors import penalised
from serving.sampling import Sampler, SamplingParams, min_p_filter
from tests.unit.test_engine import FIRST_TEXT_ID, assert_idle, prompts, run

EOS = 1  # the tiny tokenizer's <|eos|>
USER = 4  # <|user|>, a special token


@pytest.fixture(scope="module")
def engine(tiny_model):
    # NOTE: 16 tokens a step: the 40-token prompts below are prefilled in chunks, next to decodes
    return build_engine(LLMConfig(model=ModelConfig(path=tiny_model, dtype="float32"),
                                  scheduler=SchedulerConfig(block_size=4, num_kv_blocks=256, max_num_seqs=8,
                                                            max_num_batched_tokens=16)))


@pytest.fixture(autouse=True)
def idle_after(engine):
    yield
    assert_idle(engine)


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens, as an HF logits processor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.prompt_len:], torch.ones_like(input_ids[:, self.prompt_len:],
                                                                                 dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def hf_greedy(model, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens, eos_token_id=None,
                             pad_token_id=2, **kw)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: log_softmax of HF's logits at every position (row p predicts token p + 1)."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_min_p_keeps_what_hf_min_p_keeps():
    logits = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * 3
    for min_p in (0.01, 0.1, 0.5):
        ours = min_p_filter(logits, torch.full((16,), min_p)).isfinite()
        theirs = MinPLogitsWarper(min_p)(None, logits.clone()).isfinite()
        assert torch.equal(ours, theirs) and 1 <= ours.sum(-1).min() < 512
    assert min_p_filter(logits, torch.zeros(16)).isfinite().all()  # 0 = off


def test_penalties_match_their_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0])  # three seen tokens
    counts = torch.tensor([0.0, 2.0, 1.0])
    out = penalised(logits, counts, torch.tensor([2.0, 2.0, 0.5]), torch.tensor([0.5, 0.5, 0.0]),
                    torch.tensor([0.25, 0.25, 1.0]))
    # positive -> /2; negative -> *2, generated twice -> -2*0.5 - 0.25; r < 1: positive -> /0.5, once -> -1
    assert out.tolist() == [1.0, -4.0 - 1.0 - 0.25, 2.0 - 1.0]


def test_a_high_min_p_leaves_only_the_greedy_token():
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    tokens = Sampler().sample(logits, [0, 1, 2, 3], [1.0] * 4, [1.0] * 4, [-1] * 4, [None] * 4, [0.999] * 4)
    assert tokens == logits.argmax(-1).tolist()


def test_penalties_and_logit_bias_equal_hf_generate_in_one_mixed_batch(engine, hf_model):
    """Each row's greedy tokens equal HF `generate` alone with its logits processor; plain rows
    (and sampled ones) share the batch without changing."""
    vocab = engine.info.vocab_size
    ps = prompts(3, [5, 40, 9, 17, 40, 3], vocab)
    n = 16
    bias = ((ps[2][-1], 5.0), (FIRST_TEXT_ID + 3, -100.0), (FIRST_TEXT_ID + 10, 3.5))
    cases = [  # (params, HF generate's equivalent)
        (dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
        (dict(repetition_penalty=0.7), dict(repetition_penalty=0.7)),
        (dict(logit_bias=bias), dict(sequence_bias={(t,): b for t, b in bias})),
        (dict(presence_penalty=1.5, frequency_penalty=0.5),
         dict(logits_processor=LogitsProcessorList([OpenAIPenalties(len(ps[3]), 1.5, 0.5)]))),
        (dict(frequency_penalty=-1.0), dict(logits_processor=LogitsProcessorList([OpenAIPenalties(len(ps[4]), 0, -1.0)]))),
        ({}, {}),
    ]
    requests = [(f"p{i}", p, SamplingParams(max_tokens=n, temperature=0.0, **ours), i % 3)
                for i, (p, (ours, _)) in enumerate(zip(ps, cases))]
    requests.append(("sampled", ps[0], SamplingParams(max_tokens=n, temperature=1.0, seed=3,
                                                      repetition_penalty=1.2), 0))
    results, _ = run(engine, requests)
    plain = [hf_greedy(hf_model, p, n) for p in ps]
    for i, (p, (ours, theirs)) in enumerate(zip(ps, cases)):
        expected = hf_greedy(hf_model, p, n, **theirs)
        assert results[f"p{i}"]["tokens"] == expected, ours
        if ours:
            assert expected != plain[i], f"{ours} does not change the output of prompt {i}: a weak test"
    assert (FIRST_TEXT_ID + 3) not in results["p2"]["tokens"]


def test_ignore_eos_gives_exactly_max_tokens_and_min_tokens_holds_eos_back(engine):
    prompt = prompts(4, [6], engine.info.vocab_size)[0]
    eos_first = dict(temperature=0.0, logit_bias=((EOS, 100.0),))  # EOS is always the best token
    results, _ = run(engine, [
        ("eos", prompt, SamplingParams(max_tokens=10, stop_token_ids=(EOS,), **eos_first), 0),
        ("ignore", prompt, SamplingParams(max_tokens=10, **eos_first), 0),  # ignore_eos: no EOS among stop ids
        ("min", prompt, SamplingParams(max_tokens=10, stop_token_ids=(EOS,), min_tokens=4, **eos_first), 0),
    ])
    assert results["eos"]["tokens"] == [EOS] and results["eos"]["reason"] == "stop"
    assert results["ignore"]["tokens"] == [EOS] * 10 and results["ignore"]["reason"] == "length"
    assert results["min"]["reason"] == "stop" and len(results["min"]["tokens"]) == 5
    assert EOS not in results["min"]["tokens"][:4] and results["min"]["tokens"][4] == EOS
    assert results["eos"]["text"] == results["ignore"]["text"] == ""  # EOS is special: skipped in text


def test_stop_token_ids_special_tokens_and_stop_strings(engine):
    prompt = prompts(5, [7], engine.info.vocab_size)[0]
    base, _ = run(engine, [("base", prompt, SamplingParams(max_tokens=8, temperature=0.0), 0)])
    tokens = base["base"]["tokens"]
    stop_id = tokens[3]
    k = tokens.index(stop_id)
    user = dict(max_tokens=3, temperature=0.0, logit_bias=((USER, 100.0),))
    results, _ = run(engine, [
        ("stop_id", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_id,)), 0),
        ("stop_id_kept", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_id,),
                                                include_stop_str_in_output=True), 0),
        ("special_skipped", prompt, SamplingParams(**user), 0),
        ("special_kept", prompt, SamplingParams(skip_special_tokens=False, **user), 0),
    ])
    assert results["stop_id"]["tokens"] == tokens[:k + 1] and results["stop_id"]["reason"] == "stop"
    assert engine.tokenizer.decode(tokens[:k + 1]).startswith(results["stop_id"]["text"])
    assert results["stop_id_kept"]["text"] == engine.tokenizer.decode(tokens[:k + 1])
    assert results["special_skipped"]["text"] == "" and results["special_kept"]["text"] == "<|user|>" * 3

    text = base["base"]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    results, _ = run(engine, [
        ("cut", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,)), 0),
        ("kept", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,), include_stop_str_in_output=True), 0),
        ("late", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop=(stop,), min_tokens=8), 0),
    ])
    assert results["cut"]["text"] == text[:text.index(stop)]
    assert results["kept"]["text"] == text[:text.index(stop) + len(stop)]
    assert results["late"]["reason"] == "length" and results["late"]["tokens"] == tokens


def test_logprobs_equal_log_softmax_of_hf_logits(engine, hf_model):
    """Generated tokens' and prompt tokens' log-probabilities (and the top ones), across chunked
    prefill (40-token prompts, 16 tokens a step) and a sampled row next to a greedy one."""
    vocab = engine.info.vocab_size
    ps = prompts(6, [40, 23, 5], vocab)
    requests = [
        ("greedy", ps[0], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=2), 0),
        ("sampled", ps[1], SamplingParams(max_tokens=6, temperature=1.0, seed=1, logprobs=0, prompt_logprobs=0), 0),
        ("penalised", ps[2], SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, repetition_penalty=1.5), 1),
    ]
    outs = {rid: [] for rid, *_ in requests}
    for rid, prompt, params, _ in requests:
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step()[0]:
            outs[out.request_id].append(out)
    for rid, prompt, params, _ in requests:
        generated = [t for o in outs[rid] for t in o.token_ids]
        reference = hf_logprobs(hf_model, prompt + generated)
        logprobs = [lp for o in outs[rid] for lp in o.logprobs]
        assert len(logprobs) == len(generated)
        for j, (token, lp) in enumerate(zip(generated, logprobs)):
            row = reference[len(prompt) - 1 + j]
            assert abs(lp.logprob - row[token].item()) < 1e-4
            assert lp.token == engine.tokenizer.decode([token], skip_special_tokens=False)
            top = row.topk(params.logprobs)
            assert [t for t, _ in lp.top] == [engine.tokenizer.decode([t]) for t in top.indices.tolist()]
            assert max(abs(a - b) for (_, a), b in zip(lp.top, top.values.tolist())) < 1e-4 if lp.top else True
        prompt_lps = outs[rid][0].prompt_logprobs
        if params.prompt_logprobs is None:
            assert prompt_lps is None and all(o.prompt_logprobs is None for o in outs[rid])
            continue
        assert len(prompt_lps) == len(prompt) and prompt_lps[0].logprob is None
        assert prompt_lps[0].token == engine.tokenizer.decode(prompt[:1])
        for p in range(1, len(prompt)):
            assert abs(prompt_lps[p].logprob - reference[p - 1, prompt[p]].item()) < 1e-4
            assert len(prompt_lps[p].top) == params.prompt_logprobs


def test_merged_stream_items_keep_every_logprob():
    from serving.async_engine import _Stream
    from serving.protocol import GenerationOutput, TokenLogprob

    stream = _Stream()
    first = [TokenLogprob("a", None), TokenLogprob("b", -0.5)]
    stream.add(GenerationOutput("r", "x", [5], logprobs=[TokenLogprob("x", -1.0)], prompt_logprobs=first))
    stream.add(GenerationOutput("r", "y", [6], logprobs=[TokenLogprob("y", -2.0)]))
    out = stream.take()
    assert out.text == "xy" and [lp.logprob for lp in out.logprobs] == [-1.0, -2.0]
    assert out.prompt_logprobs == first
    stream.add(GenerationOutput("r", "z", [7], logprobs=[TokenLogprob("z", -3.0)]))
    stream.add(GenerationOutput("r", "w", [8], logprobs=[TokenLogprob("w", -4.0)]))
    out = stream.take()
    assert [lp.token for lp in out.logprobs] == ["z", "w"] and out.prompt_logprobs is None
