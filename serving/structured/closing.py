"""The shortest text that completes a JSON prefix, so a document cut short by max_tokens can still end.

`JsonPrefix` follows the JSON text decoded so far, byte by byte, with a stack of open containers and
the state of the innermost one; `closing()` is then, per open level, the least that ends it:
a string's `"` (and `:null` after a key), a number's missing digit, a literal's remaining letters,
`null` for a value still due, then `}` or `]` for each open container, innermost first.
It is pure syntax: the grammar checks the closing before anyone forces it (a schema may forbid it).
"""

from __future__ import annotations

from enum import Enum
from typing import Optional


class _At(Enum):
    VALUE = "value"  # a value is due (or `]` right after `[`)
    KEY = "key"  # a key is due (or `}` right after `{`)
    COLON = "colon"  # after a key
    AFTER = "after"  # after a value: `,` or a closer
    STRING = "string"
    NUMBER = "number"
    LITERAL = "literal"  # inside true, false or null


_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_NUMBER_BYTES = frozenset(b"0123456789+-.eE")
_WHITESPACE = frozenset(b" \t\r\n")
_CLOSER = {ord("{"): "}", ord("["): "]"}


class JsonPrefix:
    """Where a prefix of one JSON document stands. Feed it the bytes as they are decoded."""

    def __init__(self):
        self._stack: list[int] = []  # open containers, outermost first: ord("{") or ord("[")
        self._at = _At.VALUE
        self._empty = True  # the innermost container has no member yet
        self._is_key = False  # the open string is a key
        self._escape = 0  # inside a string: 0, or the characters an open escape still needs
        self._utf8 = 0  # inside a string: continuation bytes still due
        self._rest = b""  # LITERAL: the letters still due
        self._last = 0  # NUMBER: its last byte
        self.is_valid = True  # False once the bytes stop being a JSON prefix (nothing closes it then)

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.is_valid:
                self._feed(byte)

    def _feed(self, c: int) -> None:
        at = self._at
        if at is _At.STRING:
            if self._escape:
                # `\` then one letter, or `\u` then four hex digits
                self._escape = 4 if self._escape == -1 and c == ord("u") else max(self._escape - 1, 0)
            elif self._utf8:
                self._utf8 -= 1
            elif c == ord("\\"):
                self._escape = -1  # the letter after `\` is due
            elif c == ord('"'):
                self._at = _At.COLON if self._is_key else _At.AFTER
            elif c >= 0xC0:  # a multi-byte UTF-8 character's lead byte
                self._utf8 = 1 if c < 0xE0 else 2 if c < 0xF0 else 3
            return
        if at is _At.NUMBER:
            if c in _NUMBER_BYTES:
                self._last = c
                return
            self._at = at = _At.AFTER  # the number ended; this byte follows it
        if at is _At.LITERAL:
            if c != self._rest[0]:
                self.is_valid = False
            self._rest = self._rest[1:]
            if not self._rest:
                self._at = _At.AFTER
            return
        if c in _WHITESPACE:
            return
        if at is _At.VALUE:
            self._start_value(c)
        elif at is _At.KEY:
            if c == ord('"'):
                self._at, self._is_key = _At.STRING, True
            elif c == ord("}") and self._empty:
                self._pop()
            else:
                self.is_valid = False
        elif at is _At.COLON:
            self._at = _At.VALUE
            self._empty = False
            self.is_valid = c == ord(":")
        elif c == ord(",") and self._stack:  # AFTER
            self._at = _At.KEY if self._stack[-1] == ord("{") else _At.VALUE
            self._empty = False
        elif self._stack and c == ord(_CLOSER[self._stack[-1]]):
            self._pop()
        else:
            self.is_valid = False

    def _start_value(self, c: int) -> None:
        if c in _CLOSER:
            self._stack.append(c)
            self._at, self._empty = (_At.KEY if c == ord("{") else _At.VALUE), True
        elif c == ord('"'):
            self._at, self._is_key = _At.STRING, False
        elif c == ord("-") or ord("0") <= c <= ord("9"):
            self._at, self._last = _At.NUMBER, c
        elif c in _LITERALS:
            self._at, self._rest = _At.LITERAL, _LITERALS[c]
        elif c == ord("]") and self._empty and self._stack and self._stack[-1] == ord("["):
            self._pop()
        else:
            self.is_valid = False

    def _pop(self) -> None:
        self._stack.pop()
        self._at = _At.AFTER

    def closing(self) -> Optional[str]:
        """The shortest text that makes the prefix one complete JSON document ('' if it is one);
        None when nothing can (not a JSON prefix, or a UTF-8 character cut in half)."""
        if not self.is_valid or self._utf8:
            return None
        out, at = [], self._at
        if at is _At.STRING:
            out.append("n" if self._escape == -1 else "0" * self._escape)  # `\n`, or `\u` + hex digits
            out.append('"')
            at = _At.COLON if self._is_key else _At.AFTER
        elif at is _At.NUMBER:
            if self._last in b"+-.eE":
                out.append("0")  # `-`, `1.`, `1e`, `1e-` each need one digit
            at = _At.AFTER
        elif at is _At.LITERAL:
            out.append(self._rest.decode())
            at = _At.AFTER
        if at is _At.COLON:
            out.append(":null")
        elif at is _At.KEY and not self._empty:
            out.append('"":null')  # after `,` a member is due
        elif at is _At.VALUE and not self._stack:
            out.append("{}")  # nothing yet: the shortest object
        elif at is _At.VALUE and not (self._empty and self._stack[-1] == ord("[")):
            out.append("null")
        out.extend(_CLOSER[c] for c in reversed(self._stack))
        return "".join(out)
