"""Loading a Hugging Face causal-LM folder: the same code for the embedded model, a local folder
or a hub id (where a hub is reachable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

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
    early_exit_layers: Optional[int] = None  # the exit the model was trained with (config.json), if any

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
        head_dim=head_dim, vocab_size=hf.vocab_size, early_exit_layers=getattr(hf, "early_exit_layers", None),
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


_PROBES = ("Hello, world!", "  The quick brown fox\n\njumps over 3.14 lazy dogs.", "héllo wörld ünïcode 日本語 🙂",
           "<s>a</s> [INST] b [/INST]")


def encoder(tokenizer) -> Callable[[str, bool], list[int]]:
    """`encode(text, add_special_tokens)`: the token ids `tokenizer(text, ...)` gives. For a fast
    tokenizer it calls its Rust tokenizer directly (35 us against 75 us for a 24-token prompt here:
    transformers' `__call__` wraps it in much Python), once that has given the same ids as the
    tokenizer's own call on a few probe texts; otherwise the tokenizer's own call."""
    def slow(text: str, add_special_tokens: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return slow

    def fast(text: str, add_special_tokens: bool = True) -> list[int]:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    try:
        same = all(fast(t, special) == slow(t, special) for t in _PROBES for special in (True, False))
    except Exception:  # NOTE: a backend that cannot take these arguments: the tokenizer's own call
        same = False
    return fast if same else slow


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def empty_model(path: str, dtype: str = "float32"):
    """The model's modules with parameters on the meta device (no memory) and real buffers (RoPE's
    inv_freq is computed, not stored): tensor parallelism then shards it, and each rank fills
    only its shards with `load_weights`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
    return model.eval()


def load_weights(model, path: str, offsets: dict[str, tuple[int, int]], log=None) -> int:
    """Fills each parameter of `model` from the folder's safetensors files, reading only its slice:
    `offsets[name] = (dim, start)` for a parameter that holds a shard (its length along `dim`
    starting at `start` of the checkpoint's tensor); others are taken whole. Returns the bytes of
    the parameters filled.

    NOTE: slices are plain reads, not safetensors' mmap: a slice along dimension 1 touches every
    page of the tensor, and mapped pages count in the process's RSS (seen: the peak above the full
    model's). A whole CPU tensor stored in the parameter's dtype is instead memory-mapped from the
    file (`_map_tensor`), as `from_pretrained` does at TP=1: AutoTP does not split the input
    embedding, and mapped, only the rows that are looked up become resident (a 32000-row
    embedding read whole cost every rank 94 MiB at 125M parameters, 250 MiB at 1.1B).
    A tied LM head missing from the checkpoint is read from the input embedding."""
    import time

    import torch

    index = _safetensors_index(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    num_bytes, t0, last_log = 0, time.monotonic(), time.monotonic()
    files: dict = {}
    maps: dict = {}  # file -> its mmap, shared by the tensors mapped from it (they keep it alive)
    # NOTE: one scratch buffer for the whole load: a buffer allocated per tensor and freed stayed
    # resident (seen at 125M, TP=2: 6 MiB more RSS per layer, from down_proj's reads, 72 MiB in all)
    scratch = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
    try:
        for i, (name, param) in enumerate(params.items()):
            key = name if name in index else "model.embed_tokens.weight" if name == "lm_head.weight" else name
            if key not in index:
                raise KeyError(f"{name} is not in the checkpoint at {path}")
            file, meta = index[key]
            f = files.get(file) or files.setdefault(file, open(file, "rb"))
            dim, start = offsets.get(name, (0, 0))
            # straight into the parameter where it can take the bytes (no second copy of it)
            direct = (param.device.type == "cpu" and param.is_contiguous() and param.dim() > 0
                      and str(param.dtype) == f"torch.{_SAFETENSORS_DTYPES[meta['dtype']]}")
            mapped = (direct and name not in offsets and param.numel() > 0
                      and meta["start"] % param.element_size() == 0)
            if mapped:
                tensor = _map_tensor(maps, file, meta)
            else:
                tensor = _read_slice(f, meta, dim, start, param.shape[dim] if param.dim() else 1, scratch,
                                     into=param.data if direct else None)
            assert tuple(tensor.shape) == tuple(param.shape), (name, tensor.shape, param.shape)
            if mapped:
                param.data = tensor  # .data, not a new Parameter: a parameter tied to it keeps sharing it
            elif not direct:
                with torch.no_grad():
                    param.copy_(tensor)
            num_bytes += tensor.numel() * tensor.element_size()
            if log is not None and (time.monotonic() - last_log > 2.0 or i + 1 == len(params)):
                last_log = time.monotonic()
                log(f"weights: {i + 1}/{len(params)} tensors, {num_bytes / 2**20:.0f} MiB in {last_log - t0:.1f} s")
    finally:
        for f in files.values():
            f.close()
    return num_bytes


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64"}
_CHUNK_BYTES = 4 << 20  # the scratch buffer that slices along a later dimension are read through


def _safetensors_index(path: str) -> dict[str, tuple[str, dict]]:
    """{tensor name: (file, {dtype, shape, start}: its header entry, start = absolute byte offset)}."""
    import glob
    import json
    import os
    import struct

    index = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__":
                index[name] = (file, {"dtype": entry["dtype"], "shape": tuple(entry["shape"]),
                                      "start": 8 + header_len + entry["data_offsets"][0]})
    return index


def _read_slice(f, meta: dict, dim: int, start: int, length: int, scratch, into=None):
    """Elements [start, start + length) along `dim` of one stored tensor, read with plain reads
    (into `into`, a contiguous tensor of the slice's shape and dtype, if given); a slice that is
    not one run of bytes goes through `scratch` (uint8, grown here only if one run is bigger).
    The tensor is [A, S, B] around `dim` (S = its length): the slice is A runs of length x B."""
    import math

    import torch

    dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
    shape = list(meta["shape"]) or [1]
    item = torch.empty((), dtype=dtype).element_size()
    outer, size, inner = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    out = (into.view(torch.uint8).reshape(outer, length * inner * item) if into is not None
           else torch.empty(outer, length * inner * item, dtype=torch.uint8))
    if outer == 1 or length == size:  # one contiguous run of bytes: read straight into the output
        f.seek(meta["start"] + start * inner * item)
        _read_exactly(f, out)
    else:
        row = size * inner * item  # bytes of one of the A runs in the file
        if scratch.numel() < row:
            scratch = torch.empty(row, dtype=torch.uint8)
        rows_per_read = scratch.numel() // row
        buf = scratch[:min(outer, rows_per_read) * row].view(-1, row)
        for a in range(0, outer, rows_per_read):
            n = min(rows_per_read, outer - a)
            f.seek(meta["start"] + a * row)
            _read_exactly(f, buf[:n])
            out[a:a + n] = buf[:n, start * inner * item:(start + length) * inner * item]
    shape[dim] = length
    return into if into is not None else out.view(dtype).reshape(shape if meta["shape"] else ())


def _read_exactly(f, out) -> None:
    """Fills the uint8 tensor `out` from the file's position, or raises (a truncated checkpoint)."""
    if f.readinto(out.numpy()) != out.numel():
        raise EOFError(f"{f.name}: the file ends inside a tensor")


def _map_tensor(maps: dict, file: str, meta: dict):
    """One stored tensor as a view of the file mapped copy-on-write: pages are read on first touch
    and shared with the page cache (and with other processes mapping the file).
    NOTE: ACCESS_COPY, not ACCESS_READ: torch takes no read-only buffers (it warns, and a write
    would crash the process); nothing writes to weights, and a write would copy only its page,
    never reaching the file."""
    import math
    import mmap

    import torch

    m = maps.get(file)
    if m is None:
        with open(file, "rb") as f:
            m = maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
    return torch.frombuffer(m, dtype=dtype, count=math.prod(meta["shape"]), offset=meta["start"]).view(meta["shape"])


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the folder's safetensors files (headers only)."""
    return {name: meta["shape"] for name, (_, meta) in _safetensors_index(path).items()}
