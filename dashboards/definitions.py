"""The Grafana dashboards as data: panels, their PromQL, and the two dashboards.

Queries are built from the specs in `serving/metrics.py` (never from typed names), filtered by the
dashboards' template variables `$application` and `$replica`. `dashboards/build.py` turns these
definitions into Grafana's JSON model; `python -m dashboards build` writes the JSON files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from serving import metrics as m

METRIC_PREFIX = m.EXPORT_PREFIX + "llm_"  # every exported name of ours starts with it
VARIABLE_SELECTOR = '{__name__=~"%s.+"}' % METRIC_PREFIX  # the series the variables list labels of
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend (Grafana's `{{label}}` syntax)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A time series (or, with `kind="stat"`, a single number); `unit` is a Grafana unit id."""

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"

    @property
    def panels(self) -> tuple[Panel, ...]:
        return tuple(p for row in self.rows for p in row.panels)


def sel(**matchers: str) -> str:
    """The label selector every query uses: the template variables plus extra regex matchers."""
    parts = ['application=~"$application"', 'replica=~"$replica"']
    parts += [f'{k}=~"{v}"' for k, v in matchers.items()]
    return "{" + ", ".join(parts) + "}"


def _by(labels: tuple[str, ...]) -> str:
    return f"sum by ({', '.join(labels)})" if labels else "sum"


def rate(spec: m.MetricSpec, by: tuple[str, ...] = ("model",), **matchers: str) -> str:
    """Per-second rate of a counter (or of a histogram's observations), summed by `by`."""
    series = spec.series("count") if spec.kind is m.MetricKind.HISTOGRAM else spec.exported
    return f"{_by(by)} (rate({series}{sel(**matchers)}[{RATE}]))"


def quantile(q: float, spec: m.MetricSpec, by: tuple[str, ...] = ("model",)) -> str:
    """The q-quantile of a histogram over the rate window, per `by`."""
    inner = f"rate({spec.series('bucket')}{sel()}[{RATE}])"
    return f"histogram_quantile({q}, sum by (le{''.join(', ' + b for b in by)}) ({inner}))"


def mean(spec: m.MetricSpec, by: tuple[str, ...] = ("model",)) -> str:
    """The mean observation of a histogram over the rate window, per `by`."""
    s = f"rate({spec.series('sum')}{sel()}[{RATE}])"
    c = f"rate({spec.series('count')}{sel()}[{RATE}])"
    return f"{_by(by)} ({s}) / {_by(by)} ({c})"


def gauge(spec: m.MetricSpec, by: tuple[str, ...] = ("model",), **matchers: str) -> str:
    return f"{_by(by)} ({spec.exported}{sel(**matchers)})"


def ratio(num: str, den: str, matching: str = "") -> str:
    """num / den, with no value (not +Inf) where the denominator is zero; `matching` is a vector
    matching modifier such as `ignoring(x) group_left`."""
    return f"{num} / {matching + ' ' if matching else ''}({den} > 0)"


def percentiles(spec: m.MetricSpec, by: tuple[str, ...] = ("model",), qs=(0.5, 0.9, 0.99)) -> tuple[Target, ...]:
    legend = " ".join("{{%s}}" % b for b in by)
    return tuple(Target(quantile(q, spec, by), f"p{round(q * 100)} {legend}".strip()) for q in qs)


def latency_panel(title: str, spec: m.MetricSpec, description: str) -> Panel:
    return Panel(title, description, percentiles(spec), unit="s")


_MODEL = "{{model}}"
_REPLICA = "{{replica}}"

OVERVIEW = Dashboard(
    uid="llm-serving-overview",
    title="LLM serving: overview",
    description="Traffic, latency, throughput, errors and saturation of the LLM serving app.",
    rows=(
        Row("Traffic", (
            Panel("Requests per second", "HTTP responses by route and status code.",
                  (Target(rate(m.HTTP_REQUESTS, ("endpoint", "status_code")), "{{endpoint}} {{status_code}}"),),
                  unit="reqps"),
            Panel("Finished requests per second", "Requests the engines finished, by model and finish reason.",
                  (Target(rate(m.REQUESTS_FINISHED, ("model", "finish_reason")), "{{model}} {{finish_reason}}"),),
                  unit="reqps"),
            Panel("Errors per second", "Errors by OpenAI error type or exception class.",
                  (Target(rate(m.ERRORS, ("error_type",)), "{{error_type}}"),), unit="reqps"),
            Panel("Error ratio", "Share of HTTP responses with a 4xx or 5xx status.",
                  (Target(ratio(rate(m.HTTP_REQUESTS, ("status_code",), status_code="[45].."),
                                rate(m.HTTP_REQUESTS, ()), "ignoring(status_code) group_left()"),
                          "{{status_code}}"),),
                  unit="percentunit"),
        )),
        Row("Latency", (
            latency_panel("Time to first token", m.TTFT, "From arrival to the first output token."),
            latency_panel("Inter-token latency", m.ITL, "Between consecutive output tokens."),
            latency_panel("End-to-end latency", m.E2E, "From arrival to the last token."),
            latency_panel("Queue time", m.QUEUE_TIME, "From arrival to first scheduling."),
        )),
        Row("Throughput and cost", (
            Panel("Tokens per second", "Prompt and generated tokens of finished requests.",
                  (Target(rate(m.GENERATION_TOKENS), f"generated {_MODEL}"),
                   Target(rate(m.PROMPT_TOKENS), f"prompt {_MODEL}")), unit="short"),
            Panel("Cost per million generated tokens",
                  "Configured hourly price of the replicas over their generated-token rate; per replica: "
                  "each replica's own estimate over its last minute.",
                  (Target(ratio(gauge(m.PRICE_PER_HOUR) + " * 1e6 / 3600", rate(m.GENERATION_TOKENS)), _MODEL),
                   Target(gauge(m.COST_PER_MILLION_TOKENS, ("model", "replica"), tokens="generation"),
                          f"{_MODEL} {_REPLICA}")),
                  unit="short"),
        )),
        Row("Saturation", (
            Panel("Running and waiting sequences", "Sequences holding KV blocks, and those waiting for them.",
                  (Target(gauge(m.NUM_RUNNING), f"running {_MODEL}"),
                   Target(gauge(m.NUM_WAITING), f"waiting {_MODEL}"))),
            Panel("KV cache usage", "Share of KV blocks in use, per replica.",
                  (Target(ratio(gauge(m.KV_BLOCKS_USED, ("replica",)),
                                f"{gauge(m.KV_BLOCKS_USED, ('replica',))} + {gauge(m.KV_BLOCKS_FREE, ('replica',))}"),
                          _REPLICA),), unit="percentunit"),
            Panel("Semantic cache hit ratio", "Share of cache lookups that returned an answer.",
                  (Target(ratio(rate(m.CACHE_HITS, ()), rate(m.CACHE_LOOKUPS, ())), "hit ratio"),),
                  unit="percentunit"),
            Panel("Worker group restarts", "Worker groups rebuilt after a failure, over the time range.",
                  (Target(f"{_by(('model',))} (increase({m.WORKER_GROUP_RESTARTS.exported}{sel()}[$__range]))",
                          _MODEL),), kind="stat"),
        )),
    ),
)

ENGINE = Dashboard(
    uid="llm-serving-engine",
    title="LLM serving: engine internals",
    description="Batching, KV cache, speculative decoding and the semantic cache, per replica.",
    rows=(
        Row("Batching", (
            Panel("Batch size", "Sequences per engine step.",
                  percentiles(m.BATCH_SIZE, ("replica",), (0.5, 0.99))
                  + (Target(mean(m.BATCH_SIZE, ("replica",)), f"mean {_REPLICA}"),)),
            Panel("Tokens per step", "Prefill plus decode tokens computed per engine step.",
                  percentiles(m.BATCH_TOKENS, ("replica",), (0.5, 0.99))
                  + (Target(mean(m.BATCH_TOKENS, ("replica",)), f"mean {_REPLICA}"),)),
            Panel("Step time", "Median and p99 of the whole engine step, of the worker group's share (forward, "
                               "sampling, transport) and of rank 0's model forward and sampling: the gaps are "
                               "scheduling and transport overhead.",
                  tuple(Target(quantile(q, spec, ("replica",)), f"{part} p{round(q * 100)} {_REPLICA}")
                        for spec, part in ((m.STEP_TIME, "step"), (m.FORWARD_TIME, "worker group"),
                                           (m.MODEL_TIME, "model"))
                        for q in (0.5, 0.99)), unit="s"),
            Panel("Steps and preemptions per second", "Engine steps, and sequences preempted to free KV blocks.",
                  (Target(rate(m.STEP_TIME, ("replica",)), f"steps {_REPLICA}"),
                   Target(rate(m.PREEMPTIONS, ("replica",)), f"preemptions {_REPLICA}")), unit="ops"),
        )),
        Row("KV cache and queues", (
            Panel("KV blocks", "KV cache blocks in use and free, per replica.",
                  (Target(gauge(m.KV_BLOCKS_USED, ("replica",)), f"used {_REPLICA}"),
                   Target(gauge(m.KV_BLOCKS_FREE, ("replica",)), f"free {_REPLICA}"))),
            Panel("Sequences per replica", "Running and waiting sequences, per replica.",
                  (Target(gauge(m.NUM_RUNNING, ("replica",)), f"running {_REPLICA}"),
                   Target(gauge(m.NUM_WAITING, ("replica",)), f"waiting {_REPLICA}"))),
            Panel("Prefix cache hit rate", "Share of admitted prompt tokens whose KV blocks were already "
                                           "computed (shared, not computed again), per replica.",
                  (Target(ratio(rate(m.PREFIX_HITS, ("replica",)), rate(m.PREFIX_QUERIED, ("replica",))),
                          _REPLICA),), unit="percentunit"),
        )),
        Row("Speculative decoding", (
            Panel("Speculative tokens per second", "Tokens proposed and accepted by the target model, per proposer.",
                  (Target(rate(m.SPEC_PROPOSED, ("proposer",)), "proposed {{proposer}}"),
                   Target(rate(m.SPEC_ACCEPTED, ("proposer",)), "accepted {{proposer}}"))),
            Panel("Acceptance rate", "Accepted over proposed speculative tokens, per proposer.",
                  (Target(ratio(rate(m.SPEC_ACCEPTED, ("proposer",)), rate(m.SPEC_PROPOSED, ("proposer",))),
                          "{{proposer}}"),), unit="percentunit"),
            Panel("Tokens per verifying step", "Mean tokens a sequence emits in a step that verifies its "
                                               "proposals (accepted + 1), per proposer; 1 is no gain.",
                  (Target(ratio(f"({rate(m.SPEC_ACCEPTED, ('proposer',))} + {rate(m.SPEC_VERIFIED, ('proposer',))})",
                                rate(m.SPEC_VERIFIED, ("proposer",))), "{{proposer}}"),)),
        )),
        Row("Semantic cache", (
            Panel("Cache operations per second", "Lookups, hits, misses, inserts, evictions by reason "
                                                 "(capacity or TTL), candidates the verifier refused "
                                                 "by reason, and calls the router gave up or skipped "
                                                 "(deadline, error, breaker open).",
                  tuple(Target(rate(spec, ()), spec.name.removeprefix("llm_cache_"))
                        for spec in (m.CACHE_LOOKUPS, m.CACHE_HITS, m.CACHE_MISSES, m.CACHE_INSERTS))
                  + (Target(rate(m.CACHE_EVICTIONS, ("reason",)), "evictions {{reason}}"),
                     Target(rate(m.CACHE_REJECTIONS, ("reason",)), "refused {{reason}}"),
                     Target(rate(m.CACHE_SKIPS, ("call", "reason")), "router skipped {{call}} ({{reason}})")),
                  unit="ops", width=8),
            Panel("Cache lookup latency", "Embedding, search and verifier of one lookup.",
                  percentiles(m.CACHE_LOOKUP_LATENCY, ()), unit="s", width=8),
            Panel("Cache entries", "Entries held, per cache replica.",
                  (Target(gauge(m.CACHE_ENTRIES, ("replica",)), _REPLICA),), width=4),
            Panel("Cache size", "Bytes held, per cache replica.",
                  (Target(gauge(m.CACHE_BYTES, ("replica",)), _REPLICA),), unit="bytes", width=4),
        )),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (OVERVIEW, ENGINE)


def all_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every target of every dashboard."""
    return [(d.uid, p.title, t.expr) for d in DASHBOARDS for p in d.panels for t in p.targets]


def metric_names(expr: str) -> set[str]:
    """Names of the specs whose series a query reads (exported names it mentions that we define)."""
    found = (m.spec_for_exported(name) for name in re.findall(r"\b%s[a-z0-9_]+" % m.EXPORT_PREFIX, expr))
    return {spec.name for spec in found if spec is not None}


def expand(expr: str, rate_interval: str = "1m", range_: str = "1h", application: str = ".*",
           replica: str = ".*") -> str:
    """A query with Grafana's variables replaced, as Grafana would send it to Prometheus."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
            .replace("$application", application).replace("$replica", replica))
