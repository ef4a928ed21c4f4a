"""`serving.model_loader.encoder`: the Rust tokenizer called directly gives the ids the tokenizer's
own call gives, and a tokenizer whose backend differs keeps its own call."""

from __future__ import annotations

import pytest

from serving.model_loader import encoder, load_tokenizer

TEXTS = ["", "a", "The quick brown fox", "  leading spaces\tand tabs\n\n", "Ünïcode ☃ 中文 🙂 mixed", "1234567890" * 5,
         "<|im_start|>user\nHi<|im_end|>", "</s><s> special-looking text"]


@pytest.mark.parametrize("folder", ["embedded", "tiny"])
def test_the_fast_encoder_gives_the_tokenizers_own_ids(folder, tiny_model):
    from serving.models import default_model_path

    tok = load_tokenizer(tiny_model if folder == "tiny" else default_model_path())
    encode = encoder(tok)
    assert encode.__name__ == "fast"  # these are fast tokenizers: the probes agreed
    for text in TEXTS:
        for special in (True, False):
            assert encode(text, special) == tok(text, add_special_tokens=special).input_ids, (text, special)


def test_a_backend_that_disagrees_keeps_the_tokenizers_own_call(tiny_model):
    tok = load_tokenizer(tiny_model)

    class Skewed:  # a Rust tokenizer that would drop the last id
        def encode(self, text, add_special_tokens=True):
            ids = tok.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
            return type("Encoding", (), {"ids": ids[:-1]})()

    class Wrapper:
        backend_tokenizer = Skewed()

        def __call__(self, text, add_special_tokens=True):
            return tok(text, add_special_tokens=add_special_tokens)

    encode = encoder(Wrapper())
    assert encode.__name__ == "slow"
    assert encode("Hello, world!", True) == tok("Hello, world!").input_ids
