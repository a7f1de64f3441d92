"""Prometheus metrics of the model servers: each endpoint's state and restarts (what this process knows
of them, without probing at scrape time) and the requests it has in flight to each."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_control import runtime
from vllm_control.router import router
from vllm_control.status import ServerState

IN_FLIGHT = Gauge("ocrsite_endpoint_requests_in_flight", "Requests this process has out, by endpoint.", ["endpoint"])


def endpoint_label(base_url: str) -> str:
    """The endpoint's URL without credentials (a label is visible to whoever reads the metrics)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class EndpointCollector(Collector):
    def describe(self):
        return self._families()  # registering must not ask for statuses

    def _families(self):
        state = GaugeMetricFamily(
            "ocrsite_endpoint_state", "1 for the endpoint's current state, 0 for the others.", labels=["endpoint", "mode", "state"]
        )
        restarts = GaugeMetricFamily(
            "ocrsite_endpoint_restarts", "Restarts of a Local server since it last ran stably.", labels=["endpoint"]
        )
        return [state, restarts]

    def collect(self):
        state, restarts = self._families()
        seen = set()
        for status in runtime.known_statuses():
            endpoint = endpoint_label(status.base_url)
            seen.add(endpoint)
            for name in ServerState:
                state.add_metric([endpoint, status.mode, str(name)], 1 if status.state == name else 0)
            restarts.add_metric([endpoint], status.restart_count)
        for routed in router().statuses():  # several model servers: each as this process's router sees it
            endpoint = endpoint_label(routed.base_url)
            if endpoint in seen:
                continue
            seen.add(endpoint)
            for name in ServerState:
                state.add_metric([endpoint, routed.kind, str(name)], 1 if routed.state == name else 0)
        yield state
        yield restarts


REGISTRY.register(EndpointCollector())
