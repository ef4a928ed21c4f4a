"""Compiled grammars for one tokenizer and the per-sequence matcher (llguidance)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import llguidance
import torch

from serving.structured.closing import JsonPrefix
from serving.structured.spec import JsonSpec

# Closing starts this many tokens before it must: one free token can open a few levels at once
# (`[{"` adds `":null}]`), and the closing has to fit in what is left after it.
CLOSING_MARGIN = 8


class GrammarMatcher:
    """One sequence's position in its grammar: which tokens may come next, and what was accepted.

    EOS (the compiler's `eos_token_ids`) is allowed exactly where the grammar may end.
    """

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer):
        self._matcher = matcher
        self._tokenizer = tokenizer
        self._tokens: list[int] = []  # accepted so far
        self._prefix = JsonPrefix()  # the JSON text those tokens spell

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into bitmask[row]: bit j of word w allows token 32 * w + j.

        bitmask: [R, ceil(V / 32)] int32, CPU, contiguous (`allocate_bitmask`).
        """
        # NOTE: llguidance writes through the raw pointer; these checks keep it inside the tensor
        assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar forbids it (the matcher is then broken)."""
        if not self._matcher.consume_token(token_id):
            return False
        self._tokens.append(token_id)
        self._feed([token_id])
        return True

    def _feed(self, token_ids: list[int]) -> None:
        text = [t for t in token_ids if not self._tokenizer.is_special_token(t)]  # EOS spells nothing
        self._prefix.feed(self._tokenizer.decode_bytes(text))

    def forced_token(self, tokens_left: int) -> Optional[int]:
        """The token to take now so that the document still ends within `tokens_left` tokens (this one
        included), or None while the model may choose: the next token of the shortest closing once
        the budget is down to it (plus `CLOSING_MARGIN`), and EOS after it. None too when no closing
        fits the grammar (a schema's required members): max_tokens then cuts the document."""
        closing = self._prefix.closing()
        # NOTE: a closing has no more tokens than characters: most steps stop at this cheap test
        if closing is None or tokens_left > len(closing) + 1 + CLOSING_MARGIN:
            return None
        tokens = self._tokenizer.tokenize_str(closing)
        if tokens_left > len(tokens) + 1 + CLOSING_MARGIN:
            return None
        if tokens:
            return tokens[0] if self._matcher.validate_tokens(tokens) == len(tokens) else None
        return self._tokenizer.eos_token if self._matcher.is_accepting() else None

    def is_finished(self) -> bool:
        """The document is complete: nothing but EOS may follow (also True once broken)."""
        return self._matcher.is_stopped()

    def can_end(self) -> bool:
        """The text so far is a complete document (EOS is allowed), though more may follow."""
        return self._matcher.is_accepting()

    def rollback(self, num_tokens: int) -> None:
        """Forgets the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        if not self._matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")
        del self._tokens[len(self._tokens) - num_tokens:]
        self._prefix = JsonPrefix()  # NOTE: re-read from the start, O(length): snapshots if it ever runs every step
        self._feed(self._tokens)

    @property
    def error(self) -> str:
        """Why the matcher broke ('' while it is fine)."""
        return self._matcher.get_error()

    @property
    def llg_matcher(self) -> llguidance.LLMatcher:
        """The llguidance matcher, for its batched calls (`StructuredOutputs.mask`)."""
        return self._matcher


class GrammarCompiler:
    """Compiles `JsonSpec`s for one tokenizer, each once: an LRU of compiled grammars in their start
    state, copied for every new sequence (a copy costs ~0.5 us, a compile ~0.4 ms for a small schema)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], max_cached: int = 64):
        """tokenizer: a Hugging Face fast tokenizer; vocab_size: the model's logits width (>= the
        tokenizer's vocabulary: ids past it are never allowed); eos_token_ids: the ids that end a sequence."""
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._max_cached = max_cached
        self._compiled: OrderedDict[JsonSpec, llguidance.LLMatcher] = OrderedDict()

    def matcher(self, spec: JsonSpec) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar; ValueError if it does not compile here."""
        compiled = self._compiled.get(spec)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._tokenizer, spec.grammar(), log_level=0)
            if compiled.is_error():
                raise ValueError(f"response_format: {compiled.get_error()}")
            self._compiled[spec] = compiled
            if len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(spec)
        return GrammarMatcher(compiled.deep_copy(), self._tokenizer)
