"""Speculative decoding in the engine, on the embedded target (float32, one local rank): greedy output
equals speculation off token for token for every proposer, in a mixed concurrent batch with
preemption forced; sampled output keeps the target's distribution (chi-square, a wrong rule fails).

The draft runs in this process here (`DraftRunner`); tests/integration/test_spec_served.py runs it in
its Ray actor, with tensor_parallel_size 2."""

import random
from collections import Counter

import pytest
import torch

from parallel.build import build_engine
from serving.config import LLMConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from serving.models import EMBEDDED_TARGET, default_draft_path
from serving.sampling import SamplingParams
from serving.spec.draft import DraftRunner
from serving.spec.proposers import DraftProposer
from serving.spec.speculator import Speculator, measure_step_cost
from tests.unit.test_engine import run as run_requests
from tests.unit.test_spec_acceptance import chi_square, chi_square_critical

BLOCK_SIZE = 4


def make_engine(method: str, num_kv_blocks: int, adaptive: bool = False, k: int = 4, max_num_seqs: int = 8):
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k, adaptive=adaptive)
    config = LLMConfig(model=ModelConfig(path=str(EMBEDDED_TARGET), dtype="float32"),
                       scheduler=SchedulerConfig(block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
                                                 max_num_seqs=max_num_seqs,
                                                 max_num_batched_tokens=max(64, 3 * max_num_seqs)),
                       speculative=spec if method not in ("draft", "auto") else SpeculativeConfig())
    engine = build_engine(config)
    if method in ("draft", "auto"):  # the draft in this process: no Ray in unit tests
        from serving.spec.proposers import NgramProposer

        proposers = [DraftProposer(DraftRunner(default_draft_path(), "float32", num_kv_blocks, BLOCK_SIZE))]
        if method == "auto":
            proposers.insert(0, NgramProposer(spec.ngram_max, spec.ngram_min))
        engine.speculator = Speculator(spec, proposers, measure_step_cost(engine.executor, BLOCK_SIZE, num_kv_blocks),
                                       engine.info.max_model_len)
        engine.speculator.measure_proposers(BLOCK_SIZE, num_kv_blocks)
    return engine


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]


def run(engine, requests):
    """requests: (id, prompt, params, arrival step), stepped by test_engine's `run` (its checks on every
    output and step). Returns ({id: tokens}, {id: reason}, [StepStats]); every block came back."""
    results, all_stats = run_requests(engine, requests)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return ({rid: r["tokens"] for rid, r in results.items()}, {rid: r["reason"] for rid, r in results.items()},
            all_stats)


QUESTIONS = ["What is a river?", "Tell me a verse about mercy.", 'What does "light" mean?', "What is a tree?",
             "Tell me a verse about bread.", "What is a ship?"]


def mixed_requests(engine):
    """Chats (stopping at EOS) and random prompts (running to max_tokens, with a stop string), arriving
    over the first steps; one sampled request rides along (it must not disturb the greedy ones)."""
    rng = random.Random(0)
    eos = tuple(engine.info.eos_token_ids)
    reqs = [(f"chat{i}", chat(engine, q), SamplingParams(max_tokens=40 + 7 * i, temperature=0.0, stop_token_ids=eos), i)
            for i, q in enumerate(QUESTIONS)]
    reqs += [(f"rand{i}", [rng.randrange(6, 4096) for _ in range(5 + 9 * i)],
              SamplingParams(max_tokens=30 + 3 * i, temperature=0.0, stop=("LORD said",)), 2 * i) for i in range(3)]
    reqs.append(("sampled", chat(engine, "What is a cat?"), SamplingParams(max_tokens=20, temperature=0.8, seed=3), 1))
    return reqs


def greedy_reference() -> tuple[dict, dict]:
    """The mixed requests with speculation off: ({id: tokens}, {id: reason})."""
    engine = make_engine("none", num_kv_blocks=512)
    tokens, reasons, _ = run(engine, mixed_requests(engine))
    return tokens, reasons


@pytest.fixture(scope="module")
def reference():
    return greedy_reference()


@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft", "auto"])
def test_greedy_with_speculation_equals_speculation_off_under_preemption(method, reference):
    engine = make_engine(method, num_kv_blocks=48)  # 192 slots for ~700 tokens of sequences: preemption
    tokens, reasons, stats = run(engine, mixed_requests(engine))
    want_tokens, want_reasons = reference
    for rid in want_tokens:
        if rid != "sampled":
            assert tokens[rid] == want_tokens[rid], rid
            assert reasons[rid] == want_reasons[rid], rid
    assert sum(s.num_preempted for s in stats) > 0, "the KV budget should force preemption"
    proposed = sum(s.num_spec_proposed for s in stats)
    accepted = sum(s.num_spec_accepted for s in stats)
    assert proposed > 0 and 0 < accepted <= proposed
    assert max(s.num_seqs for s in stats) > 3  # a concurrent batch
    # fewer steps than tokens: several tokens per step
    steps_with_output = sum(1 for s in stats if s.num_seqs)
    assert steps_with_output < sum(len(t) for t in tokens.values())


def test_adaptive_speculation_keeps_greedy_output_and_reports_per_proposer(reference):
    engine = make_engine("auto", num_kv_blocks=512, adaptive=True)
    tokens, _, stats = run(engine, mixed_requests(engine))
    for rid, want in reference[0].items():
        if rid != "sampled":
            assert tokens[rid] == want, rid
    by = Counter()
    for s in stats:
        for name, (proposed, accepted, rows) in s.spec_by_proposer.items():
            assert accepted <= proposed and rows <= proposed
            by[name] += proposed
    assert set(by) <= {"ngram", "draft"}


def target_pair_distribution(prompt: list[int], top_k: int) -> dict[tuple[int, int], float]:
    """P(first two output tokens) under the target with temperature 1 and top-k, from HF forwards."""
    from transformers import AutoModelForCausalLM

    from serving.spec.acceptance import target_probs

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval()
    with torch.inference_mode():
        p1 = target_probs(model(torch.tensor([prompt])).logits[0, -1:], [1.0], [top_k], [1.0])[0]
        out = {}
        for t1 in p1.nonzero()[:, 0].tolist():
            p2 = target_probs(model(torch.tensor([prompt + [t1]])).logits[0, -1:], [1.0], [top_k], [1.0])[0]
            for t2 in p2.nonzero()[:, 0].tolist():
                out[(t1, t2)] = float(p1[t1] * p2[t2])
    return out


def sample_pairs(engine, prompt: list[int], top_k: int, n: int) -> Counter:
    """n requests (unseeded, temperature 1, top-k) in batches; the first two tokens of each. The second
    token comes from a verifying step: the first is sampled at the end of the prompt."""
    counts = Counter()
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k)
    for batch in range(0, n, 200):
        reqs = [(f"s{batch + i}", prompt, params, 0) for i in range(min(200, n - batch))]
        tokens, _, _ = run(engine, reqs)
        counts.update(tuple(t[:2]) for t in tokens.values())
    return counts


@pytest.mark.parametrize("method", ["draft", "early_exit"])
def test_sampled_speculation_keeps_the_target_distribution(method, monkeypatch):
    """2,000 samples of the first two tokens, top-k 4 (a vocabulary of 4 per position, 16 pairs), against
    the target's own probabilities; the same test with a rule that accepts every proposal fails."""
    engine = make_engine(method, num_kv_blocks=1024, k=1, max_num_seqs=200)
    prompt = chat(engine, "Tell me a verse about mercy.")
    want = target_pair_distribution(prompt, top_k=4)
    cells = sorted(want)

    def fits(counts: Counter) -> bool:
        if not set(counts) <= set(cells):
            return False  # a pair the target never samples
        stat, df = chi_square([counts[c] for c in cells], [want[c] for c in cells])
        return stat < chi_square_critical(df)

    counts = sample_pairs(engine, prompt, 4, 2000)
    assert fits(counts), counts

    import serving.spec.verify

    def accept_all(p, q, proposals, accept_u, resample_u):  # wrong: the proposer's distribution leaks through
        return [*proposals, int(serving.spec.verify.sample_from(p[-1][None], torch.tensor([resample_u]))[0])]

    monkeypatch.setattr(serving.spec.verify, "accept_sampled", accept_all)
    assert not fits(sample_pairs(engine, prompt, 4, 2000))
