"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character (a byte-level token can end
inside one), and never text that might still turn out to be the start of a stop string. A stop
string found in the text ends the sequence and is not emitted (unless `include_stop_str`), even
when it spans tokens; before `min_tokens` tokens no stop string is looked for. Without stop strings
tokens are decoded only when their text is asked for (`release`), several at a time.
"""

from __future__ import annotations

from typing import Optional

REPLACEMENT = "\ufffd"
# Tokens decoded again as left context (words join differently after a space): between
# _CONTEXT_TOKENS and twice that. NOTE: while the context's start stays put, the last decode of
# the window is the next one's prefix text, so a token costs one decode instead of two.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop_str: bool = False, min_tokens: int = 0):
        # NOTE: a fast tokenizer's Rust object decodes several times faster than the HF wrapper
        backend = getattr(tokenizer, "_tokenizer", None)
        self._decode_ids = backend.decode if backend is not None else tokenizer.decode
        self.stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.text = ""  # decoded output so far (complete characters only)
        self.num_emitted = 0  # chars of self.text already released
        self._prefix_offset = 0  # self.ids[_prefix_offset:_read_offset] is left context
        self._read_offset = 0
        self._prefix_text: Optional[str] = ""  # the left context decoded; None: not yet
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> None:
        """Adds one generated token; sets `stopped` when a stop string appears. Without stop
        strings the decoding waits for the next `release` (one decode for all tokens since)."""
        if self.stopped:
            return
        self.ids.append(token_id)
        if self.stop:
            self._decode_new()

    def _decode_new(self) -> None:
        """Decodes the tokens added since the last decode into `text`, and looks for stop strings."""
        if self._read_offset == len(self.ids) or self.stopped:
            return
        if not self._decode_to(len(self.ids)) and len(self.ids) - self._read_offset > 1:
            # NOTE: the last of several new tokens ends inside a character: the ones before it may
            # still be whole text, so take them one at a time, as if each had been decoded on arrival
            for end in range(self._read_offset + 1, len(self.ids)):
                self._decode_to(end)

    def _decode_to(self, end: int) -> bool:
        """Decodes `ids[:end]` past the read offset into `text`; False (and nothing moves) while
        that ends inside a character or adds nothing printable."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        prefix = self._prefix_text
        full = self._decode(self.ids[self._prefix_offset:end])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return False  # an incomplete character (or nothing printable yet): wait for more tokens
        search_from = max(0, len(self.text) - self._longest_stop)
        self.text += full[len(prefix):]
        self._read_offset = end
        if self._read_offset - self._prefix_offset > 2 * _CONTEXT_TOKENS:
            self._prefix_offset = self._read_offset - _CONTEXT_TOKENS
            self._prefix_text = None
        else:
            self._prefix_text = full
        if self.stop and end >= self.min_tokens:
            hit = self._find_stop(search_from)
            if hit is not None:
                at, stop = hit
                self.text = self.text[:at + len(stop)] if self.include_stop_str else self.text[:at]
                self.stopped = True
        return True

    def _find_stop(self, start: int) -> Optional[tuple[int, str]]:
        """The first stop string in the text from `start`: (where, which)."""
        found = [(i, s) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i != -1]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Chars at the end of the text that are a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def release(self, final: bool = False) -> str:
        """The new final text since the last call; with `final`, everything that is left."""
        self._decode_new()
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        if end <= self.num_emitted:
            return ""
        out = self.text[self.num_emitted:end]
        self.num_emitted = end
        return out
