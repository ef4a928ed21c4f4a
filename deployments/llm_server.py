"""The LLM server deployment: one replica = one engine, built by `parallel.build.build_engine`.

The replica tokenizes, admits and streams; the engine steps in a process of its own next to it
(`parallel.engine_process.EngineProcess`, rank 0, the default) or, with `engine_process=false`,
in a thread of the replica (then the replica is rank 0). The placement group has one bundle per
rank, packed on one node (`deployment_options`): bundle 0 holds the replica and rank 0, bundles
1..N-1 the other ranks' actors, so Serve's autoscaler asks for whole TP groups. A replica that Serve
stops (a redeploy, a scale-down) drains before its engine stops (docs/configuration.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import statistics
import uuid
from typing import AsyncIterator, Optional, Union

from ray import serve

from deployments.autoscaling import ReplicaLoad, autoscaling_options
from serving.config import LLMConfig
from serving.heap import replica_env_vars, start_heap_trimmer
from serving.protocol import ChatCompletionRequest, CompletionRequest, GenerationOutput

logger = logging.getLogger("ray.serve")


class LLMServer:
    def __init__(self, config: LLMConfig):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        start_heap_trimmer()  # serving/heap.py: the soak's memory bar
        from parallel.build import build_engine, resolve_device
        from serving.async_engine import AsyncEngine
        from serving.model_loader import encoder, load_model_info, load_tokenizer

        self.config = config
        self.device = device = resolve_device(config)
        self.core = None  # the engine's own process (an actor handle), when it has one
        if config.parallel.engine_process:
            self.info = load_model_info(config.model)
            self.tokenizer = load_tokenizer(self.info.path)
            engine = self._start_engine_process()
        else:
            engine = build_engine(config, device)
            self.info, self.tokenizer, self.num_kv_blocks = engine.info, engine.tokenizer, engine.blocks.num_blocks
        self._encode = encoder(self.tokenizer)
        self.telemetry = _engine_telemetry(self.info.name, config.serve.price_per_hour)
        self.engine = AsyncEngine(engine, config.scheduler.max_waiting_requests, on_step=self._on_step,
                                  stream_interval_s=config.scheduler.stream_interval_s,
                                  max_stream_items_per_s=config.scheduler.max_stream_items_per_s,
                                  step_timeout_s=config.parallel.step_timeout_s,
                                  restart=self._restart_engine_process if self.core is not None else None)
        self.num_requests = 0
        self._grammars = None  # response_format schemas compiled for this tokenizer (_check_grammar)
        self.load = ReplicaLoad()  # what record_autoscaling_stats() reports
        self.recent_steps: collections.deque = collections.deque(maxlen=256)
        self.last_stats = None  # the newest StepStats the step thread handed over
        self.spec_totals: dict[str, list[int]] = {}  # proposer -> [proposed, accepted, verified rows]
        self.prefix_totals = [0, 0]  # prefix cache: tokens queried, of them hit
        self._stop_watch: Optional[asyncio.Task] = None  # drains the replica once Serve stops it
        logger.info("LLMServer ready: model=%s tp=%d kv_blocks=%d executor=%s engine_process=%s", self.info.name,
                    config.parallel.tensor_parallel_size, self.num_kv_blocks, config.parallel.executor,
                    config.parallel.engine_process)

    def _start_engine_process(self):
        """A new engine process (rank 0; it starts the other ranks) in bundle 0; its client."""
        from parallel.engine_process import start_engine_process
        from parallel.worker_group import worker_bundles

        client, self.num_kv_blocks = start_engine_process(
            self.config, self.device, worker_bundles(self.config, self.device)[0].get("GPU", 0))
        self.core = client.core
        return client

    async def _restart_engine_process(self):
        """After a fault (a rank or the engine's process died): kill what is left of the old group
        (its rank actors go with it), then start and load a new one in the same placement group."""
        import ray

        ray.kill(self.core)
        return await asyncio.get_running_loop().run_in_executor(None, self._start_engine_process)

    @classmethod
    def deployment_options(cls, config: LLMConfig, device: str) -> dict:
        """Serve options for this model: name, replicas or autoscaling, and the placement-group
        bundles: bundle 0 holds the replica and rank 0, then one per further rank, then the draft worker's."""
        from parallel.worker_group import worker_bundles

        serve_opts = config.serve
        bundles = worker_bundles(config, device)
        if config.speculative.uses_draft:  # the draft worker's, last (parallel/draft_worker.py)
            bundles.append({"CPU": config.speculative.num_cpus_draft})
        # NOTE: the replica takes bundle 0's CPU; its GPU goes to rank 0 (the engine's process, if any)
        replica_gpus = 0 if config.parallel.engine_process else bundles[0].get("GPU", 0)
        opts: dict = {
            "max_ongoing_requests": serve_opts.max_ongoing_requests,
            "max_queued_requests": serve_opts.max_queued_requests,
            "health_check_period_s": serve_opts.health_check_period_s,
            "health_check_timeout_s": max(30.0, serve_opts.health_check_period_s * 3),
            "graceful_shutdown_timeout_s": serve_opts.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": serve_opts.graceful_shutdown_wait_loop_s,
            "ray_actor_options": {"num_cpus": bundles[0]["CPU"], "num_gpus": replica_gpus,
                                  "runtime_env": {"env_vars": replica_env_vars()}},  # serving/heap.py
            "placement_group_bundles": bundles,
            "placement_group_strategy": "STRICT_PACK",
        }
        if serve_opts.num_replicas is not None:
            opts["num_replicas"] = serve_opts.num_replicas
        else:
            opts["autoscaling_config"] = autoscaling_options(serve_opts.autoscaling)
        return opts

    # ---- request path ---------------------------------------------------------------------------

    def tokenize(self, request: Union[CompletionRequest, ChatCompletionRequest]) -> list[int]:
        if isinstance(request, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text} for m in request.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self._encode(text, False)
        if isinstance(request.prompt, list):
            return list(request.prompt)
        return self._encode(request.prompt, True)

    def sampling_params(self, request, num_prompt_tokens: int):
        from serving.sampling import request_sampling_params

        room = self.info.max_model_len - num_prompt_tokens
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(self.config.scheduler.default_max_tokens, room), request.min_tokens)
        return request_sampling_params(request, max_tokens, self.info.eos_token_ids)

    async def generate(self, request: Union[CompletionRequest, ChatCompletionRequest],
                       request_id: str = "") -> AsyncIterator[GenerationOutput]:
        """Streams engine outputs for one request; the last has `finished=True`. Call with stream=True."""
        request_id = request_id or uuid.uuid4().hex
        if self._stop_watch is None:  # NOTE: here, not in __init__: an event loop runs now
            self._stop_watch = asyncio.get_running_loop().create_task(self._drain_when_stopped())
        self.num_requests += 1
        ids = self.tokenize(request)
        params = self.sampling_params(request, len(ids))
        if params.json_spec is not None:
            self._check_grammar(params.json_spec)
        self.load.arrived(request_id, len(ids))
        first = True
        try:
            async for out in self.engine.generate(request_id, ids, params):
                if first:
                    self.load.first_token(request_id)
                    first = False
                yield out
        finally:
            self.load.ended(request_id)

    async def generate_choices(self, request: Union[CompletionRequest, ChatCompletionRequest],
                               request_id: str = "") -> AsyncIterator[tuple[int, GenerationOutput]]:
        """n > 1: every choice is a sequence of this replica's engine (choice i of a seeded request
        with seed + i: reproducible, and the choices differ), so they share the prompt's KV blocks
        (serving/block_manager.py). Streams (choice index, output) as they come; a choice's error
        ends the whole stream. Call with stream=True."""
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, choice) -> None:
            try:
                async for out in self.generate(choice, f"{request_id}-{index}"):
                    queue.put_nowait((index, out, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((index, None, e))

        seed = request.seed
        tasks = [asyncio.create_task(pump(i, request.model_copy(update={"n": 1, "seed": None if seed is None else seed + i})))
                 for i in range(request.n)]
        try:
            left = request.n
            while left:
                index, out, error = await queue.get()
                if error is not None:
                    raise error
                yield index, out
                left -= out.finished
        finally:
            for task in tasks:  # NOTE: cancelling a choice's stream aborts its sequence
                task.cancel()

    async def _drain_when_stopped(self) -> None:
        """Once Serve stops this replica: the requests in flight finish for up to the drain timeout,
        the rest end with 503. Serve then calls `__del__`, which stops the engine."""
        from deployments.stopping import wait_until_stopping
        from serving.errors import UnavailableError

        opts = self.config.serve
        await wait_until_stopping(opts.graceful_shutdown_wait_loop_s, lambda: self.engine.num_streams > 0)
        logger.info("replica stopping: draining %d requests for up to %.0f s", self.engine.num_streams,
                    opts.drain_timeout_s)
        ended = await self.engine.drain(opts.drain_timeout_s, UnavailableError(
            f"this model server is shutting down (a redeploy or a scale-down) and the request did not finish "
            f"within {opts.drain_timeout_s:.0f} s; retry it", code="shutting_down", retry_after=1.0))
        logger.info("replica stopping: drained; %d requests ended unfinished", ended)

    def _check_grammar(self, spec) -> None:
        """A 400 now for a schema that does not compile against this model's tokenizer: on rank 0
        the same error would fail the whole step (and every request in it)."""
        from serving.errors import InvalidRequestError
        from serving.structured.grammar import GrammarCompiler

        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.info.vocab_size, self.info.eos_token_ids)
        try:
            self._grammars.matcher(spec)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="response_format") from None

    async def tokenize_only(self, request) -> dict:
        """vLLM's /tokenize: a prompt's (or a conversation's, templated) token ids."""
        from serving.protocol import TokenizeChatRequest, TokenizeResponse

        if isinstance(request, TokenizeChatRequest):
            messages = [{"role": m.role, "content": m.text} for m in request.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=request.add_generation_prompt,
                                                      tokenize=False)
        else:
            text = request.prompt
        ids = self._encode(text, request.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.info.max_model_len, tokens=ids,
                                token_strs=strs).model_dump()

    async def detokenize(self, token_ids: list[int], param: str = "tokens") -> str:
        """vLLM's /detokenize (and the text of a token-id prompt for `echo`); an error names `param`."""
        from serving.errors import InvalidRequestError

        bad = [t for t in token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary", param=param)
        return self.tokenizer.decode(token_ids)

    async def model_card(self) -> dict:
        return {"id": self.info.name, "max_model_len": self.info.max_model_len}

    async def stats(self) -> dict:
        """Counters of this replica (requests that reached the engine, KV blocks in use)."""
        steps = list(self.recent_steps)
        last = self.last_stats
        num_blocks = self.num_kv_blocks
        out = {"num_requests": self.num_requests, "max_num_seqs": self.config.scheduler.max_num_seqs,
               "num_kv_blocks": num_blocks,
               "num_kv_blocks_free": last.num_kv_blocks_free if last else num_blocks,
               "num_pending": self.engine.num_pending, "prefix_cache_queried_tokens": self.prefix_totals[0],
               "prefix_cache_hit_tokens": self.prefix_totals[1]}
        for proposer, (proposed, accepted, rows) in self.spec_totals.items():
            out[f"spec_{proposer}"] = {"proposed": proposed, "accepted": accepted, "verified_rows": rows}
        if steps:  # medians over the last (up to) 256 steps, in seconds
            for name in ("step_time_s", "forward_time_s", "model_time_s", "num_seqs"):
                out[f"recent_{name}_p50"] = statistics.median(getattr(s, name) for s in steps)
        return out

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every few seconds; the LLM policy (deployments/autoscaling.py) reads it."""
        last = self.last_stats
        return self.load.report(num_waiting=self.engine.num_pending,
                                num_running=last.num_running if last else 0,
                                num_kv_blocks_used=last.num_kv_blocks_used if last else 0,
                                num_kv_blocks=self.num_kv_blocks)

    async def placement(self) -> dict:
        """Where this replica and its engine's process (None without one) run: pid, node, placement group."""
        from parallel.engine_process import where

        return {"replica": where(), "engine_process": await self.core.where.remote() if self.core is not None else None}

    # ---- health and telemetry -------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self.engine.error is not None:
            raise RuntimeError(f"engine failed: {self.engine.error}")
        if self.engine.rebuilding:
            return  # NOTE: healthy while a new engine process loads (bounded by its restart timeout)
        if self.core is not None:
            try:
                await self.core.check_health.remote()
            except Exception as e:  # a rank (or the engine's process) died while idle: rebuild now
                self.engine.core_failed(e)
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.engine.check_health)

    def _on_step(self, stats, finished) -> None:
        self.last_stats = stats
        self.prefix_totals[0] += stats.num_prefix_queried_tokens
        self.prefix_totals[1] += stats.num_prefix_hit_tokens
        for proposer, counts in stats.spec_by_proposer.items():
            total = self.spec_totals.setdefault(proposer, [0, 0, 0])
            for i, c in enumerate(counts):
                total[i] += c
        if stats.num_seqs:
            self.recent_steps.append(stats)
        self.telemetry.record_step(stats)
        for request in finished:
            self.telemetry.record_request(request)

    def __del__(self):
        try:
            if self._stop_watch is not None:
                self._stop_watch.cancel()
            self.engine.shutdown()
            if self.core is not None:
                import ray

                ray.kill(self.core)  # NOTE: its rank actors are its own: they go with it
            else:
                self.engine.engine.shutdown()
        except Exception:
            pass


def _engine_telemetry(model_id: str, price_per_hour: float):
    from deployments.telemetry import EngineTelemetry

    return EngineTelemetry(model_id, price_per_hour=price_per_hour)


LLMServerDeployment = serve.deployment(LLMServer, name="LLMServer")
