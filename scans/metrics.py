"""Prometheus metrics of the OCR pipeline.

Counters and the latency histogram count what this process did (each runner's `/metrics` shows its own:
sum them across processes). The queue gauges are read from the database at scrape time, so every process
shows the same values (take one of them, e.g. `max`).
"""

from __future__ import annotations

from django.db.models import Count
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scans.models import Page, Scan

PAGES = Counter("ocrsite_pages", "Pages finished by this process, by outcome and engine.", ["status", "engine"])
PAGE_SECONDS = Histogram(
    "ocrsite_page_seconds",
    "Seconds from a page's claim to its commit (render, every attempt, commit), by engine.",
    ["engine"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
TOKENS = Counter("ocrsite_tokens", "Tokens of the answers received by this process.", ["direction"])


def page_finished(*, engine: str, status: str, seconds: float, input_tokens: int, output_tokens: int) -> None:
    PAGES.labels(status=status, engine=engine).inc()
    PAGE_SECONDS.labels(engine=engine).observe(max(0.0, seconds))
    TOKENS.labels(direction="input").inc(input_tokens)
    TOKENS.labels(direction="output").inc(output_tokens)


class QueueCollector(Collector):
    """Pages and scans by status, from the database (the whole queue, every runner)."""

    def describe(self):
        return self._families()  # registering must not query the database

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("ocrsite_queue_pages", "Pages by status (the whole queue).", labels=["status"]),
            GaugeMetricFamily("ocrsite_scans", "Scans by status.", labels=["status"]),
        ]

    def collect(self):
        pages, scans = self._families()
        counts = dict(Page.objects.values_list("status").annotate(n=Count("id")).order_by().values_list("status", "n"))
        for status in Page.Status.values:
            pages.add_metric([status], counts.get(status, 0))
        yield pages
        counts = dict(Scan.objects.values_list("status").annotate(n=Count("id")).order_by().values_list("status", "n"))
        for status in Scan.Status.values:
            scans.add_metric([status], counts.get(status, 0))
        yield scans


REGISTRY.register(QueueCollector())
