"""Reading a prompt for the verifier: tokens, numbers, units, negations, question words, content words.

`normalize` is the exact-repeat key (case, whitespace and sentence punctuation folded). `analyze`
reads one prompt the same way for both sides of a pair: contractions are expanded ("what's",
"doesnt"), abbreviations and set phrases become one token ("US" / "United States", "WWI" / "First
World War"), number words become digits ("nine hour" / "9-hour", "nineteen twenty-nine" / "1929"),
units become one symbol with the case that carries meaning ("Mbps" is not "MBps"). What remains
after function and framing words is the content: words with their stem, position and whether they
look like a name (capitalised inside a sentence, mixed case, digits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from serving.cache import lexicon as lx

_TOKEN = re.compile(
    r"(?P<num>\d{3}0s\b|\d+(?:[.,]\d+)*)"
    r"|(?P<slash>\b(?:km|m|mg|mmol|mb|gb|kb)/(?:h|s|dl|l)\b)"
    r"|(?P<word>[^\W\d_][\w]*(?:\+\+|#)?(?:['’][^\W\d_]+)?(?:\.(?=[A-Za-z]\.))?)"
    r"|(?P<sym>\S)", re.IGNORECASE)
_SENTENCE_END = frozenset(".?!:;\n")
_KEEP_SYMBOLS = frozenset("%$€£&")


@dataclass(slots=True)
class Token:
    text: str  # lower case, or the canonical form of a phrase, number or unit
    raw: str  # as typed (for case)
    kind: str  # "word", "num", "unit", "sym"
    sentence_start: bool = False


@dataclass
class Word:
    """A content word: its canonical stem, as typed, token position, and whether it is a name."""

    stem: str
    raw: str
    pos: int
    is_name: bool


@dataclass
class Analysis:
    numbers: list[tuple[str, int]] = field(default_factory=list)  # (value, position)
    units: list[tuple[str, int]] = field(default_factory=list)  # (symbol, position)
    num_negations: int = 0
    question_words: set[str] = field(default_factory=set)
    content: list[Word] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)


_EDGE_PUNCT = re.compile(r"(?:(?<=\s)|^)[\"'“”‘’(\[]+|[\"'“”‘’)\].,;:!?]+(?=\s|$)")


def normalize(text: str) -> str:
    """The exact-repeat key: whitespace collapsed, sentence punctuation dropped, case folded
    except in units and mixed-case words, whose case carries meaning ("100 Mbps" / "100 MBps")."""
    return _WORD.sub(_fold, " ".join(_EDGE_PUNCT.sub("", " ".join(text.split())).split()))


_WORD = re.compile(r"[^\W\d_]+")


def _fold(m: re.Match) -> str:
    w = m.group()
    low = w.lower()
    if any(c.isupper() for c in w[1:]):  # MB, kWh, NASA, iPhone
        return w
    if low in lx.DATA_UNITS and w != low:  # Mb vs mb
        return w
    return w.casefold()


def _tokens(text: str) -> list[Token]:
    out: list[Token] = []
    start = True
    for m in _TOKEN.finditer(text.replace("’", "'")):
        kind, raw = m.lastgroup, m.group()
        if kind == "slash":
            out.append(Token(raw.lower(), raw, "word", start))
        elif kind == "word":
            low = raw.lower()
            expanded = _expand_contraction(low)
            if expanded is None:
                if low.endswith("'s"):
                    raw, low = raw[:-2], low[:-2]  # possessive: "France's" is "France"
                out.append(Token(low.replace("'", ""), raw, "word", start))
            else:
                for i, part in enumerate(expanded.split()):
                    out.append(Token(part, part if i else raw, "word", start and i == 0))
        elif kind == "num":
            out.append(Token(raw, raw, "num", start))
        elif raw in _KEEP_SYMBOLS:
            out.append(Token(raw, raw, "sym", start))
        start = kind == "sym" and raw in _SENTENCE_END or (start and kind == "sym")
    return out


def _expand_contraction(low: str):
    if low in lx.CONTRACTIONS:
        return lx.CONTRACTIONS[low]
    for suffix, repl in lx.CONTRACTION_SUFFIXES:
        if low.endswith(suffix) and len(low) > len(suffix):
            base = low[: -len(suffix)]
            return {"ca": "can", "wo": "will", "sha": "shall"}.get(base, base) + repl
    return None


def _phrase_table() -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
    """First token -> [(tokens, canonical, capitals it must be typed in, or "")], longest first."""
    table: dict[str, list] = {}
    for phrase, canonical in lx.PHRASES.items():
        toks = tuple(t.text for t in _tokens(phrase))
        capitals = phrase.replace(".", "") if phrase.replace(".", "").isupper() else ""
        table.setdefault(toks[0], []).append((toks, canonical, capitals))
    for rows in table.values():
        rows.sort(key=lambda r: -len(r[0]))
    return table


_PHRASES = _phrase_table()


def _join_phrases(tokens: list[Token]) -> list[Token]:
    out, i = [], 0
    while i < len(tokens):
        for toks, canonical, capitals in _PHRASES.get(tokens[i].text, ()):
            span = tokens[i:i + len(toks)]
            raw = " ".join(t.raw for t in span)
            typed = raw.replace(".", "").replace(" ", "")
            if tuple(t.text for t in span) == toks and (not capitals or typed == capitals):
                # As typed when it names something ("US", "United States"), so it reads as a name.
                out.append(Token(canonical, raw if capitals or raw[:1].isupper() else canonical, "word",
                                 span[0].sentence_start))
                i += len(toks)
                break
        else:
            out.append(tokens[i])
            i += 1
    return out


def _number_value(raw: str) -> str:
    plain = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", raw) else raw.replace(",", ".")
    try:
        value = float(plain)
    except ValueError:
        return raw
    return str(int(value)) if value.is_integer() else repr(value)


def _join_numbers(tokens: list[Token]) -> list[Token]:
    """Number words -> digits: "twenty-nine" 29, "two hundred" 200, "nineteen twenty-nine" 1929."""
    out: list[Token] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if t.kind == "num":
            out.append(Token(_number_value(t.text), t.raw, "num", t.sentence_start))
        elif t.text in lx.DECADES:
            out.append(Token(lx.DECADES[t.text], t.raw, "num", t.sentence_start))
        elif t.text in lx.MULTIPLES:
            out.append(Token(lx.MULTIPLES[t.text], t.raw, "num", t.sentence_start))
        elif t.text in lx.ORDINALS and not (t.text == "second" and out and out[-1].kind == "num"):
            out.append(Token(lx.ORDINALS[t.text], t.raw, "num", t.sentence_start))
        elif t.text in lx.NUMBER_WORDS or t.text in lx.TENS:
            if t.text == "one" and (nxt is None or nxt.kind == "sym" or nxt.text in lx.STOPWORDS
                                    and nxt.text not in lx.SCALES):
                out.append(t)  # the pronoun: "which one", "one of"
            else:
                value, i = _read_number_words(tokens, i)
                out.append(Token(str(value), t.raw, "num", t.sentence_start))
                continue
        elif re.fullmatch(r"(\d+)(st|nd|rd|th)", t.text):
            out.append(Token(t.text, t.raw, "num", t.sentence_start))
        else:
            out.append(t)
        i += 1
    return out


def _small(tokens: list[Token], i: int) -> tuple[int, int]:
    """A number below 100 from words at i ("twenty nine"); returns (value, next index)."""
    t = tokens[i].text
    if t in lx.TENS:
        unit = lx.NUMBER_WORDS.get(tokens[i + 1].text, 0) if i + 1 < len(tokens) else 0
        if 0 < unit < 10:
            return lx.TENS[t] + unit, i + 2
        return lx.TENS[t], i + 1
    return lx.NUMBER_WORDS[t], i + 1


def _read_number_words(tokens: list[Token], i: int) -> tuple[int, int]:
    value, i = _small(tokens, i)
    while i < len(tokens) and tokens[i].text in lx.SCALES:
        value *= lx.SCALES[tokens[i].text]
        i += 1
        if i < len(tokens) and tokens[i].text == "and":
            i += 1
        if i < len(tokens) and (tokens[i].text in lx.NUMBER_WORDS or tokens[i].text in lx.TENS):
            rest, i = _small(tokens, i)
            value += rest
    # A year read as two pairs: "nineteen twenty-nine", "twenty twenty".
    if 10 < value < 100 and (value < 20 or value == 20) and i < len(tokens) and (
            tokens[i].text in lx.TENS or tokens[i].text in lx.NUMBER_WORDS and lx.NUMBER_WORDS[tokens[i].text] >= 10):
        rest, i = _small(tokens, i)
        value = value * 100 + rest
    return value, i


def _unit(t: Token, after_number: bool):
    low = t.text
    if t.kind == "sym" and low in lx.UNIT_WORDS:
        return lx.UNIT_WORDS[low]
    if t.kind != "word":
        return None
    if low in lx.DATA_UNITS:
        if after_number or len(low) > 1:
            return t.raw
        return None
    base = low[:-1] if low.endswith("s") and low[:-1] in lx.UNIT_WORDS and len(low) > 3 else low
    if base == "inche":
        base = "inch"
    if base not in lx.UNIT_WORDS:
        return None
    if base in lx.UNITS_AFTER_NUMBER_ONLY and not after_number:
        return None
    return lx.UNIT_WORDS[base]


def stem(word: str) -> str:
    """A light stemmer (plural, -ing, -ed, final e) after the synonym table, the same for both prompts."""
    w = word
    if w in lx.SYNONYMS:
        return lx.SYNONYMS[w]
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith(("sses", "xes", "ches", "shes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    elif len(w) > 5 and w.endswith("ing"):
        w = _undouble(w[:-3])
    elif len(w) > 5 and w.endswith("ed") and not w.endswith("eed"):
        w = _undouble(w[:-2])
    if w in lx.SYNONYMS:
        return lx.SYNONYMS[w]
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def _undouble(w: str) -> str:
    return w[:-1] if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "lsz" else w


def analyze(text: str) -> Analysis:
    """Read numbers, units, negations, question words and content words from `text`."""
    a = Analysis()
    a.tokens = tokens = _join_numbers(_join_phrases(_tokens(text)))
    for pos, t in enumerate(tokens):
        after_number = pos > 0 and tokens[pos - 1].kind == "num" or (
            pos > 1 and tokens[pos - 1].text == "deg" and tokens[pos - 2].kind == "num")
        unit = _unit(t, after_number) if t.text != "deg" else None
        if t.kind == "num":
            a.numbers.append((t.text, pos))
        elif unit is not None:
            if unit == "deg":
                continue
            t.kind = "unit"
            a.units.append((unit, pos))
        elif t.kind == "sym" or t.text == "degree" or t.text == "degrees":
            continue
        elif t.text in lx.NEGATIONS:
            a.num_negations += 1
        elif t.text in lx.QUESTION_WORDS:
            a.question_words.add(t.text)
        elif t.text in lx.LEADING_FRAMING and (t.sentence_start or pos and tokens[pos - 1].text in lx.FRAMING_BEFORE):
            continue
        elif t.text not in lx.STOPWORDS:
            s = stem(t.text)
            if s not in lx.STOPWORDS:  # "obtain" -> "get", a stopword like "get" itself
                a.content.append(Word(s, t.raw, pos, _is_name(t)))
    return a


def _is_name(t: Token) -> bool:
    raw = t.raw
    if any(c.isdigit() or c == "_" for c in raw):
        return True
    if any(c.isupper() for c in raw[1:]):  # iPhone, PyTorch, NASA
        return True
    return raw[:1].isupper() and not t.sentence_start and raw.lower() != "i"
