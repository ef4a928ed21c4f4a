"""WordNet synonyms for the verifier: do two words name the same thing in some sense?

Reads Debian's `wordnet-base` files (/usr/share/wordnet: index.*, data.adj, *.exc) once, lazily.
Two words are synonyms when they share a synset ("fall" / "come_down", "drop" / "remove"), or, for
adjectives, when one's synset is "similar to" or "see also" of the other's ("tall" / "high"). Base
forms come from the exception lists plus WordNet's own suffix rules (morphy). Without the files the
table is empty and the verifier falls back on its own small synonym table (`lexicon.SYNONYMS`).
"""

from __future__ import annotations

import os
from functools import lru_cache

WORDNET_DIR = os.environ.get("WORDNET_DIR", "/usr/share/wordnet")
_POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

# morphy's detachment rules: (suffix, replacement) per part of speech.
_RULES = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


class WordNet:
    """Lemma -> synset offsets per part of speech, plus adjective similarity links."""

    def __init__(self, root: str = WORDNET_DIR):
        self.synsets: dict[str, dict[str, frozenset[int]]] = {p: {} for p in _POS}
        self.exceptions: dict[str, dict[str, tuple[str, ...]]] = {p: {} for p in _POS}
        self.adj_links: dict[int, frozenset[int]] = {}
        if not os.path.isdir(root):
            return
        for pos, name in _POS.items():
            with open(os.path.join(root, f"index.{name}"), encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):
                        continue  # licence header
                    parts = line.split()
                    num_synsets = int(parts[2])
                    self.synsets[pos][parts[0]] = frozenset(int(x) for x in parts[-num_synsets:])
            exc = os.path.join(root, f"{name}.exc")
            if os.path.exists(exc):
                with open(exc, encoding="utf-8") as f:
                    for line in f:
                        inflected, *bases = line.split()
                        self.exceptions[pos][inflected] = tuple(bases)
        with open(os.path.join(root, "data.adj"), encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                fields = line.split(" | ")[0].split()
                num_words = int(fields[3], 16)
                i = 4 + 2 * num_words
                num_ptrs = int(fields[i])
                links = {int(fields[i + 2 + 4 * k]) for k in range(num_ptrs) if fields[i + 1 + 4 * k] in ("&", "^")}
                self.adj_links[int(fields[0])] = frozenset(links)

    def __bool__(self) -> bool:
        return bool(self.synsets["n"])

    def base_forms(self, word: str, pos: str) -> set[str]:
        """The lemmas `word` may be an inflection of, under one part of speech."""
        table = self.synsets[pos]
        out = {word} if word in table else set()
        out.update(b for b in self.exceptions[pos].get(word, ()) if b in table)
        for suffix, repl in _RULES[pos]:
            if word.endswith(suffix) and len(word) > len(suffix) + 1:
                base = word[: len(word) - len(suffix)] + repl
                if base in table:
                    out.add(base)
        return out

    def senses(self, word: str) -> dict[str, frozenset[int]]:
        """Synset offsets of `word` (any inflection) per part of speech."""
        out = {}
        for pos in _POS:
            ids = frozenset().union(*(self.synsets[pos][b] for b in self.base_forms(word, pos)))
            if ids:
                out[pos] = ids
        return out

    def are_synonyms(self, x: str, y: str) -> bool:
        sx, sy = self.senses(x), self.senses(y)
        for pos, ids in sx.items():
            other = sy.get(pos)
            if not other:
                continue
            if ids & other:
                return True
            if pos == "a" and any(self.adj_links.get(i, frozenset()) & other for i in ids):
                return True
        return False


@lru_cache(maxsize=1)
def wordnet() -> WordNet:
    """The process's WordNet, loaded on first use (about a second)."""
    return WordNet()
