"""One factory builds every engine: the model in this process for tensor_parallel_size 1, the
benchmark stand-in for executor="instant"."""

from parallel.build import build_engine, resolve_device
from serving.config import LLMConfig, ModelConfig, ParallelConfig, SchedulerConfig
from serving.executor import InstantExecutor, LocalExecutor
from serving.sampling import SamplingParams


def test_tensor_parallel_size_1_runs_in_this_process(tiny_model):
    engine = build_engine(LLMConfig(model=ModelConfig(path=tiny_model)))
    assert isinstance(engine.executor, LocalExecutor)
    assert resolve_device(LLMConfig()) == "cpu"


def test_the_instant_stand_in_runs_every_request_to_max_tokens(tiny_model):
    config = LLMConfig(model=ModelConfig(path=tiny_model), parallel=ParallelConfig(executor="instant"),
                       scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4))
    engine = build_engine(config)
    assert isinstance(engine.executor, InstantExecutor)
    eos = engine.info.eos_token_ids
    for i in range(12):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=eos))
    tokens = {f"r{i}": [] for i in range(12)}
    while engine.has_unfinished():
        for out in engine.step()[0]:
            tokens[out.request_id] += out.token_ids
    assert all(len(t) == 20 and not set(t) & set(eos) for t in tokens.values())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
