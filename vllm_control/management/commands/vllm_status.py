"""`manage.py vllm_status [--json]`: the configured model server's status, and with several model servers
each endpoint's; exit 0 only when it is ready (with several: when at least one endpoint is)."""

from __future__ import annotations

import asyncio
import json
import sys

from django.core.management.base import BaseCommand

from vllm_control import runtime
from vllm_control.config import EffectiveConfig, resolve_config
from vllm_control.events import endpoint_payload, status_payload
from vllm_control.status import EndpointStatus, ServerState, ServerStatus


async def _statuses(config: EffectiveConfig) -> tuple[ServerStatus, list[EndpointStatus]]:
    status = await runtime.current_status(config, fresh=True)
    endpoints = await runtime.endpoint_statuses(config) if len(config.endpoints) > 1 else []
    return status, endpoints


class Command(BaseCommand):
    help = "Print the configured model server's status (exit code 0 only when it is ready)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="One JSON object (the settings page's status shape)")

    def handle(self, *args, **options) -> None:
        config = resolve_config()
        status, endpoints = asyncio.run(_statuses(config))
        # The operator at the console has the database and its secrets: the detailed variant, URL
        # credentials hidden all the same (terminals get logged and pasted).
        shown = status_payload(status, detailed=True)
        shown_endpoints = [endpoint_payload(endpoint) for endpoint in endpoints]
        if options["json"]:
            self.stdout.write(json.dumps({**shown, "endpoints": shown_endpoints}))
        else:
            state = f"{status.state} (idle)" if status.idle else str(status.state)
            self.stdout.write(f"mode: {status.mode}\nstate: {state}\nmodel: {status.model}")
            phase = f"{status.phase_label} (for {status.phase_elapsed_s:.0f} s)" if status.phase_label else None
            for label, value in (
                ("start-up phase", phase),
                ("base URL", shown["base_url"]),
                ("served models", ", ".join(status.served_models)),
                ("server version", status.server_version),
                ("latency", f"{status.latency_ms:g} ms" if status.latency_ms is not None else None),
                ("last health check", status.last_health_check),
                ("error", shown["last_error"]),
            ):
                if value:
                    self.stdout.write(f"{label}: {value}")
            for endpoint in shown_endpoints:
                error = f" — {endpoint['last_error']}" if endpoint["last_error"] else ""
                self.stdout.write(
                    f"endpoint {endpoint['name']} ({endpoint['kind']}, capacity {endpoint['capacity']}): {endpoint['state']}{error}"
                )
        ready = status.state == ServerState.READY or any(e.state == ServerState.READY for e in endpoints)
        if not ready:
            sys.exit(1)
