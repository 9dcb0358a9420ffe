"""Prometheus metrics of `adadecode serve` (``GET /metrics``), named like vLLM's where one exists.

Two sources:

- the serving loop's own counters and gauges (``ServingLoop.metrics()``), read at each
  scrape by a collector: requests running / waiting, free cache slots, prompt and
  generation tokens, requests finished by reason, early tokens emitted / accepted /
  rolled back per head layer, per-stage busy time;
- latency histograms the HTTP layer observes as each request's events arrive, from
  the times the loop's thread stamped on them: time to first token, inter-token
  latency (between successive text chunks; one chunk may carry several tokens),
  time per output token, end-to-end latency.

Each server has its own registry (several servers may live in one test process).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

FINISH_REASONS = ("eos", "stop", "length", "cancelled", "failed")

# vLLM's buckets, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict | None]):
        """``snapshot``: the serving loop's ``metrics()``, or None while the model loads."""
        disable_created_metrics()  # no `_created` series (process-wide, as vLLM does)
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("adadecode:time_to_first_token_seconds", "Time to the first output text.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("adadecode:inter_token_latency_seconds",
                             "Time between successive output text chunks of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("adadecode:request_time_per_output_token_seconds",
                              "Per request: (end-to-end - time to first token) / (output tokens - 1).",
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("adadecode:e2e_request_latency_seconds", "Arrival to last output of a request.",
                             buckets=E2E_BUCKETS, registry=r)
        self.rejected = Counter("adadecode:requests_rejected", "Requests refused before decoding, by HTTP status.",
                                ["status"], registry=r)
        self._loop = _LoopCollector(snapshot)
        r.register(self._loop)

    def serving_started(self) -> None:
        """Busy fractions count from now (the serving loop has started)."""
        self._loop.started = time.monotonic()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LoopCollector:
    def __init__(self, snapshot: Callable[[], dict | None]):
        self.snapshot = snapshot
        self.started = time.monotonic()

    def describe(self):
        return []  # names depend on the snapshot: collected at each scrape, never cached

    def collect(self):
        m = self.snapshot()
        healthy = GaugeMetricFamily("adadecode:healthy", "1 when every rank is up and the loop serves, else 0.")
        healthy.add_metric([], 1.0 if m and m["healthy"] else 0.0)
        yield healthy
        if m is None:  # loading
            return
        yield _gauge("adadecode:num_requests_running", "Requests holding a cache slot.", m["num_requests_running"])
        yield _gauge("adadecode:num_requests_waiting", "Requests queued for a cache slot.", m["num_requests_waiting"])
        yield _gauge("adadecode:free_cache_slots", "Cache slots free on every stage.", m["free_slots"])
        yield _gauge("adadecode:cache_slots", "Cache slots per stage (serve.max_num_seqs).", m["max_num_seqs"])
        yield _counter("adadecode:prompt_tokens_total", "Prompt tokens of admitted requests.", m["prompt_tokens_total"])
        yield _counter("adadecode:generation_tokens_total", "Verified output tokens.", m["generation_tokens_total"])
        finished = CounterMetricFamily("adadecode:requests_finished_total", "Requests ended, by reason.",
                                       labels=["finished_reason"])
        for reason in sorted(set(FINISH_REASONS) | set(m["requests_finished"])):
            finished.add_metric([reason], m["requests_finished"].get(reason, 0))
        yield finished
        for key, name, text in (
            ("early_emitted", "adadecode:early_tokens_emitted_total", "Early tokens started, by head layer."),
            ("early_accepted", "adadecode:early_tokens_accepted_total", "Early tokens verified, by head layer."),
            ("early_rejected", "adadecode:early_tokens_rolled_back_total", "Early tokens rolled back, by head layer."),
        ):
            family = CounterMetricFamily(name, text, labels=["layer"])
            for layer, n in sorted(m[key].items()):
                family.add_metric([str(layer)], n)
            yield family
        yield _counter("adadecode:lookup_tokens_emitted_total",
                       "Early tokens that were the context lookup's guesses or drafts (the draft table's included).",
                       m["lookup_emitted"])
        yield _counter("adadecode:lookup_tokens_accepted_total", "The context lookup's guesses and drafts verified.",
                       m["lookup_accepted"])
        busy = CounterMetricFamily("adadecode:stage_busy_seconds_total",
                                   "Seconds each stage spent computing (remote stages: as of their last report).",
                                   labels=["stage"])
        fraction = GaugeMetricFamily("adadecode:stage_busy_fraction",
                                     "Busy seconds per stage over the seconds since serving started.", labels=["stage"])
        elapsed = max(time.monotonic() - self.started, 1e-9)
        for i, seconds in enumerate(m["stage_busy_seconds"]):
            busy.add_metric([str(i)], seconds)
            fraction.add_metric([str(i)], min(1.0, seconds / elapsed))
        yield busy
        yield fraction


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text)
    g.add_metric([], value)
    return g


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, text)
    c.add_metric([], value)
    return c
