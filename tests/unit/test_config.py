"""The configuration tree: `serve run` arguments parsed into typed, frozen, validated config."""

import pytest
from pydantic import ValidationError

from serving.config import AppConfig, LLMConfig, SchedulerConfig


def test_flat_args_are_parsed_to_their_types():
    config = AppConfig.from_flat_args({
        "model": "/models/tiny", "model_name": "tiny", "max_num_seqs": "8", "max_num_batched_tokens": "64",
        "block_size": "4", "num_cpus_per_worker": "1.5", "tensor_parallel_size": "2", "cache": "false",
        "cache_threshold": "0.85", "num_kv_blocks": "none", "router_replicas": "3",
    })
    llm = config.models[0]
    assert llm.model.path == "/models/tiny" and llm.model.name == "tiny"
    sched = llm.scheduler
    assert (sched.max_num_seqs, sched.max_num_batched_tokens, sched.block_size) == (8, 64, 4)
    assert type(sched.max_num_seqs) is int
    assert llm.parallel.num_cpus_per_worker == 1.5 and llm.parallel.tensor_parallel_size == 2
    assert config.cache.enabled is False and config.cache.similarity_threshold == 0.85
    assert sched.num_kv_blocks is None
    assert config.router.num_replicas == 3
    # what was not given keeps its default
    assert llm.scheduler.default_max_tokens == SchedulerConfig().default_max_tokens


@pytest.mark.parametrize("text, value", [("true", True), ("Yes", True), ("on", True), ("false", False),
                                         ("NO", False), ("off", False)])
def test_booleans(text, value):
    assert AppConfig.from_flat_args({"cache": text}).cache.enabled is value


def test_non_string_values_pass_through():
    config = AppConfig.from_flat_args({"max_num_seqs": 4, "cache": False, "cache_threshold": 0.5})
    assert config.models[0].scheduler.max_num_seqs == 4 and config.cache.enabled is False


def test_no_args_gives_the_defaults():
    assert AppConfig.from_flat_args({}) == AppConfig()
    assert AppConfig.from_flat_args(None) == AppConfig()


def test_unknown_flat_key_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown argument 'max_seqs'.*max_num_seqs"):
        AppConfig.from_flat_args({"max_seqs": "8"})


@pytest.mark.parametrize("args", [
    {"max_num_seqs": "0"},  # ge=1
    {"max_num_seqs": "many"},  # not a number
    {"dtype": "float8"},  # not a known dtype
    {"max_num_seqs": "64", "max_num_batched_tokens": "32"},  # tokens per step < sequences per step
    {"cache_threshold": "1.5"},
])
def test_invalid_values_are_rejected(args):
    with pytest.raises(ValueError):
        AppConfig.from_flat_args(args)


def test_nested_config_is_the_whole_tree():
    config = AppConfig.from_flat_args({"config": {
        "name": "app",
        "models": [{"model": {"path": "/a", "name": "a"}, "scheduler": {"max_num_seqs": "4", "block_size": 8}},
                   {"model": {"path": "/b", "name": "b"}}],
        "cache": {"enabled": False},
    }})
    assert config.name == "app" and [m.model.name for m in config.models] == ["a", "b"]
    assert config.models[0].scheduler.max_num_seqs == 4 and config.models[0].scheduler.block_size == 8
    assert config.cache.enabled is False


def test_nested_config_rejects_unknown_keys_and_mixing():
    with pytest.raises(ValueError):
        AppConfig.from_flat_args({"config": {"models": [{"model": {"path": "/a", "colour": "red"}}]}})
    with pytest.raises(ValueError, match="either 'config' or flat"):
        AppConfig.from_flat_args({"config": {}, "max_num_seqs": "4"})
    with pytest.raises(ValueError, match="at least one model"):
        AppConfig.from_flat_args({"config": {"models": []}})


def test_config_is_frozen():
    config = LLMConfig()
    with pytest.raises(ValidationError):
        config.scheduler.max_num_seqs = 3


def test_numeric_looking_model_name_stays_a_string():
    assert AppConfig.from_flat_args({"model_name": "123"}).models[0].model.name == "123"


def test_speculative_flat_arguments():
    config = AppConfig.from_flat_args({"speculative_method": "draft", "num_speculative_tokens": "4",
                                       "speculative_adaptive": "false", "early_exit_layers": "3"})
    spec = config.models[0].speculative
    assert (spec.method, spec.num_speculative_tokens, spec.adaptive, spec.early_exit_layers) == ("draft", 4, False, 3)
    assert spec.enabled and spec.uses_draft
    assert not AppConfig.from_flat_args({}).models[0].speculative.enabled
    assert not AppConfig.from_flat_args({"speculative_method": "none"}).models[0].speculative.enabled
    with pytest.raises(ValueError):
        AppConfig.from_flat_args({"speculative_method": "medusa"})


def test_api_keys_file_and_limits_flat_arguments():
    config = AppConfig.from_flat_args({"api_keys_file": "/etc/serving/keys", "max_body_bytes": "65536",
                                       "max_output_tokens": "512", "max_stop_len": "32", "max_num_messages": "64",
                                       "max_prompt_chars": "10000", "router_replicas": "2"})
    router = config.router
    assert router.api_keys_file == "/etc/serving/keys" and router.num_replicas == 2
    limits = router.limits
    assert (limits.max_body_bytes, limits.max_output_tokens, limits.max_stop_len, limits.max_num_messages,
            limits.max_prompt_chars) == (65536, 512, 32, 64, 10000)
    assert AppConfig.from_flat_args({}).router.api_keys_file is None


def test_default_max_tokens_must_fit_the_output_limit():
    with pytest.raises(ValueError, match="default_max_tokens"):
        AppConfig.from_flat_args({"max_output_tokens": "100"})  # the default max_tokens is 256
    AppConfig.from_flat_args({"max_output_tokens": "256"})


def test_cache_capacity_is_a_flat_argument():
    assert AppConfig.from_flat_args({"cache_capacity_bytes": "8388608"}).cache.capacity_bytes == 8 * 2**20


def test_graceful_shutdown_options_leave_the_requests_a_drain_timeout():
    serve_opts = AppConfig.from_flat_args({"graceful_shutdown_timeout_s": "30"}).models[0].serve
    assert serve_opts.graceful_shutdown_timeout_s == 30.0 and serve_opts.graceful_shutdown_wait_loop_s == 2.0
    assert serve_opts.drain_timeout_s == 30.0 - 2 * 2.0 - 3.0  # noticing, Serve's check, the margin
    assert LLMConfig().serve.drain_timeout_s >= 50  # a long generation on the embedded model fits
    with pytest.raises(ValueError, match="graceful_shutdown_timeout_s must exceed"):
        AppConfig.from_flat_args({"graceful_shutdown_timeout_s": "6"})


def test_the_router_drains_for_longer_than_every_llm_server():
    from serving.config import ModelConfig, ServeOptions

    config = AppConfig(models=tuple(
        LLMConfig(model=ModelConfig(name=name), serve=ServeOptions(graceful_shutdown_timeout_s=t,
                                                                   graceful_shutdown_wait_loop_s=w))
        for name, t, w in (("a", 30.0, 2.0), ("b", 10.0, 0.5))))
    stop = config.router_shutdown
    assert stop.graceful_shutdown_timeout_s == 33.0 and stop.graceful_shutdown_wait_loop_s == 0.5
    assert stop.drain_timeout_s > max(m.serve.drain_timeout_s for m in config.models) + 2
