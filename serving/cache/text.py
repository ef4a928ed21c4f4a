"""Reading a prompt for the second check: tokens, numbers, units, negations, entities, content words.

Plain rules and word lists, no model. `parse` is applied to both prompts the same way, so a rule
that is too coarse (the stemmer merging two words) costs recall on both sides equally rather than
inventing differences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"(?P<num>\d+(?:[.,]\d+)*)|(?P<word>[A-Za-z_][A-Za-z0-9_]*(?:['’][A-Za-z]+)?)|(?P<sym>\S)")

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                      "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
                      "million": "1000000", "billion": "1000000000", "dozen": "12", "half": "0.5",
                      "twice": "2x", "double": "2x", "triple": "3x", "once": "1x"})
# "one" is also a pronoun ("which one"): a number only next to a noun-like word is too subtle here.
_NUMBER_WORDS.pop("one")

_NEGATIONS = frozenset(
    "not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt didnt isnt "
    "arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt non except excluding unless "
    "lack lacks".split())

# "which" and "what" are interchangeable ("which city is" / "what city is"); these are not.
_QUESTION_WORDS = frozenset("why when where who whom whose".split())

_UNITS = frozenset(
    "b kb mb gb tb pb kib mib gib tib bit bits byte bytes kbit mbit gbit bps kbps mbps gbps tbps "
    "hz khz mhz ghz ms us ns s sec secs min mins h hr hrs mm cm m km in ft yd mi mph kph kmh g mg kg "
    "lb lbs oz ml l dl gal w kw mw gw kwh mwh wh v mv kv a ma mah c f k pa kpa psi db dpi ppi fps rpm "
    "nm um px pt em rem".split())

# Question framing and function words: they never decide what is asked.
_STOPWORDS = frozenset(
    "a an the is are was were be been being am do does did doing i me my mine you your yours we us our "
    "he she it its they them their this that these those there here can could would should will shall "
    "may might must please tell show give explain describe help know want need like let lets how what "
    "way ways method methods best good proper correct right simple simply easy easiest quick quickly "
    "some any in on of for with at by as and or but about using use via so if then than to from into "
    "onto over under up down out off again also just only really actually exactly possible "
    "something someone anything thing things whats hows im ive id youre get getting got make "
    "one ones kind type which whether have has had having effectively properly correctly".split())

# Markers across which the order of two content words carries meaning.
_DIRECTIONAL = frozenset(
    "to into from than vs versus before after over under above below per onto toward towards against "
    "by until till through instead rather".split())

# A small synonym table: canonical forms for words that paraphrases swap for each other.
_SYNONYMS = {
    "int": "integer", "ints": "integer", "str": "string", "strs": "string", "dict": "dictionary",
    "turn": "convert", "change": "convert", "transform": "convert", "cast": "convert",
    "delete": "remove", "erase": "remove", "drop": "remove", "eliminate": "remove", "strip": "remove",
    "fastest": "fast", "quickest": "fast", "faster": "fast", "quicker": "fast", "speedy": "fast",
    "largest": "big", "biggest": "big", "large": "big", "greatest": "big", "huge": "big",
    "smallest": "small", "tiny": "small", "little": "small", "tallest": "tall", "highest": "high",
    "begin": "start", "commence": "start", "finish": "end", "purchase": "buy", "automobile": "car",
    "utilize": "use", "obtain": "get", "retrieve": "get", "fetch": "get", "acquire": "get",
    "display": "print", "output": "print", "create": "make", "build": "make", "generate": "make",
    "invert": "reverse", "flip": "reverse", "combine": "merge", "join": "merge",
    "concatenate": "merge", "divide": "split", "examine": "check", "verify": "check",
    "test": "check", "determine": "check", "figure": "check", "compute": "calculate",
    "number": "count", "amount": "count", "total": "sum", "append": "add", "save": "write",
    "load": "read", "arrange": "sort", "meaning": "mean", "means": "mean",
    "definition": "mean", "define": "mean", "doctor": "physician", "film": "movie", "movies": "movie",
    "kid": "child", "kids": "child", "children": "child", "happen": "occur", "capitol": "capital",
    "job": "work", "occupation": "work", "sick": "ill", "illness": "ill", "disease": "ill",
    "mistake": "error", "bug": "error", "fault": "error", "cost": "price", "costs": "price",
    "pay": "price", "location": "place", "situated": "located",
    "compose": "write", "primary": "main", "principal": "main", "chief": "main",
    "revert": "undo", "quit": "exit", "leave": "exit", "lower": "reduce", "decrease": "reduce",
    "uninstall": "remove", "find": "get", "current": "today", "many": "count",
    "modify": "edit", "alter": "edit", "launch": "start",
}


@dataclass
class Parsed:
    """What the rules read from one prompt."""

    numbers: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # case kept
    num_negations: int = 0
    question_words: set[str] = field(default_factory=set)
    entities: set[str] = field(default_factory=set)  # lowercased
    # (canonical word, token position); numbers ("#10") and units ("@km") too, for the order check.
    content: list[tuple[str, int]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # lowercased tokens
    words: set[str] = field(default_factory=set)  # all lowercased word tokens


def normalize(text: str) -> str:
    """The exact-repeat key: whitespace collapsed, case folded, except in units and mixed-case
    words, whose case carries meaning ("100 Mbps" and "100 MBps" are not a repeat)."""
    return _WORD.sub(_fold, " ".join(text.split()))


_WORD = re.compile(r"[^\W\d_]+")


def _fold(m: re.Match) -> str:
    w = m.group()
    low = w.lower()
    if any(c.isupper() for c in w[1:]):  # MB, kWh, NASA, iPhone
        return w
    if low in _UNITS and w != low and low not in _STOPWORDS:  # Mb vs mb; but "In" and "A" fold
        return w
    return w.casefold()


def stem(word: str) -> str:
    """A deliberately light stemmer (plural, -ing, -ed, final e), applied equally to both prompts."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.replace("'", "")
    if w in _SYNONYMS:
        return _SYNONYMS[w]
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
    if w in _SYNONYMS:
        return _SYNONYMS[w]
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def _undouble(w: str) -> str:
    return w[:-1] if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "lsz" else w


def _number(raw: str) -> str:
    plain = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", raw) else raw.replace(",", ".")
    try:
        value = float(plain)
    except ValueError:
        return raw
    return str(int(value)) if value.is_integer() else repr(value)


def parse(text: str) -> Parsed:
    """Read numbers, units, negations, question words, entities and content words from `text`."""
    p = Parsed()
    sentence_start = True
    prev_kind = None
    for m in _TOKEN.finditer(text):
        kind, raw = m.lastgroup, m.group()
        pos = len(p.tokens)
        low = raw.lower().replace("’", "'")
        if low.endswith("'s"):
            low = low[:-2]  # possessive: "France's" is "France"
        p.tokens.append(low)
        if raw == "%" or low in ("percent", "pct"):
            p.units.append("%")
            p.content.append(("@%", pos))
        elif kind == "num":
            p.numbers.append(_number(raw))
            p.content.append(("#" + p.numbers[-1], pos))
        elif kind == "word":
            p.words.add(low)
            bare = low.replace("'", "")
            if low in _NUMBER_WORDS:
                p.numbers.append(_NUMBER_WORDS[low])
                p.content.append(("#" + p.numbers[-1], pos))
                kind = "num"
            elif bare in _NEGATIONS or low.endswith("n't"):
                p.num_negations += 1
            elif low in _QUESTION_WORDS:
                p.question_words.add(low)
            elif _is_unit(raw, low, prev_kind == "num"):
                p.units.append(raw)
                p.content.append(("@" + low, pos))
            elif bare not in _STOPWORDS:
                if _is_entity(raw, sentence_start):
                    p.entities.add(low)
                canonical = stem(raw)
                if canonical not in _STOPWORDS:  # "obtain" -> "get", a stopword like "get" itself
                    p.content.append((canonical, pos))
        sentence_start = kind == "sym" and raw in ".?!:;\n"
        prev_kind = kind
    return p


def _is_unit(raw: str, low: str, after_number: bool) -> bool:
    if after_number:  # "10 km", "5 MBps", "3 kWh"; not "3 tips"
        return low in _UNITS or any(c.isupper() for c in raw[1:])
    # Standalone units ("how many MB in a GB"), but not one-letter ones or English words ("a", "in").
    return low in _UNITS and len(low) > 1 and low not in _STOPWORDS


def _is_entity(raw: str, sentence_start: bool) -> bool:
    if any(c.isdigit() or c == "_" for c in raw):
        return True
    if any(c.isupper() for c in raw[1:]):  # iPhone, PyTorch, NASA
        return True
    return raw[0].isupper() and not sentence_start and raw.lower() != "i"


