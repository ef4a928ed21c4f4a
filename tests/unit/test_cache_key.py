"""Cache key, query text, policy and partitioning: the hard partition never mixes requests."""

import pytest

from serving.cache.key import CacheKey, build_cache_key, cache_policy, cache_query_text, partition_of
from serving.protocol import ChatCompletionRequest, CompletionRequest


def chat(messages, **kw):
    kw.setdefault("temperature", 0.0)
    return ChatCompletionRequest(model="m", messages=messages, **kw)


def user(text):
    return {"role": "user", "content": text}


def test_same_request_same_key_and_partition():
    a = build_cache_key(chat([user("hi")]), "m")
    b = build_cache_key(chat([user("hi")], stream=True), "m")
    assert a == b and hash(a) == hash(b) and a.digest == b.digest
    assert partition_of(a, 7) == partition_of(b, 7)


@pytest.mark.parametrize("change", [
    {"temperature": 0.5}, {"top_p": 0.9}, {"top_k": 5}, {"seed": 1}, {"max_tokens": 7},
    {"stop": ["\n"]}, {"user": "tenant-b"},
])
def test_output_changing_parameters_split_the_key(change):
    base = build_cache_key(chat([user("hi")]), "m")
    assert build_cache_key(chat([user("hi")], **change), "m") != base


def test_model_kind_and_context_split_the_key():
    base = build_cache_key(chat([user("hi")]), "m")
    assert build_cache_key(chat([user("hi")]), "other") != base
    assert build_cache_key(CompletionRequest(model="m", prompt="hi", temperature=0), "m") != base
    with_system = chat([{"role": "system", "content": "be terse"}, user("hi")])
    assert build_cache_key(with_system, "m") != base
    history = chat([user("a"), {"role": "assistant", "content": "b"}, user("hi")])
    other_history = chat([user("a"), {"role": "assistant", "content": "c"}, user("hi")])
    assert build_cache_key(history, "m") != build_cache_key(other_history, "m")
    assert build_cache_key(history, "m").context != ""


def test_last_user_turn_is_not_in_the_key():
    a = chat([{"role": "system", "content": "s"}, user("one question")])
    b = chat([{"role": "system", "content": "s"}, user("another question")])
    assert build_cache_key(a, "m") == build_cache_key(b, "m")


def test_query_text():
    assert cache_query_text(chat([user("a"), {"role": "assistant", "content": "b"}, user("c")])) == "c"
    assert cache_query_text(CompletionRequest(model="m", prompt="hello")) == "hello"
    assert cache_query_text(CompletionRequest(model="m", prompt=[1, 2, 3])) is None
    assert cache_query_text(chat([{"role": "system", "content": "s"}])) is None


def test_policy():
    assert cache_policy(chat([user("a")])) == (p := cache_policy(chat([user("a")]))) and p.read and p.write
    sampled = cache_policy(chat([user("a")], temperature=0.7))
    assert not sampled.read and not sampled.write
    opted = cache_policy(chat([user("a")], temperature=0.7, cache={"allow_sampled": True}))
    assert opted.read and opted.write
    assert not cache_policy(chat([user("a")], cache={"skip": True})).read
    assert cache_policy(chat([user("a")], cache={"skip": True})).write
    no_store = cache_policy(chat([user("a")], cache={"no_store": True}))
    assert no_store.read and not no_store.write
    # The default temperature is 1.0 (OpenAI's): such a request is not cached by default.
    assert not cache_policy(ChatCompletionRequest(model="m", messages=[user("a")])).read


def test_partition_is_stable_and_spread():
    key = build_cache_key(chat([user("x")]), "m")
    # NOTE: a fixed value: the partition must not change between processes or Python versions.
    assert partition_of(key, 1) == 0
    assert partition_of(key, 1000) == int(key.digest[:16], 16) % 1000
    seen = {partition_of(build_cache_key(chat([user("x")], user=f"t{i}"), "m"), 4) for i in range(64)}
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        partition_of(key, 0)


def test_key_roundtrips_through_fields_and_pickle():
    import pickle

    key = build_cache_key(chat([user("x")], stop=["a", "b"], seed=3), "m")
    assert CacheKey.from_fields(key.fields()) == key
    again = pickle.loads(pickle.dumps(key))
    assert again == key and again.digest == key.digest


def test_an_explicit_tenant_replaces_user():
    from serving.auth import cache_tenant, key_tenant

    req = chat([user("x")], user="bob")
    assert build_cache_key(req, "m").tenant == "bob"
    a = build_cache_key(req, "m", cache_tenant(key_tenant("sk-a"), req.user))
    b = build_cache_key(req, "m", cache_tenant(key_tenant("sk-b"), req.user))
    assert a != b and "bob" in a.tenant and "sk-" not in a.tenant
    assert build_cache_key(req, "m", "") == build_cache_key(chat([user("x")]), "m")
