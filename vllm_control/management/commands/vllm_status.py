"""`manage.py vllm_status [--json]`: the configured model server's status; exit 0 only when it is ready."""

from __future__ import annotations

import asyncio
import json
import sys

from django.core.management.base import BaseCommand

from vllm_control import runtime
from vllm_control.config import resolve_config
from vllm_control.events import status_payload
from vllm_control.status import ServerState


class Command(BaseCommand):
    help = "Print the configured model server's status (exit code 0 only when it is ready)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="One JSON object (the settings page's status shape)")

    def handle(self, *args, **options) -> None:
        config = resolve_config()
        status = asyncio.run(runtime.current_status(config, fresh=True))
        # The operator at the console has the database and its secrets: the detailed variant, URL
        # credentials hidden all the same (terminals get logged and pasted).
        shown = status_payload(status, detailed=True)
        if options["json"]:
            self.stdout.write(json.dumps(shown))
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
        if status.state != ServerState.READY:
            sys.exit(1)
