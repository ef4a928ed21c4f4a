"""Incremental detokenization on the tiny model's byte-level BPE, where one character (é, 日, 🎉) is
often several tokens: streamed text equals a full decode, never holds half a character, and never
shows a stop string."""

import pytest

from serving.detokenizer import REPLACEMENT, IncrementalDetokenizer

ASCII = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello , world . I 'm here and   spaced\tout\nnew line",
]
MULTIBYTE = [
    "café naïve",
    "日本語のテキスト",
    "emoji 🎉🚀 ok",
    "Ünïcödé ☃ mixed 中文 and ascii 👩‍👩‍👧 family, then ü at the end ü",
]


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text  # the tokenizer itself round-trips
    return ids


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feeds the tokens one by one as the engine does; the last piece is the final release."""
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.release())
        if detok.stopped:
            break
    pieces.append(detok.release(final=True))
    return detok, pieces


def released_every(tokenizer, ids: list[int], every: int) -> list[str]:
    """No stop strings, text asked for after every `every` tokens (as the engine asks once per
    published item); the last piece is the final release."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = []
    for i, token in enumerate(ids, 1):
        detok.add(token)
        if i % every == 0:
            pieces.append(detok.release())
    pieces.append(detok.release(final=True))
    return pieces


@pytest.mark.parametrize("text", ASCII + MULTIBYTE)
def test_streamed_text_is_the_full_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    _, pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)
    assert pieces[-1] == ""  # with no stop strings nothing is held back


@pytest.mark.parametrize("text", MULTIBYTE)
def test_characters_split_across_tokens_are_released_whole(tokenizer, text):
    ids = encode(tokenizer, text)
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids), "the text should split a character"
    _, pieces = stream(tokenizer, ids)
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert text.startswith(emitted)
        assert REPLACEMENT not in piece
    assert "" in pieces[:-1], "a token ending inside a character should release nothing"


def test_special_tokens_are_not_text(tokenizer):
    ids = encode(tokenizer, "Hello") + [tokenizer.convert_tokens_to_ids("<|end|>")] + encode(tokenizer, " world")
    _, pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "Hello world"


@pytest.mark.parametrize("text, stop, expected", [
    ("Hello, world! How are you today?", ("world",), "Hello, "),
    ("Hello, world! How are you today?", ("lo, wo",), "Hel"),  # spans three tokens
    ("Hello, world! How are you today?", ("today", "How"), "Hello, world! "),  # the earliest wins
    ("Hello, world! How are you today?", ("Hello",), ""),
    ("Hello, world! How are you today?", ("?",), "Hello, world! How are you today"),
    ("café naïve", ("é n",), "caf"),
    ("café naïve", ("ï",), "café na"),
    ("日本語のテキスト", ("テキ",), "日本語の"),
    ("emoji 🎉🚀 ok", ("🚀",), "emoji 🎉"),
])
def test_stop_strings_are_never_emitted(tokenizer, text, stop, expected):
    ids = encode(tokenizer, text)
    detok, pieces = stream(tokenizer, ids, stop)
    assert detok.stopped
    assert "".join(pieces) == expected
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert not any(s in emitted for s in stop)
    # tokens after the stop are ignored
    n = len(detok.ids)
    detok.add(ids[0])
    assert len(detok.ids) == n and detok.release(final=True) == ""


@pytest.mark.parametrize("text", ["Hello, world! How are you today?", "Ünïcödé ☃ mixed 中文 and ascii 👩‍👩‍👧"])
def test_every_stop_string_cut_from_the_text(tokenizer, text):
    """Stops at every position and of several lengths, so most of them span token boundaries."""
    ids = encode(tokenizer, text)
    for length in (1, 2, 3, 5):
        for start in range(0, len(text) - length + 1):
            stop = text[start:start + length]
            detok, pieces = stream(tokenizer, ids, (stop,))
            assert detok.stopped, stop
            assert "".join(pieces) == text[:text.find(stop)], stop
            assert all(REPLACEMENT not in p for p in pieces)


def test_held_back_text_is_released_at_the_end(tokenizer):
    text = "Hello, wor"
    detok, pieces = stream(tokenizer, encode(tokenizer, text), ("world!",))
    assert not detok.stopped
    # "wor" could still become the stop string, so only the final release gives it
    assert "".join(pieces[:-1]) == "Hello, "
    assert pieces[-1] == "wor"


def test_held_back_text_is_released_once_it_cannot_be_a_stop(tokenizer):
    ids = encode(tokenizer, "Hello, word up")
    detok, pieces = stream(tokenizer, ids, ("world",))
    assert not detok.stopped
    assert "".join(pieces[:-1]) == "Hello, word up" and pieces[-1] == ""


def test_a_stop_string_that_never_appears_changes_nothing(tokenizer):
    for text in ASCII + MULTIBYTE:
        _, pieces = stream(tokenizer, encode(tokenizer, text), ("<never>", "zzzz"))
        assert "".join(pieces) == text


@pytest.mark.parametrize("text", ASCII + MULTIBYTE)
@pytest.mark.parametrize("every", [2, 3, 7, 50])
def test_tokens_released_a_few_at_a_time_give_the_same_text(tokenizer, text, every):
    """Without stop strings the decode waits for `release`: the engine asks once per published
    item, after several tokens; the text is the same, and never half a character."""
    ids = encode(tokenizer, text)
    pieces = released_every(tokenizer, ids, every)
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in p for p in pieces)


@pytest.mark.parametrize("text", MULTIBYTE)
@pytest.mark.parametrize("every", [3, 50])
def test_a_character_cut_at_the_end_holds_back_only_itself(tokenizer, text, every):
    """Tokens that end inside a character (a model can stop there): released a few at a time, the
    text before it is the same as when each token is decoded on arrival."""
    ids = encode(tokenizer, text)
    ids = ids[:max(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(REPLACEMENT))]
    _, eager = stream(tokenizer, ids, stop=("\x00never",))  # a stop string: decoded on arrival
    pieces = released_every(tokenizer, ids, every)
    assert "".join(pieces) == "".join(eager)
    assert "".join(pieces).strip()
