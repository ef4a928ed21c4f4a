"""Optional API keys: where they come from, how a request's key is checked, and the cache tenant
a key stands for.

Keys are off unless configured. They come from the environment variable `SERVING_API_KEYS`
(comma-separated) and/or a file (`router.api_keys_file`: one key per line, blank lines and `#`
comments ignored). Only the file's path is in the config tree; the keys are read in the router's
process, so they never appear in a config's repr, a pickled deployment argument or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Mapping, Optional

from serving.errors import AuthenticationError

ENV_VAR = "SERVING_API_KEYS"
_MISSING = ("You didn't provide an API key. Send it in an Authorization header: "
            "'Authorization: Bearer YOUR_KEY'.")


def load_api_keys(path: Optional[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """Every key from `env[SERVING_API_KEYS]` and the file at `path` (either may be absent),
    without repeats; () means keys are off. A file that is named but holds no key is an error:
    it would switch the keys off without anyone noticing."""
    keys = [k.strip() for k in env.get(ENV_VAR, "").split(",")]
    if path is not None:
        with open(path, encoding="utf-8") as f:
            from_file = [line.strip() for line in f]
        from_file = [k for k in from_file if k and not k.startswith("#")]
        if not from_file:
            raise ValueError(f"api_keys_file {path} holds no key")
        keys += from_file
    keys = [k for k in keys if k]
    for i, key in enumerate(keys):
        if any(c.isspace() for c in key):  # NOTE: never the key itself in an error: it may reach a log
            raise ValueError(f"API key number {i + 1} contains whitespace; a Bearer token cannot")
    return tuple(dict.fromkeys(keys))


def key_tenant(key: str) -> str:
    """The cache tenant of a key: stable across restarts and replicas, distinct per key, and not
    the key (a truncated sha256 in its own domain: cache snapshots hold tenants, never keys)."""
    return "key-" + hashlib.sha256(b"serving-tenant\0" + key.encode("utf-8")).hexdigest()[:16]


def cache_tenant(tenant_of_key: Optional[str], user: Optional[str]) -> Optional[str]:
    """The tenant that partitions the cache for a request whose key stands for `tenant_of_key`
    (None: keys are off, and the cache key takes `user` as before). With keys on, `user` only
    splits a key's tenant further: it can never reach another key's entries."""
    if tenant_of_key is None:
        return None
    return f"{tenant_of_key}/{user}" if user else tenant_of_key


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class ApiKeys:
    """The configured keys, checked in constant time: the presented key's digest is compared with
    every key's digest (`hmac.compare_digest`, all of them, no early exit), so the time taken
    depends neither on which key matched nor on how much of one did."""

    def __init__(self, keys: tuple[str, ...]):
        if not keys:
            raise ValueError("ApiKeys needs at least one key")
        self._entries = [(_digest(k), key_tenant(k)) for k in keys]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def tenant_of(self, authorization: Optional[str]) -> str:
        """The tenant of the key in an `Authorization: Bearer <key>` header value; raises
        `AuthenticationError` (401) when it is missing, malformed or not a configured key."""
        parts = (authorization or "").split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise AuthenticationError(_MISSING)
        presented = _digest(parts[1])
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found
