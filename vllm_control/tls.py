"""One TLS context for every HTTP client ocrsite opens to a model server (probes, OCR requests).

httpx builds a new context for each client, loading the whole CA bundle: 30-350 ms of CPU on the event
loop per client (measured on 2 busy cores), which froze live events for that long at every health check
and every scan's start. One context, built once, serves every client (an `ssl.SSLContext` is shareable).
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verification (its CA bundle, or SSL_CERT_FILE / SSL_CERT_DIR), built once."""
    return httpx.create_ssl_context()
