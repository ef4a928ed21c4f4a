"""The training corpus of the embedded model, read from Debian package files.

Two sources, both installed with apt-get:

- `bible-kjv-text` (read through `bible-kjv`'s `bible` command): the King James Bible of 1611,
  public domain. One plain document per chapter, and a few chat turns that quote a verse.
- `wordnet-base`: WordNet 3.0's definitions and examples, under the WordNet 3.0 licence
  (Princeton University; use, copy, modify and distribute for any purpose, keeping its notice).
  Each sense becomes a chat turn that asks what a word means.

A document is either plain text or a list of chat messages; the trainer renders chats with the
tokenizer's own chat template, so training text and serving prompts share one format. A seeded
split holds out a fraction of documents for evaluation.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Union

APT_PACKAGES = ("bible-kjv", "bible-kjv-text", "wordnet-base")
WORDNET_DIR = Path("/usr/share/wordnet")
KJV_RANGE = "gen1:1-rev22:21"

SOURCES = {
    "King James Bible (1611), Debian bible-kjv-text": "public domain",
    "WordNet 3.0, Debian wordnet-base": "WordNet 3.0 licence (permissive, Princeton University)",
}

Message = dict[str, str]
Document = Union[str, list[Message]]

_STOPWORDS = frozenset(
    "about above after again against among shall there their these those which while would could "
    "should unto thee thou thine every where when whom whose other under into also because before "
    "being between neither nothing saying things great"
    .split()
)
_SYSTEM_PROMPT = "You are a helpful assistant."


class CorpusMissing(RuntimeError):
    """A Debian package that holds part of the corpus is not installed."""


@dataclass(frozen=True)
class Corpus:
    """Documents split into a training part and a held-out part."""

    train: list[Document]
    heldout: list[Document]


def require_packages() -> None:
    """Raise CorpusMissing, naming the apt-get command, when a source package is missing."""
    missing = []
    if shutil.which("bible") is None:
        missing.append("bible-kjv")
    if not Path("/usr/lib/bible.data").exists() and not Path("/usr/share/bible-kjv").exists():
        missing.append("bible-kjv-text")
    if not (WORDNET_DIR / "data.noun").exists():
        missing.append("wordnet-base")
    if missing:
        raise CorpusMissing(
            "corpus packages missing; install them with:\n"
            f"  apt-get install -y {' '.join(APT_PACKAGES)}"
        )


def read_kjv() -> list[tuple[str, list[str]]]:
    """The Bible as (chapter heading, verses) pairs, in book order."""
    text = subprocess.run(
        ["bible", "-l", "10000", KJV_RANGE], check=True, capture_output=True, text=True
    ).stdout
    chapters: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        verse = re.match(r"^\s+\d+ (.+)$", line)
        if verse:
            chapters[-1][1].append(verse.group(1).strip())
        elif line.strip():
            chapters.append((line.strip(), []))
    return chapters


def read_wordnet() -> list[tuple[str, str, str, list[str]]]:
    """WordNet senses as (part of speech, lemma, definition, examples), in file order."""
    senses = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(WORDNET_DIR / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                lemma = re.sub(r"\(.*\)$", "", fields[4]).replace("_", " ")
                parts = [p.strip() for p in gloss.strip().split(";")]
                definition = parts[0]
                examples = [p.strip('"') for p in parts[1:] if p.startswith('"')]
                senses.append((pos, lemma, definition, examples))
    return senses


def _keyword(verse: str, rng: random.Random) -> str | None:
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", verse)]
    words = [w for w in words if len(w) >= 5 and w not in _STOPWORDS]
    return rng.choice(words) if words else None


def _verse_chat(verse: str, rng: random.Random) -> list[Message] | None:
    word = _keyword(verse, rng)
    if word is None:
        return None
    question = rng.choice(
        [f"Tell me a verse about {word}.", f"Quote a verse that mentions {word}.",
         f"What does the Bible say about {word}?"]
    )
    return [{"role": "user", "content": question}, {"role": "assistant", "content": verse}]


def _sense_chat(pos: str, lemma: str, definition: str, examples: list[str],
                rng: random.Random) -> list[Message]:
    if pos == "noun":
        article = "an" if lemma[0].lower() in "aeiou" else "a"
        question = rng.choice([f"What is {article} {lemma}?", f"What does \"{lemma}\" mean?",
                               f"Define {lemma}."])
    elif pos == "verb":
        question = rng.choice([f"What does it mean to {lemma}?", f"Define the verb \"{lemma}\"."])
    else:
        question = rng.choice([f"What does \"{lemma}\" mean?", f"Define {lemma}."])
    answer = f"{lemma.capitalize()} means {definition}."
    if examples:
        answer += f" For example: \"{examples[0]}\"."
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.1:
        messages.insert(0, {"role": "system", "content": _SYSTEM_PROMPT})
    return messages


def build_corpus(seed: int = 0, heldout_fraction: float = 0.05, max_senses: int = 40000,
                 max_verse_chats: int = 8000) -> Corpus:
    """Read both sources and split their documents, the same way for the same arguments."""
    require_packages()
    rng = random.Random(seed)
    documents: list[Document] = []

    chapters = read_kjv()
    verses = [v for _, vs in chapters for v in vs]
    documents += [heading + "\n" + "\n".join(vs) for heading, vs in chapters]
    for verse in rng.sample(verses, max_verse_chats):
        chat = _verse_chat(verse, rng)
        if chat is not None:
            documents.append(chat)

    senses = read_wordnet()
    for sense in rng.sample(senses, min(max_senses, len(senses))):
        documents.append(_sense_chat(*sense, rng))

    heldout_flags = [rng.random() < heldout_fraction for _ in documents]
    return Corpus(
        train=[d for d, h in zip(documents, heldout_flags) if not h],
        heldout=[d for d, h in zip(documents, heldout_flags) if h],
    )


def document_texts(document: Document) -> list[str]:
    """The natural-language strings in a document (for training the tokenizer)."""
    if isinstance(document, str):
        return [document]
    return [m["content"] for m in document]
