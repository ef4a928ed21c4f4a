"""The verifier: do two prompts ask the same thing? It reads both (`text.analyze`) and decides.

Embedding similarity only finds candidates: all-MiniLM-L6-v2 scores "convert a string to an
integer" and "convert an integer to a string" near 1.0. A candidate is a hit only if it passes
every hard constraint, in this order (the first that fails is the rejection's label):

1. `numbers`: the same numbers (digits, number words, ordinals), as multisets;
2. `units`: the same units, with the case that carries meaning ("Mbps" / "MBps");
3. `negation`: as many negations ("not", "never", "without", "n't", ...);
4. `question_word`: the same why / when / where / who;
5. `entity` / `content`: every content word of each prompt aligns with a word of the other: the
   same stem or root, a synonym (the small table, then WordNet), a typo of it (one edit, or two
   in long words; never between two capitalised names), or a compound of two words ("blackhole" /
   "black hole"). A word that aligns with nothing is a rejection (`entity` if it is a name), so
   "capital of Canada" / "capital of Australia" and "sort a list" / "sort a list of dictionaries"
   are refused while "highest" / "tallest" and "mountain" / "mountian" pass. A word the rules
   leave alone may still align by the embedding model's own token vectors of the two prompts
   (cosine >= `ALIGN_THRESHOLD`, never for names): "invented" / "created", "keep" / "last".
   Function and framing words ("can you tell me", "please", "any tips") carry no weight and need
   no partner;
6. `order`: two aligned words (numbers and units too) in opposite order with the same directional
   word ("to", "from", "than", "for", ...) or the same aligned word between them in both prompts
   ("string to int" / "int to string", "dog bites man" / "man bites dog"); moving a phrase to the
   front ("In Python, how do I ...") is not a swap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from serving.cache import lexicon as lx
from serving.cache.embedder import WordVectors
from serving.cache.text import Analysis, Word, analyze
from serving.cache.wordnet import wordnet

REJECTION_LABELS = ("numbers", "units", "negation", "question_word", "entity", "content", "order")
# Cosine between two words' contextual token vectors from which they align (bench/cache_eval.py,
# tune half: synonyms the rules miss score 0.66-0.83, most other words in the same frame 0.0-0.5,
# but siblings reach 0.6-0.65: "gold" / "silver" passed at 0.6).
ALIGN_THRESHOLD = 0.7


@dataclass(frozen=True)
class Rejection:
    """Why a candidate was refused: a label from REJECTION_LABELS and a human-readable detail."""

    label: str
    detail: str


# NOTE: an analysis holds every token's forms (~260 bytes a token with tracemalloc, ~10 KB for a
# 48-token prompt). A cache entry keeps its own (`analysis_of` at insert, counted in the cache's
# capacity: `analysis_bytes`), so this memo only serves a query analysed again soon (a lookup's
# query is inserted seconds later) and fills within seconds under load: a soak's cache replica grew
# ~20 MB over five minutes while a memo of 2,048 filled with candidates' analyses.
@lru_cache(maxsize=256)
def _analyze(text: str) -> Analysis:
    return analyze(text)


def analysis_of(text: str) -> Analysis:
    """`text.analyze(text)`, memoised for recent texts."""
    return _analyze(text)


ANALYSIS_BASE_BYTES = 512
ANALYSIS_TOKEN_BYTES = 256


def analysis_bytes(analysis: Analysis) -> int:
    """Estimated memory of an analysis (fitted with tracemalloc on 16-128 token prompts)."""
    return ANALYSIS_BASE_BYTES + ANALYSIS_TOKEN_BYTES * len(analysis.tokens)


def clear_caches() -> None:
    """Forget analysed prompts and word matches (benchmarks time a first sight with this)."""
    _analyze.cache_clear()
    _word_match.cache_clear()


def _edits(x: str, y: str) -> int:
    """Damerau-Levenshtein distance (adjacent swaps count one), capped at 3."""
    if abs(len(x) - len(y)) > 2:
        return 3
    prev2, prev = None, list(range(len(y) + 1))
    for i in range(1, len(x) + 1):
        cur = [i] + [0] * len(y)
        for j in range(1, len(y) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x[i - 1] != y[j - 1]))
            if i > 1 and j > 1 and x[i - 1] == y[j - 2] and x[i - 2] == y[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return min(prev[-1], 3)


def _same_root(x: str, y: str) -> bool:
    """"paint"/"painter", "summary"/"summariz": one is a prefix of the other (4+ letters) or they
    share 6+ leading letters. Different prefixes ("zip"/"unzip", "encrypt"/"decrypt") never match."""
    short, long_ = sorted((x, y), key=len)
    if len(short) >= 4 and long_.startswith(short):
        return True
    n = 0
    while n < len(short) and short[n] == long_[n]:
        n += 1
    return n >= 6


@lru_cache(maxsize=65536)
def _word_match(x: str, raw_x: str, y: str, raw_y: str, name_x: bool, name_y: bool) -> int:
    """How two content words align (stems x, y as typed raw_x, raw_y): 0 the same word or root,
    1 a typo of it, 2 WordNet synonyms, NO_MATCH otherwise. Lower is stronger."""
    low_x, low_y = raw_x.lower(), raw_y.lower()
    if x == y or low_x == low_y or _same_root(x, y):
        return 0
    if not (name_x and name_y) and x[:1] == y[:1]:
        n = min(len(low_x), len(low_y))
        limit = 2 if n >= 9 else 1 if n >= 5 else 0
        if limit and _edits(low_x, low_y) <= limit:
            return 1
    if name_x or name_y:
        return NO_MATCH
    wn = wordnet()
    return 2 if wn and wn.are_synonyms(low_x, low_y) else NO_MATCH


NO_MATCH = 99


def _align(a: Analysis, b: Analysis, skip: set[int], words_a: Optional[WordVectors],
           words_b: Optional[WordVectors]) -> tuple[dict[int, int], list[Word], set[int]]:
    """Map each content word of `a` (by position) to one of `b`. Returns (a pos -> b pos, the words
    of `a` with no partner, the positions of `b` that a compound or collocation took: "black hole"
    for "blackhole", "come down" for "fall"). Token vectors come last."""
    pairs: dict[int, int] = {}
    unmatched: list[Word] = []
    covered: set[int] = set()
    for w in a.content:
        if w.pos in skip:
            continue
        # The strongest match, a word not yet taken first ("dog" is also a WordNet synonym of "chase").
        ranked = sorted((_word_match(w.stem, w.raw, v.stem, v.raw, w.is_name, v.is_name), v.pos in pairs.values(),
                         v.pos) for v in b.content)
        hit = ranked[0][2] if ranked and ranked[0][0] < NO_MATCH else None
        if hit is None:
            hit = _compound(w, b.tokens)
            if hit is not None:
                covered.update((hit, hit + 1))
        if hit is None and words_a and words_b:
            hit = _by_vectors(w, b, words_a, words_b)
        if hit is not None:
            pairs[w.pos] = hit
        elif not _half_of_compound(w, a, b):
            unmatched.append(w)
    return pairs, unmatched, covered


def _by_vectors(w: Word, b: Analysis, words_a: WordVectors, words_b: WordVectors) -> Optional[int]:
    """The content word of `b` whose token vector is closest to `w`'s, if close enough."""
    va = words_a.get(w.raw.lower())
    if va is None or w.is_name:
        return None
    best, best_pos = ALIGN_THRESHOLD, None
    for v in b.content:
        vb = words_b.get(v.raw.lower())
        if vb is not None and not v.is_name:
            sim = float(va.astype(np.float32) @ vb.astype(np.float32))
            if sim >= best:
                best, best_pos = sim, v.pos
    return best_pos


def _half_of_compound(w: Word, a: Analysis, b: Analysis) -> bool:
    """"hole" in "black hole" when the other prompt says "blackhole"."""
    low = w.raw.lower()
    joined = set()
    if w.pos > 0:
        joined.add(a.tokens[w.pos - 1].text + low)
    if w.pos + 1 < len(a.tokens):
        joined.add(low + a.tokens[w.pos + 1].text)
    return any(v.raw.lower().rstrip("s") in {j.rstrip("s") for j in joined} for v in b.content)


def _compound(w: Word, tokens) -> Optional[int]:
    """"blackhole" / "black hole", "fall" / "come down": the position of the pair's first token."""
    low = w.raw.lower()
    wn = wordnet()
    for i in range(len(tokens) - 1):
        first, second = tokens[i].text, tokens[i + 1].text
        if tokens[i].kind != "word" or tokens[i + 1].kind != "word":
            continue
        if first + second == low or (first + second).rstrip("s") == low.rstrip("s"):
            return i
        if wn and not w.is_name and first not in lx.STOPWORDS and wn.are_synonyms(low, f"{first}_{second}"):
            return i
    return None


def _order_conflict(a: Analysis, b: Analysis, pairs: dict[int, int]) -> Optional[tuple[str, str]]:
    """Two aligned tokens in opposite order with a common middle: a directional word or another
    aligned token that lies between them in both prompts ("string to int" / "int to string",
    "dog bites man" / "man bites dog"). Moving a phrase to the front ("In Python, how do I read a
    CSV file?") reverses pairs too, but leaves nothing between them in both."""
    items = sorted(pairs.items())
    inverse = {q: p for p, q in items}
    for i, (pa_x, pb_x) in enumerate(items):
        for pa_y, pb_y in items[i + 1:]:
            if pb_x > pb_y and _middle(a, pa_x, pa_y, {p: p for p in pairs}) & _middle(b, pb_y, pb_x, inverse):
                return a.tokens[pa_x].raw, a.tokens[pa_y].raw
    return None


def _middle(p: Analysis, lo: int, hi: int, aligned: dict[int, int]) -> set:
    """What lies between positions lo < hi: directional words, and aligned tokens (named by their
    position in the first prompt, so both prompts' middles compare)."""
    out: set = set()
    for i in range(lo + 1, hi):
        if p.tokens[i].text in lx.DIRECTIONAL:
            out.add(p.tokens[i].text)
        elif i in aligned:
            out.add(("#", aligned[i]))
    return out


def _anchors(a: Analysis, b: Analysis, pairs: dict[int, int]) -> dict[int, int]:
    """Aligned content words plus numbers and units matched in order of appearance."""
    out = dict(pairs)
    for left, right in ((a.numbers, b.numbers), (a.units, b.units)):
        used: set[int] = set()
        for value, pos in left:
            match = next((q for v, q in right if v == value and q not in used), None)
            if match is not None:
                used.add(match)
                out[pos] = match
    return out


_CAUSAL = frozenset(("cause", "caus", "mak", "reason", "lead"))


def _implies_why(p: Analysis) -> bool:
    """"What makes the sky blue?", "What causes migraines?" ask why (the verb then needs no partner)."""
    return bool(p.content) and p.content[0].stem in _CAUSAL


def verify(query: str, candidate: str, query_words: Optional[WordVectors] = None,
           candidate_words: Optional[WordVectors] = None,
           candidate_analysis: Optional[Analysis] = None) -> Optional[Rejection]:
    """Why `query` and `candidate` do not ask the same thing, or None if they do. The word vectors
    (from the embedder) are optional: without them the rules decide alone. `candidate_analysis`:
    the candidate's `analysis_of`, if the caller keeps it."""
    a, b = _analyze(query), candidate_analysis or _analyze(candidate)
    na, nb = sorted(v for v, _ in a.numbers), sorted(v for v, _ in b.numbers)
    if na != nb:
        return Rejection("numbers", f"{na} vs {nb}")
    ua, ub = Counter(u for u, _ in a.units), Counter(u for u, _ in b.units)
    if ua != ub:
        return Rejection("units", f"{sorted(ua.elements())} vs {sorted(ub.elements())}")
    if a.num_negations != b.num_negations:
        return Rejection("negation", f"{a.num_negations} vs {b.num_negations} negations")
    qa, qb = a.question_words, b.question_words
    skip_a, skip_b = set(), set()
    if qa != qb:
        if qa == {"why"} and not qb and _implies_why(b):
            skip_b.add(b.content[0].pos)
        elif qb == {"why"} and not qa and _implies_why(a):
            skip_a.add(a.content[0].pos)
        else:
            return Rejection("question_word", f"{sorted(qa)} vs {sorted(qb)}")
    pairs, only_a, covered_b = _align(a, b, skip_a, query_words, candidate_words)
    _, only_b, covered_a = _align(b, a, skip_b, candidate_words, query_words)
    unmatched = [w for w in only_a if w.pos not in covered_a] + [w for w in only_b if w.pos not in covered_b]
    if unmatched:
        names = [w.raw for w in unmatched if w.is_name]
        if names:
            return Rejection("entity", f"no counterpart for {names}")
        return Rejection("content", f"no counterpart for {[w.raw for w in unmatched]}")
    conflict = _order_conflict(a, b, _anchors(a, b, pairs))
    if conflict:
        return Rejection("order", f"{conflict[0]!r} / {conflict[1]!r} swapped")
    return None
