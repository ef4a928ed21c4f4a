"""`python -m bench.engine` on the tiny model: both targets answer every request, count only
useful tokens, and the report prints both rows and the ratio."""

from bench import engine as bench_engine


def test_engine_and_static_count_useful_tokens(tiny_model):
    prompts = [[7 + i, 8 + i, 9 + i] * (i + 1) for i in range(5)]
    max_tokens = [3, 9, 4, 12, 6]
    eng_tokens, eng_s = bench_engine.run_engine(tiny_model, prompts, max_tokens, max_num_seqs=4)
    st_tokens, st_s = bench_engine.run_static(tiny_model, prompts, max_tokens, batch_size=2)
    for tokens, secs in ((eng_tokens, eng_s), (st_tokens, st_s)):
        assert len(prompts) <= tokens <= sum(max_tokens)  # at least one token each, never past max_tokens
        assert secs > 0


def test_main_prints_both_rows_and_the_ratio(tiny_model, capsys):
    assert bench_engine.main(["--model", tiny_model, "--num-requests", "4", "--prompt-len", "8,4,16",
                              "--output-len", "2,6", "--max-num-seqs", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "| engine (continuous batching, max_num_seqs=4) |" in out
    assert "| static (HF generate, batches of 2) |" in out
    assert "engine / static, output tokens/s: **" in out
