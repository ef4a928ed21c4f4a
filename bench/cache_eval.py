"""Evaluate the semantic cache's hit decision on labelled prompt pairs, one half at a time.

    python -m bench.cache_eval [--half tune|test|both] [--threshold 0.6] [--errors] [--sweep] [--timing]
                               [--json out.json]

`bench/data/cache_eval_{tune,test}.jsonl` hold (cached prompt, new prompt) pairs written as users
type them, before the verifier was tuned: paraphrases (`same: true`) that must hit, each of a kind
(word order, synonym, typo/case, contraction, politeness, imperative, abbreviation, number words),
and near misses that must not (changed number, entity, negation, unit, direction, scope, other
topic). The test half was committed, frozen, before any tuning; tune on `tune` only.

Every pair gets its own cache key: its cached prompt goes into a real `CacheStore` and the new prompt
takes the lookup's path: the normalised exact-repeat map, then `SemanticCacheCore.decide`
(candidate search plus the verifier). Reported per half: precision and recall overall, recall per
paraphrase kind, false hits and precision per near-miss kind (the hits of all paraphrases against
that kind's false hits), and the rejection labels that turned each kind away.

`--timing` measures what the verifier adds to a hit: `verify` on every paraphrase pair of the half
with nothing cached (each prompt analysed for the first time), and embedding one prompt with its
word vectors (`load_encoder`) against sentence-transformers' plain `encode`, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from serving.cache.embedder import BatchingEmbedder, load_encoder
from serving.cache.key import CacheKey
from serving.cache.semantic import SemanticCacheCore
from serving.cache.store import CacheStore
from serving.cache.text import normalize
from serving.cache.types import CachedAnswer
from serving.cache.verifier import clear_caches, verify
from serving.config import CacheConfig

DATA_DIR = Path(__file__).parent / "data"
SWEEP = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def load_half(half: str) -> list[dict]:
    with open(DATA_DIR / f"cache_eval_{half}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def pair_key(i: int) -> CacheKey:
    return CacheKey(model="eval", kind="chat", tenant="", temperature=0.0, top_p=1.0, top_k=-1, seed=None,
                    max_tokens=None, stop=(), context=f"pair-{i}")


def decide_all(pairs: list[dict], vectors: dict, words: dict, threshold: float) -> list[tuple[bool, str]]:
    """(hit, reason) per pair through the real store and core; reason is "exact" or "similar" for a
    hit, else the rejection label (or "below_threshold")."""
    dim = next(iter(vectors.values())).shape[0]
    store = CacheStore(dim, 1 << 30)
    core = SemanticCacheCore(store, BatchingEmbedder(lambda t: None), threshold, max_candidates=5)
    answer = CachedAnswer(text="", finish_reason="stop", num_prompt_tokens=0, num_output_tokens=0)
    out = []
    for i, p in enumerate(pairs):
        store.insert(pair_key(i), p["cached"], normalize(p["cached"]), vectors[p["cached"]], answer,
                     words=words[p["cached"]])
        if store.get_exact(pair_key(i), normalize(p["query"])) is not None:
            out.append((True, "exact"))
            continue
        decision = core.decide(pair_key(i), p["query"], vectors[p["query"]], words[p["query"]])
        out.append((True, "similar") if decision.hit else (False, decision.reason))
    return out


def summarize(pairs: list[dict], decisions: list[tuple[bool, str]]) -> dict:
    """Precision/recall overall and by kind, with the reasons behind each kind's decisions."""
    by_kind: dict[str, list] = defaultdict(list)
    for p, d in zip(pairs, decisions):
        by_kind[p["kind"]].append((p, d))
    tp = sum(h for p, (h, _) in zip(pairs, decisions) if p["same"])
    fp = sum(h for p, (h, _) in zip(pairs, decisions) if not p["same"])
    num_same = sum(p["same"] for p in pairs)
    kinds = {}
    for kind, rows in sorted(by_kind.items()):
        hits = sum(h for _, (h, _) in rows)
        row = {"same": rows[0][0]["same"], "pairs": len(rows), "hits": hits,
               "reasons": dict(Counter(r for _, (_, r) in rows).most_common())}
        if row["same"]:
            row["recall"] = hits / len(rows)
        else:
            row["precision"] = tp / (tp + hits) if tp + hits else 1.0
        kinds[kind] = row
    return {"pairs": len(pairs), "true_hits": tp, "false_hits": fp,
            "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / num_same if num_same else 0.0,
            "kinds": kinds}


def print_summary(half: str, s: dict) -> None:
    print(f"\n== {half} half: {s['pairs']} pairs; precision {s['precision']:.3f} "
          f"({s['false_hits']} false hits), recall {s['recall']:.3f} ({s['true_hits']} true hits)")
    print(f"{'kind':<14}{'pairs':>6}{'hits':>6}{'recall':>8}{'precision':>11}  reasons")
    for same in (True, False):
        for kind, r in s["kinds"].items():
            if r["same"] != same:
                continue
            rec = f"{r['recall']:.3f}" if same else ""
            prec = "" if same else f"{r['precision']:.3f}"
            reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
            print(f"{kind:<14}{r['pairs']:>6}{r['hits']:>6}{rec:>8}{prec:>11}  {reasons}")


def _p50_p99(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_verifier(pairs: list[dict], words: dict, encode, rounds: int = 3) -> dict:
    """The verifier's cost per hit, cold; and the word vectors' share of embedding one prompt."""
    from sentence_transformers import SentenceTransformer

    from serving.cache.embedder import default_model_path
    from serving.cache.wordnet import wordnet

    wordnet()  # loaded once per replica, at start
    same = [p for p in pairs if p["same"]]
    verify_s = []
    for _ in range(rounds):
        for p in same:
            clear_caches()
            t = time.perf_counter()
            verify(p["query"], p["cached"], words[p["query"]], words[p["cached"]])
            verify_s.append(time.perf_counter() - t)
    plain = SentenceTransformer(default_model_path(), device="cpu")
    ours_s, plain_s = [], []
    for p in same:  # one text at a time, as an idle cache embeds a lone lookup
        t = time.perf_counter()
        encode([p["query"]])
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain.encode([p["query"]], normalize_embeddings=True, show_progress_bar=False)
        plain_s.append(time.perf_counter() - t)
    v, o, b = _p50_p99(verify_s), _p50_p99(ours_s), _p50_p99(plain_s)
    print(f"\nverifier, cold, on {len(same)} paraphrase pairs x {rounds}: p50 {v[0]:.3f} ms, p99 {v[1]:.3f} ms")
    print(f"embedding one prompt: with word vectors p50 {o[0]:.2f} ms (p99 {o[1]:.2f}); "
          f"sentence-transformers encode p50 {b[0]:.2f} ms (p99 {b[1]:.2f}); ratio {o[0] / b[0]:.2f}x; "
          f"load average {os.getloadavg()[0]:.1f}")
    return {"verify_p50_ms": v[0], "verify_p99_ms": v[1], "embed_with_words_p50_ms": o[0],
            "embed_plain_p50_ms": b[0], "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--half", choices=("tune", "test", "both"), default="both")
    ap.add_argument("--threshold", type=float, default=CacheConfig().similarity_threshold)
    ap.add_argument("--errors", action="store_true", help="print each wrong decision with its reason")
    ap.add_argument("--sweep", action="store_true", help="also sweep the similarity threshold")
    ap.add_argument("--timing", action="store_true", help="also time the verifier and the word vectors")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    halves = ("tune", "test") if args.half == "both" else (args.half,)
    data = {h: load_half(h) for h in halves}
    start = time.perf_counter()
    encode, _ = load_encoder(num_threads=1 if args.timing else 2)
    texts = sorted({t for pairs in data.values() for p in pairs for t in (p["cached"], p["query"])})
    encoded = encode(texts)
    vectors, words = dict(zip(texts, encoded.vectors)), dict(zip(texts, encoded.words))
    print(f"{len(texts)} texts embedded in {time.perf_counter() - start:.1f} s; threshold {args.threshold}")

    results = {}
    for half, pairs in data.items():
        decisions = decide_all(pairs, vectors, words, args.threshold)
        results[half] = summarize(pairs, decisions)
        print_summary(half, results[half])
        if args.errors:
            for p, (hit, reason) in zip(pairs, decisions):
                if hit != p["same"]:
                    sim = float(vectors[p["cached"]] @ vectors[p["query"]])
                    print(f"  [{p['kind']}] sim={sim:.3f} {'HIT ' if hit else 'MISS'} {reason:<16} "
                          f"{p['cached']!r} / {p['query']!r}")
        if args.sweep:
            print(f"{'threshold':>9}  precision / recall (whole decision)")
            for t in SWEEP:
                s = summarize(pairs, decide_all(pairs, vectors, words, t))
                print(f"{t:>9.2f}  {s['precision']:.3f} / {s['recall']:.3f}")
    timing = time_verifier(data[halves[0]], words, encode) if args.timing else None
    if args.json:
        args.json.write_text(json.dumps({"threshold": args.threshold, "halves": results, "timing": timing},
                                        indent=1))


if __name__ == "__main__":
    main()
