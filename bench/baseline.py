"""The static-batching baseline: the Ray Serve deployment a user writes by hand around HF `generate`.

Requests are grouped by `@serve.batch` (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s` for the batch to fill), the prompts are left-padded into one tensor and
`model.generate` runs the whole batch to the longest max_tokens in it: a request that finishes early
still waits for the batch, and requests that arrive meanwhile wait for the next batch. Decoding is
greedy when the batch's first request has temperature 0, else sampled with its temperature and
top_p (one setting per batch, as `generate` takes).

It serves the same OpenAI `POST /v1/completions` (and `GET /v1/models`) as our router, parsed with
the same protocol models. With `stream=true` it sends the whole answer as ONE chunk after its batch
finished (then the usage chunk and `[DONE]`): its TTFT equals its end-to-end latency and it has no
inter-token latency.

    app = build_baseline_app("/path/to/model", max_batch_size=8)
    serve.run(app, name="baseline", route_prefix="/baseline")
"""

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from serving.protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, Usage, unique_id

api = FastAPI(title="static-batching baseline")


@dataclass
class _Item:
    token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float


@dataclass
class _Answer:
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str


def load_static_model(model_path: str, dtype: str = "float32"):
    """(model, tokenizer) as the baseline uses them: the tokenizer pads on the left, EOS as pad."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval(), tokenizer


def static_generate(model, tokenizer, items: list[_Item]) -> list[_Answer]:
    """One static batch: left-padded prompts, `generate` to the longest max_tokens of the batch.

    Each answer keeps its own request's tokens (up to its max_tokens or first EOS), so only useful
    tokens are counted, as the server's usage would."""
    import torch

    enc = tokenizer.pad({"input_ids": [it.token_ids for it in items]}, padding=True, return_tensors="pt")
    first = items[0]
    sampling: dict[str, Any] = {"do_sample": False}
    if first.temperature > 0:
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max(it.max_tokens for it in items),
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    new = out[:, enc["input_ids"].shape[1]:]  # [B, max_new]
    eos = set(_eos_ids(model, tokenizer))
    answers = []
    for row, it in zip(new.tolist(), items):
        row = row[: it.max_tokens]
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        finish = "length" if cut is None else "stop"
        kept = row if cut is None else row[:cut]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        answers.append(_Answer(text, len(it.token_ids), len(row) if cut is None else cut + 1, finish))
    return answers


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class StaticBatchLLM:
    """One replica: an HF causal LM behind `@serve.batch` and an OpenAI completions route."""

    def __init__(self, model_path: str, model_name: Optional[str] = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.05, dtype: str = "float32", num_threads: int = 0):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_name = model_name or Path(model_path).name
        self.model, self.tokenizer = load_static_model(model_path, dtype)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "baseline",
                                            "max_model_len": self.max_model_len}]}

    @api.post("/v1/completions")
    async def completions(self, raw: Request):
        try:
            req = CompletionRequest.model_validate(await raw.json())
        except ValidationError as e:
            return _error(400, str(e.errors()[0].get("msg", e)))
        except ValueError:
            return _error(400, "the body is not valid JSON")
        ids = req.prompt if isinstance(req.prompt, list) else self.tokenizer(req.prompt)["input_ids"]
        max_tokens = req.max_tokens or 16
        if len(ids) + max_tokens > self.max_model_len:
            return _error(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds {self.max_model_len}")
        answer: _Answer = await self.generate_batch(_Item(list(ids), max_tokens, req.temperature, req.top_p))
        usage = Usage(prompt_tokens=answer.num_prompt_tokens, completion_tokens=answer.num_output_tokens,
                      total_tokens=answer.num_prompt_tokens + answer.num_output_tokens)
        if not req.stream:
            choice = CompletionChoice(text=answer.text, finish_reason=answer.finish_reason)
            return CompletionResponse(model=self.model_name, choices=[choice], usage=usage).model_dump()
        return StreamingResponse(self._sse(answer, usage, req.include_usage), media_type="text/event-stream")

    async def _sse(self, answer: _Answer, usage: Usage, include_usage: bool):
        rid, created = unique_id("cmpl"), int(time.time())
        chunk = CompletionChunk(id=rid, created=created, model=self.model_name,
                                choices=[CompletionChoice(text=answer.text, finish_reason=answer.finish_reason)])
        yield f"data: {chunk.model_dump_json()}\n\n"
        if include_usage:
            last = CompletionChunk(id=rid, created=created, model=self.model_name, choices=[], usage=usage)
            yield f"data: {last.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[_Item]) -> list[_Answer]:
        # NOTE: generate runs in a thread so the replica keeps accepting requests for the next batch.
        return await asyncio.to_thread(self._generate, items)

    def _generate(self, items: list[_Item]) -> list[_Answer]:
        return static_generate(self.model, self.tokenizer, items)


def build_baseline_app(model_path: str, model_name: Optional[str] = None, max_batch_size: int = 8,
                       batch_wait_timeout_s: float = 0.05, dtype: str = "float32", num_threads: int = 0,
                       num_cpus: float = 1.0) -> serve.Application:
    """The baseline as a Serve application (one replica reserving `num_cpus` Ray CPUs)."""
    return StaticBatchLLM.options(ray_actor_options={"num_cpus": num_cpus}).bind(
        model_path, model_name, max_batch_size, batch_wait_timeout_s, dtype, num_threads)
