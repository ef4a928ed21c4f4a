"""The embedded default model: both folders load offline, share a tokenizer, decode reproducibly."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from serving.models import EMBEDDED_DIR  # noqa: E402
from serving.models import EMBEDDED_DRAFT as DRAFT  # noqa: E402
from serving.models import EMBEDDED_TARGET as TARGET  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is a river?"}]


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TARGET)


@pytest.fixture(scope="module")
def target():
    return transformers.AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def draft():
    return transformers.AutoModelForCausalLM.from_pretrained(DRAFT, dtype=torch.float32).eval()


def _prompt(tokenizer):
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def test_folders_hold_the_hugging_face_files():
    for folder in (TARGET, DRAFT):
        for name in ("config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
    total = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert total < 40 * 2**20


def test_both_are_llama_and_the_draft_is_several_times_smaller(target, draft):
    assert isinstance(target, transformers.LlamaForCausalLM)
    assert isinstance(draft, transformers.LlamaForCausalLM)
    assert target.num_parameters() >= 3 * draft.num_parameters()
    assert next(target.parameters()).dtype == torch.float32


def test_target_shards_over_two_and_four_ranks(target):
    cfg = target.config
    for size in (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                 cfg.hidden_size, cfg.vocab_size):
        assert size % 4 == 0


def test_target_and_draft_share_the_tokenizer(tokenizer, target, draft):
    draft_tokenizer = transformers.AutoTokenizer.from_pretrained(DRAFT)
    assert draft_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert (TARGET / "tokenizer.json").read_bytes() == (DRAFT / "tokenizer.json").read_bytes()
    assert target.config.vocab_size == draft.config.vocab_size == len(tokenizer)


def test_special_token_ids_agree_across_configs(tokenizer):
    for folder in (TARGET, DRAFT):
        for file in ("config.json", "generation_config.json"):
            cfg = json.loads((folder / file).read_text())
            assert cfg["bos_token_id"] == tokenizer.bos_token_id
            assert cfg["eos_token_id"] == tokenizer.eos_token_id
            assert cfg["pad_token_id"] == tokenizer.pad_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_chat_template_renders_roles_and_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}] + MESSAGES
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>Be brief.<|eos|><|user|>What is a river?<|eos|><|assistant|>"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_text_round_trips_through_the_tokenizer(tokenizer):
    text = "In the beginning God created the heaven and the earth. Ünïcode too: 42!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_greedy_generation_is_deterministic(tokenizer, target):
    prompt = _prompt(tokenizer)
    first = target.generate(**prompt, max_new_tokens=12, do_sample=False)
    second = target.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, second)
    reply = tokenizer.decode(first[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sum(c.isalpha() for c in reply) > len(reply) / 2


def test_seeded_sampling_is_reproducible(tokenizer, draft):
    prompt = _prompt(tokenizer)
    outputs = []
    for _ in range(2):
        torch.manual_seed(1234)
        outputs.append(draft.generate(**prompt, max_new_tokens=12, do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0))
    assert torch.equal(outputs[0], outputs[1])
