"""`load_weights`, the sharded loader's reads: slices along either dimension equal the checkpoint's,
and a whole tensor is mapped from the file (copy-on-write), so only the rows looked up are resident."""

import os

import pytest
import torch
from safetensors.torch import load_file

import serving.model_loader as ml

# NOTE: the embedding is 16 MiB: a lookup maps in a whole page-cache folio (up to 2 MiB on ext4 here),
# so a small one would be all resident after two lookups
HIDDEN, MLP, VOCAB = 64, 128, 65536


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return str(path)


def cpu_model(path: str):
    """The model with empty (unfilled) CPU parameters, as AutoTP leaves them."""
    return ml.empty_model(path).to_empty(device="cpu")


def mapping_of(ptr: int) -> tuple[str, int]:
    """(the file mapped at address `ptr` in this process, that mapping's resident KiB)."""
    name, rss = None, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if name is not None:
                    break
                if lo <= ptr < hi:
                    name = fields[5] if len(fields) > 5 else ""
            elif name is not None and fields[0] == "Rss:":
                rss = int(fields[1])
    assert name is not None, "no mapping holds the tensor"
    return name, rss


def test_whole_tensor_is_mapped_copy_on_write(checkpoint):
    model = cpu_model(checkpoint)
    ml.load_weights(model, checkpoint, {})
    embed = model.model.embed_tokens.weight
    file = os.path.join(checkpoint, "model.safetensors")

    torch.nn.functional.embedding(torch.tensor([5, 60000]), embed)
    name, rss_kib = mapping_of(embed.data_ptr())
    assert name == file
    assert rss_kib * 1024 < embed.numel() * embed.element_size() / 2  # two rows looked up, not 16 MiB

    ref = load_file(file)
    for n, p in model.named_parameters():
        assert torch.equal(p, ref[n]), n
    with torch.no_grad():
        embed[5] += 1.0  # a write stays in this process: the checkpoint is unchanged
    assert torch.equal(load_file(file)["model.embed_tokens.weight"][5], ref["model.embed_tokens.weight"][5])
    assert not torch.equal(embed[5], ref["model.embed_tokens.weight"][5])


@pytest.mark.parametrize("chunk_bytes", [200, 1600])  # one run bigger than the scratch buffer; several per read
def test_slices_along_either_dimension(checkpoint, monkeypatch, chunk_bytes):
    monkeypatch.setattr(ml, "_CHUNK_BYTES", chunk_bytes)
    model = cpu_model(checkpoint)
    layer = model.model.layers[1]
    # rank 1 of 2: the second half of q_proj's rows (dim 0) and of down_proj's columns (dim 1)
    layer.self_attn.q_proj.weight = torch.nn.Parameter(torch.empty(HIDDEN // 2, HIDDEN), requires_grad=False)
    layer.mlp.down_proj.weight = torch.nn.Parameter(torch.empty(HIDDEN, MLP // 2), requires_grad=False)
    q, down = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    num_bytes = ml.load_weights(model, checkpoint, {q: (0, HIDDEN // 2), down: (1, MLP // 2)})

    ref = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert torch.equal(layer.self_attn.q_proj.weight, ref[q][HIDDEN // 2:])
    assert torch.equal(layer.mlp.down_proj.weight, ref[down][:, MLP // 2:])
    for n, p in model.named_parameters():
        if n not in (q, down):
            assert torch.equal(p, ref[n]), n
    assert num_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
