"""Prometheus figures of one server (its own registry: no process-wide state), served at
`/metrics` on the HTTP port.

Per request: `hetero_requests_total{protocol,code}`, `hetero_request_duration_seconds
{protocol}`; for generation `hetero_time_to_first_token_seconds`,
`hetero_time_per_output_token_seconds`, `hetero_generated_tokens_total`. Read at each
scrape: `hetero_ready`, `hetero_requests_admitted`, `hetero_queue_limit`, and per partition
of the served plan (from the executor's RunMetrics, runtime/metrics.py)
`hetero_partition_runs_total`, `hetero_partition_mean_ms`, `hetero_partition_predicted_ms`,
`hetero_partition_out_bytes_total` {partition,device,backend}, and
`hetero_transfer_bytes_total{src,dst}`. On Ray the workers also export their own series
through Ray's metrics agent (runtime/metrics.RayExporter).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hetero.interfaces.serving.outcome import Code

if TYPE_CHECKING:  # the server imports this module
    from hetero.interfaces.serving.server import HeteroServer
    from hetero.interfaces.serving.streams import TokenStream

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self, server: HeteroServer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "hetero_requests", "requests answered, by protocol and status", ["protocol", "code"],
            registry=r,
        )  # fmt: skip
        self._duration = Histogram(
            "hetero_request_duration_seconds", "time from a request's arrival to its answer "
            "(a stream: to its last token)", ["protocol"], buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self._ttft = Histogram(
            "hetero_time_to_first_token_seconds", "from admission to the first generated token",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self._tpot = Histogram(
            "hetero_time_per_output_token_seconds", "decode time per token after the first, "
            "one observation per request", buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self._tokens = Counter(
            "hetero_generated_tokens", "tokens generated (per step, whatever the batch)",
            registry=r,
        )  # fmt: skip
        r.register(_Live(server))

    def request(self, protocol: str, code: Code, seconds: float) -> None:
        self._requests.labels(protocol, code.name).inc()
        self._duration.labels(protocol).observe(seconds)

    def generation(self, stream: TokenStream) -> None:
        if stream.first_ms is not None:
            self._ttft.observe(stream.first_ms / 1e3)
        per_token = stream.ms_per_token
        if per_token is not None:
            self._tpot.observe(per_token / 1e3)
        self._tokens.inc(stream.tokens)


class _Live:
    """Figures read from the server and its servable at scrape time."""

    def __init__(self, server: HeteroServer) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []  # read at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        server = self.server
        yield _gauge("hetero_ready", "1 while every partition answers", server.serving)
        yield _gauge("hetero_requests_admitted", "requests running or queued", server.admitted)
        yield _gauge("hetero_queue_limit", "requests admitted at once", server.options.queue_limit)
        metrics = _run_metrics(server.servable)
        if metrics is not None:
            yield from _partitions(metrics)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _run_metrics(servable: Any) -> Any:
    probe = getattr(servable, "run_metrics", None)
    try:
        return probe() if callable(probe) else None
    except Exception:  # figures are best effort; a servable that cannot say has none
        return None


def _partitions(metrics: Any) -> Iterator[Metric]:
    labels = ["partition", "device", "backend"]
    runs = CounterMetricFamily("hetero_partition_runs", "runs of a partition", labels=labels)
    mean = GaugeMetricFamily(
        "hetero_partition_mean_ms", "measured compute time per warm run (ms)", labels=labels
    )
    predicted = GaugeMetricFamily(
        "hetero_partition_predicted_ms", "the plan's predicted time per run (ms)", labels=labels
    )
    out = CounterMetricFamily(
        "hetero_partition_out_bytes", "bytes a partition produced", labels=labels
    )
    figures = metrics.as_dict()
    for spec in metrics.stages:
        row = figures["stages"].get(spec.index)
        key = [f"p{spec.index}", spec.device.name, str(spec.backend)]
        predicted.add_metric(key, float(spec.predicted_ms))
        if row is not None:
            runs.add_metric(key, row["runs"])
            mean.add_metric(key, row["mean_ms"])
            out.add_metric(key, row["out_bytes"])
    transfer = CounterMetricFamily(
        "hetero_transfer_bytes", "bytes moved between partitions", labels=["src", "dst"]
    )
    for name, row in figures["transfers"].items():
        src, dst = name.split("->")
        transfer.add_metric([src, dst], row["bytes"])
    yield from (runs, mean, predicted, out, transfer)
