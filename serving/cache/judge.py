"""The second check: do two prompts ask the same thing?

Embedding similarity only finds candidates: all-MiniLM-L6-v2 scores "convert a string to an integer"
and "convert an integer to a string" near 1.0. A candidate is a hit only if both prompts agree on
what changes an answer, read from the text itself (`text.parse`):

1. numbers (digits and number words, in order);
2. units, with their case ("Mbps" is not "MBps"), and percent signs;
3. negations (how many: "not", "never", "without", "n't", ...);
4. question words that change the answer (why / when / where / who);
5. named entities and identifiers (capitalised or mixed-case words, words with digits or "_");
6. the order of the shared content words, numbers and units where order carries meaning: two of
   them swapped with a directional word ("to", "from", "than", ...) or another shared content word
   between them in both prompts ("dog bites man" / "man bites dog");
7. the content words themselves, after stemming and a small synonym table: a word that only one
   prompt has is a rejection unless the other has a word of the same root ("painter" / "painted").

Each rule can only reject; `judge` returns the first reason it found, or None for "same request".
No model reads both prompts: no cross-encoder ships its weights in a PyPI package, and single-word
similarity from the embedding model does not separate synonyms from antonyms (docs/cache.md).
"""

from __future__ import annotations

from typing import Optional

from serving.cache.text import _DIRECTIONAL, Parsed, normalize, parse

__all__ = ["judge", "normalize", "parse"]


def _first_positions(content: list[tuple[str, int]], shared: set[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for word, pos in content:
        if word in shared and word not in out:
            out[word] = pos
    return out


def _separated(p: Parsed, lo: int, hi: int, shared_pos: set[int]) -> bool:
    """Whether a directional marker or another shared content word lies between positions lo < hi."""
    return any(p.tokens[i] in _DIRECTIONAL or i in shared_pos for i in range(lo + 1, hi))


def _order_conflict(a: Parsed, b: Parsed, shared: set[str]) -> Optional[tuple[str, str]]:
    """A pair of shared words in opposite order, separated in both prompts. "water's chemical
    formula" / "chemical formula of water" swap too, but are adjacent in one of them."""
    pa, pb = _first_positions(a.content, shared), _first_positions(b.content, shared)
    words = sorted(pa, key=pa.get)
    sa, sb = set(pa.values()), set(pb.values())
    for i, x in enumerate(words):
        for y in words[i + 1:]:
            if pb[x] > pb[y] and _separated(a, pa[x], pa[y], sa) and _separated(b, pb[y], pb[x], sb):
                return x, y
    return None


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


def judge(query: str, candidate: str) -> Optional[str]:
    """Why `query` and `candidate` do not ask the same thing, or None if they do."""
    a, b = parse(query), parse(candidate)
    if a.numbers != b.numbers:
        return f"numbers differ: {a.numbers} vs {b.numbers}"
    if sorted(a.units) != sorted(b.units):
        return f"units differ: {a.units} vs {b.units}"
    if a.num_negations != b.num_negations:
        return "negation differs"
    if a.question_words != b.question_words:
        return f"question words differ: {sorted(a.question_words)} vs {sorted(b.question_words)}"
    missing = {e for e in a.entities if e not in b.words} | {e for e in b.entities if e not in a.words}
    if missing:
        return f"named entities differ: {sorted(missing)}"
    words_a = {w for w, _ in a.content}
    words_b = {w for w, _ in b.content}
    conflict = _order_conflict(a, b, words_a & words_b)
    if conflict:
        return f"order differs: {conflict[0]!r} / {conflict[1]!r}"
    only_a = [w for w in sorted(words_a - words_b) if not any(_same_root(w, v) for v in words_b)]
    only_b = [w for w in sorted(words_b - words_a) if not any(_same_root(w, v) for v in words_a)]
    if only_a or only_b:
        return f"content words differ: {only_a} vs {only_b}"
    return None
