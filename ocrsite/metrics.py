"""The Prometheus endpoint: `/metrics` on the web server and `ocr_worker --metrics-port`.

The apps define their metrics (scans.metrics, vllm_control.metrics) in the default registry; this module
only exposes it. Access: `Authorization: Bearer $OCRSITE_METRICS_TOKEN`; with the variable unset, only
clients on the loopback interface that did not come through a proxy (no X-Forwarded-For) may read it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.conf import settings
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

logger = logging.getLogger(__name__)


def allowed(authorization: str | None, client: str | None, forwarded: bool) -> bool:
    token = settings.OCRSITE_METRICS_TOKEN
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    if forwarded or not client:
        return False
    try:
        return ipaddress.ip_address(client.split("%")[0]).is_loopback
    except ValueError:
        return False


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not allowed(request.headers.get("Authorization"), request.META.get("REMOTE_ADDR"), "X-Forwarded-For" in request.headers):
        response = HttpResponse("Metrics need Authorization: Bearer <OCRSITE_METRICS_TOKEN>.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        if not allowed(self.headers.get("Authorization"), self.client_address[0], "X-Forwarded-For" in self.headers):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="metrics"')
            self.end_headers()
            return
        try:
            body = generate_latest(REGISTRY)
        finally:
            close_old_connections()  # collectors read the database from this thread
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug("metrics: " + format, *args)


def serve_metrics(host: str, port: int) -> ThreadingHTTPServer:
    """Serve `/metrics` on host:port from a daemon thread (for processes without the web server)."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
