"""Loading a Hugging Face causal-LM folder: the same code for the embedded model, a local folder
or a hub id (where a hub is reachable)."""

from __future__ import annotations

from dataclasses import dataclass

from serving.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def kv_bytes_per_block(self, block_size: int, dtype: str, tensor_parallel_size: int) -> int:
        """Bytes of K and V for one block on one rank (each rank holds kv_heads / tp heads)."""
        heads = max(1, self.num_kv_heads // tensor_parallel_size)
        return 2 * self.num_layers * block_size * heads * self.head_dim * DTYPE_BYTES[dtype]


def resolve_model_path(config: ModelConfig) -> str:
    if config.path:
        return config.path
    from serving.models import default_model_path

    return default_model_path()


def served_name(config: ModelConfig, path: str) -> str:
    if config.name:
        return config.name
    if not config.path:
        from serving.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return path.rstrip("/").split("/")[-1]


def load_model_info(config: ModelConfig) -> ModelInfo:
    from transformers import AutoConfig, GenerationConfig

    path = resolve_model_path(config)
    hf = AutoConfig.from_pretrained(path)
    eos = []
    try:
        eos_cfg = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos_cfg = None
    for source in (eos_cfg, hf.eos_token_id):
        if source is None:
            continue
        eos.extend([source] if isinstance(source, int) else list(source))
    max_len = hf.max_position_embeddings
    if config.max_model_len is not None:
        max_len = min(max_len, config.max_model_len)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelInfo(
        path=path, name=served_name(config, path), max_model_len=max_len,
        eos_token_ids=tuple(dict.fromkeys(eos)), num_layers=hf.num_hidden_layers,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, vocab_size=hf.vocab_size,
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()
