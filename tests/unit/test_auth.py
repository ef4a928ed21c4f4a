"""API keys: loading from the environment and a file, the constant-time check, the tenant of a key."""

import hashlib

import pytest

from serving.auth import ENV_VAR, ApiKeys, cache_tenant, key_tenant, load_api_keys
from serving.errors import AuthenticationError


def test_keys_are_off_without_env_or_file():
    assert load_api_keys(None, {}) == ()
    assert load_api_keys(None, {ENV_VAR: ""}) == ()
    assert load_api_keys(None, {ENV_VAR: " , ,"}) == ()


def test_env_keys_are_comma_separated_and_stripped():
    assert load_api_keys(None, {ENV_VAR: "sk-one, sk-two ,sk-one"}) == ("sk-one", "sk-two")


def test_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# the team's keys\n\nsk-alpha\n   \n  sk-beta  \n# sk-retired\n")
    assert load_api_keys(str(path), {}) == ("sk-alpha", "sk-beta")


def test_env_and_file_together(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-file\nsk-both\n")
    assert load_api_keys(str(path), {ENV_VAR: "sk-env,sk-both"}) == ("sk-env", "sk-both", "sk-file")


def test_a_named_file_without_keys_is_an_error(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing here yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(str(path), {ENV_VAR: "sk-env"})
    with pytest.raises(FileNotFoundError):
        load_api_keys(str(tmp_path / "missing"), {})


def test_a_key_with_whitespace_is_refused_without_showing_it(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-fine\nsk-secret part\n")
    with pytest.raises(ValueError, match="number 2") as info:
        load_api_keys(str(path), {})
    assert "secret" not in str(info.value)


def test_right_key_gives_its_tenant():
    keys = ApiKeys(("sk-alpha", "sk-beta"))
    assert keys.tenant_of("Bearer sk-alpha") == key_tenant("sk-alpha")
    assert keys.tenant_of("bearer   sk-beta") == key_tenant("sk-beta")  # the scheme is case-insensitive


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "sk-alpha", "Basic sk-alpha", "Bearer sk-alpha extra", "Bearer sk-alph",
    "Bearer sk-alpha2", "Bearer SK-ALPHA", "Token sk-alpha",
])
def test_wrong_missing_or_malformed_headers_get_401(header):
    keys = ApiKeys(("sk-alpha", "sk-beta"))
    with pytest.raises(AuthenticationError) as info:
        keys.tenant_of(header)
    err = info.value
    assert err.status_code == 401
    assert err.to_dict() == {"error": {"message": err.message, "type": "invalid_request_error", "param": None,
                                       "code": "invalid_api_key"}}
    assert "sk-" not in err.message  # never echoes what was presented


def test_every_key_is_compared(monkeypatch):
    import serving.auth as auth

    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ApiKeys(("sk-a", "sk-b", "sk-c"))
    for header in ("Bearer sk-a", "Bearer sk-c", "Bearer sk-nope"):
        calls.clear()
        try:
            keys.tenant_of(header)
        except AuthenticationError:
            pass
        assert len(calls) == 3  # no early exit on the first match


def test_no_key_in_repr():
    keys = ApiKeys(("sk-secret-value",))
    assert "secret" not in repr(keys) and len(keys) == 1


def test_tenant_is_stable_distinct_and_not_the_key():
    a, b = key_tenant("sk-alpha"), key_tenant("sk-beta")
    assert a == key_tenant("sk-alpha") and a != b
    assert a.startswith("key-") and len(a) == 20 and "alpha" not in a
    assert a == "key-" + hashlib.sha256(b"serving-tenant\0sk-alpha").hexdigest()[:16]


def test_cache_tenant_keeps_user_under_the_key():
    assert cache_tenant(None, "bob") is None  # keys off: the cache key takes `user` itself
    t = key_tenant("sk-alpha")
    assert cache_tenant(t, None) == t
    assert cache_tenant(t, "bob") == f"{t}/bob"
    assert cache_tenant(t, "bob") != cache_tenant(key_tenant("sk-beta"), "bob")
