"""Train the embedded default model: tokenizer, target and draft, on a 2-core CPU.

    python -m serving.models.train --early-exit-layers 2  # the shipped folders; then evaluate
    python -m serving.models.train --eval-only  # evaluate the saved folders, print the card numbers
    python -m serving.models.train --from DIR --out OUT   # a fresh draft for DIR/target

Writes Hugging Face folders to serving/models/embedded/{target,draft}. Seeded: the same seed,
thread count and library versions give the same weights. The pipeline trains the tokenizer and the
target (or, with `--from`, takes a saved target); with `--early-exit-layers E` it fine-tunes the
target so that its first E layers, followed by its own final norm and LM head, make a good
speculative proposer (`serving/models/early_exit.py` measures it); last, it distills the draft from
that final target's logits, so that the draft's greedy choice agrees with the target's, which is
what speculative decoding needs. The measured wall times are in embedded/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

from serving.models import EMBEDDED_DIR
from serving.models.corpus import (SOURCES, Corpus, CorpusMissing, build_corpus,
                                   document_texts)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
SAMPLE_PROMPTS = ["What does \"light\" mean?", "Tell me a verse about mercy.", "What is a river?"]


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedules of the shipped model (embedded/README.md has the measured time), and of
    the early-exit fine-tuning."""

    seed: int = 0
    vocab_size: int = 4096
    seq_len: int = 512
    batch_size: int = 8
    target_steps: int = 600
    target_lr: float = 2e-3
    draft_steps: int = 400
    draft_lr: float = 3e-3
    warmup_steps: int = 40
    max_eval_tokens: int = 131072
    early_exit_steps: int = 300
    early_exit_lr: float = 1e-3
    early_exit_weight: float = 1.0


def model_configs(vocab_size: int, seq_len: int) -> dict[str, LlamaConfig]:
    """Target and draft architectures. Head and MLP sizes divide by 4 for tensor parallelism."""
    common = dict(vocab_size=vocab_size, max_position_embeddings=seq_len, tie_word_embeddings=True,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, rope_theta=10000.0)
    return {
        "target": LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                              num_attention_heads=8, num_key_value_heads=4, **common),
        "draft": LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, **common),
    }


def train_tokenizer(corpus: Corpus, vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the training documents, with special tokens and the chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator((t for d in corpus.train for t in document_texts(d)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        model_max_length=max_len,
    )


def encode(tokenizer, documents) -> torch.Tensor:
    """One token stream: plain documents as <|bos|>text<|eos|>, chats through the chat template."""
    texts = [
        tokenizer.bos_token + d + tokenizer.eos_token if isinstance(d, str)
        else tokenizer.apply_chat_template(d, tokenize=False)
        for d in documents
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long)


def _batches(stream: torch.Tensor, cfg: TrainConfig, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(cfg.seq_len + 1)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size, 1), generator=gen)
        yield stream[starts + offsets]  # [B, T + 1]


def _lr(step: int, cfg: TrainConfig, steps: int, peak: float) -> float:
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model, stream, cfg: TrainConfig, steps: int, peak_lr: float, loss_fn, name: str,
           batch_seed: int):
    """AdamW with warmup and cosine decay; bf16 autocast for speed, float32 master weights."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=True)
    model.train()
    start = time.time()
    for step, batch in enumerate(_batches(stream, cfg, steps, batch_seed)):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg, steps, peak_lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"[{name}] step {step:4d}/{steps} loss {loss.item():.3f} "
                  f"{time.time() - start:6.0f}s", flush=True)
    model.eval()
    return model


def _lm_loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits.float()  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _distill_loss(teacher):
    def loss_fn(student, batch):
        with torch.no_grad():
            target_logp = F.log_softmax(teacher(input_ids=batch[:, :-1]).logits.float(), -1)
        draft_logp = F.log_softmax(student(input_ids=batch[:, :-1]).logits.float(), -1)
        # KL(target || draft), summed over the vocabulary, averaged over positions.
        return F.kl_div(draft_logp.flatten(0, 1), target_logp.flatten(0, 1),
                        log_target=True, reduction="batchmean")
    return loss_fn


def _early_exit_loss(exit_layers: int, weight: float):
    def loss_fn(model, batch):
        out = model(input_ids=batch[:, :-1], output_hidden_states=True)
        # NOTE: hidden_states[0] is the embedding output and hidden_states[E] the residual stream
        # after layer E, before the final norm (only the last entry is normed), so this is exactly
        # the exit that `config.num_hidden_layers = E` runs.
        exit_logits = model.lm_head(model.model.norm(out.hidden_states[exit_layers]))
        labels = batch[:, 1:].flatten()
        full = F.cross_entropy(out.logits.float().flatten(0, 1), labels)
        early = F.cross_entropy(exit_logits.float().flatten(0, 1), labels)
        return full + weight * early
    return loss_fn


def save(model, tokenizer, folder: Path) -> None:
    """A Hugging Face folder: float32 safetensors, config, generation config, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID, do_sample=False)
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder, save_jinja_files=False)


def train_all(corpus: Corpus, cfg: TrainConfig, out: Path, source: Path | None = None,
              exit_layers: int | None = None) -> dict[str, float]:
    """The pipeline: tokenizer and target (or `source`'s target), an early-exit fine-tune of the
    target if `exit_layers` is given, then a draft distilled from that final target. Saves
    out/{target,draft}; returns wall seconds per phase."""
    timings, t0 = {}, time.time()
    if source is None:
        timings |= pretrain_target(corpus, cfg, out)
        source = out
    # NOTE: the later phases always start from the saved folder, so that one run of the pipeline
    # and a run `--from` a saved folder give the same bits.
    tokenizer = AutoTokenizer.from_pretrained(source / "target")
    stream = encode(tokenizer, corpus.train)
    target = AutoModelForCausalLM.from_pretrained(source / "target", dtype=torch.float32).eval()
    if exit_layers is not None:
        t1 = time.time()
        finetune_early_exit(target, stream, cfg, exit_layers)
        timings["early_exit_s"] = time.time() - t1
    save(target, tokenizer, out / "target")

    torch.manual_seed(cfg.seed + 1)
    draft = LlamaForCausalLM(model_configs(len(tokenizer), cfg.seq_len)["draft"])
    t2 = time.time()
    _train(draft, stream, cfg, cfg.draft_steps, cfg.draft_lr, _distill_loss(target), "draft",
           cfg.seed + 5)
    timings["draft_s"] = time.time() - t2
    save(draft, tokenizer, out / "draft")
    timings["total_s"] = time.time() - t0
    return timings


def pretrain_target(corpus: Corpus, cfg: TrainConfig, out: Path) -> dict[str, float]:
    """Train the tokenizer and the target from scratch; save out/target; return wall seconds."""
    t0 = time.time()
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, cfg.seq_len)
    stream = encode(tokenizer, corpus.train)
    timings = {"tokenizer_s": time.time() - t0}
    print(f"tokenizer: {len(tokenizer)} tokens; training stream {len(stream)} tokens", flush=True)
    torch.manual_seed(cfg.seed)
    target = LlamaForCausalLM(model_configs(len(tokenizer), cfg.seq_len)["target"])
    t1 = time.time()
    # NOTE: each phase draws its own windows; seed + 6 (target), + 7 (early exit) and + 5 (draft)
    # are the offsets the shipped weights were trained with.
    _train(target, stream, cfg, cfg.target_steps, cfg.target_lr, _lm_loss, "target", cfg.seed + 6)
    timings["target_s"] = time.time() - t1
    save(target, tokenizer, out / "target")
    return timings


def finetune_early_exit(target, stream: torch.Tensor, cfg: TrainConfig, exit_layers: int) -> None:
    """Fine-tune `target` in place on CE(full) + weight * CE(exit after `exit_layers` layers), the
    exit sharing the final norm and LM head; records `early_exit_layers` in its config."""
    target.config.early_exit_layers = exit_layers
    _train(target, stream, cfg, cfg.early_exit_steps, cfg.early_exit_lr,
           _early_exit_loss(exit_layers, cfg.early_exit_weight), "early-exit", cfg.seed + 7)


def unigram_nll(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Mean negative log-likelihood of `targets` under add-one-smoothed training token counts."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return -logp[targets].mean().item()


@torch.no_grad()
def evaluate(corpus: Corpus, cfg: TrainConfig, folder: Path) -> dict:
    """Held-out loss and perplexity of target, draft and a unigram baseline; draft agreement."""
    tokenizer = AutoTokenizer.from_pretrained(folder / "target")
    target = AutoModelForCausalLM.from_pretrained(folder / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(folder / "draft", dtype=torch.float32).eval()
    heldout = encode(tokenizer, corpus.heldout)
    windows = heldout[: len(heldout) // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)
    windows = windows[: cfg.max_eval_tokens // cfg.seq_len]  # [N, T]

    nll = {"target": 0.0, "draft": 0.0}
    agree, correct, count = 0, 0, 0
    for batch in windows.split(cfg.batch_size):
        labels = batch[:, 1:].flatten()
        argmax = {}
        for name, model in (("target", target), ("draft", draft)):
            logits = model(input_ids=batch[:, :-1]).logits.flatten(0, 1)
            nll[name] += F.cross_entropy(logits, labels, reduction="sum").item()
            argmax[name] = logits.argmax(-1)
        agree += (argmax["target"] == argmax["draft"]).sum().item()
        correct += (argmax["target"] == labels).sum().item()
        count += labels.numel()

    train_stream = encode(tokenizer, corpus.train)
    losses = {name: total / count for name, total in nll.items()}
    losses["unigram"] = unigram_nll(train_stream, windows[:, 1:].flatten(), len(tokenizer))
    return {
        "heldout_tokens": count,
        "params": {"target": target.num_parameters(), "draft": draft.num_parameters()},
        "loss": losses,
        "perplexity": {name: math.exp(loss) for name, loss in losses.items()},
        "target_top1_accuracy": correct / count,
        "draft_target_top1_agreement": agree / count,
        "samples": sample_chats(tokenizer, target, cfg.seed),
    }


def sample_chats(tokenizer, model, seed: int, max_new_tokens: int = 48) -> dict[str, str]:
    """Greedy chat completions of SAMPLE_PROMPTS."""
    samples = {}
    torch.manual_seed(seed)
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        samples[prompt] = tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-only", action="store_true", help="evaluate the saved folders")
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--seed", type=int, default=0)
    # NOTE: one thread by default: on a CPU shared with other jobs, every parallel region of a
    # two-thread run waits for a descheduled partner thread, which was measured 3-4x slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (changes the bits)")
    parser.add_argument("--target-steps", type=int, default=TrainConfig.target_steps)
    parser.add_argument("--draft-steps", type=int, default=TrainConfig.draft_steps)
    parser.add_argument("--from", dest="source", type=Path,
                        help="start from this folder's target/ instead of training one")
    parser.add_argument("--early-exit-layers", type=int,
                        help="fine-tune the target for an exit after this many layers")
    parser.add_argument("--early-exit-steps", type=int, default=TrainConfig.early_exit_steps)
    parser.add_argument("--early-exit-lr", type=float, default=TrainConfig.early_exit_lr)
    parser.add_argument("--early-exit-weight", type=float, default=TrainConfig.early_exit_weight,
                        help="weight of the exit's cross-entropy against the full model's")
    args = parser.parse_args(argv)
    if args.source is not None and not (args.source / "target" / "config.json").is_file():
        parser.error(f"--from {args.source} has no target/config.json")
    if args.source is not None and args.out.resolve() == args.source.resolve():
        parser.error("--out must differ from --from")
    if args.early_exit_layers is not None:
        num_layers = (AutoConfig.from_pretrained(args.source / "target").num_hidden_layers
                      if args.source is not None
                      else model_configs(TrainConfig.vocab_size, 1)["target"].num_hidden_layers)
        if not 1 <= args.early_exit_layers < num_layers:
            parser.error(f"--early-exit-layers must be from 1 to {num_layers - 1}")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, target_steps=args.target_steps, draft_steps=args.draft_steps,
                      early_exit_steps=args.early_exit_steps, early_exit_lr=args.early_exit_lr,
                      early_exit_weight=args.early_exit_weight)
    try:
        corpus = build_corpus(cfg.seed)
    except CorpusMissing as err:
        print(err, file=sys.stderr)
        return 2
    print(f"corpus: {len(corpus.train)} training and {len(corpus.heldout)} held-out documents "
          f"from {'; '.join(f'{k} ({v})' for k, v in SOURCES.items())}", flush=True)

    report = {}
    if not args.eval_only:
        report["timings"] = train_all(corpus, cfg, args.out, args.source, args.early_exit_layers)
    t0 = time.time()
    report.update(evaluate(corpus, cfg, args.out))
    report["eval_s"] = time.time() - t0
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
