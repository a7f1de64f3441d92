"""The documented production setup (docs/deploy/): `check --deploy` is clean with its environment, and
the real nginx with its configuration, TLS on a self-signed certificate, in front of the real
`manage.py serve` on 127.0.0.1 high ports: login, an upload, a WebSocket, the 413, HTTPS redirects."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.fakes.pages import make_pdf
from tests.http_probes import MB, PASSWORD, USERNAME, login, multipart_form, running_site
from tests.support import REPO, free_port, manage, port_open, project_env, wait_until

DEPLOY = REPO / "docs" / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OPENSSL = shutil.which("openssl")


def production_env(host: str) -> dict[str, str]:
    """docs/deploy/ocrsite.env, with a generated SECRET_KEY and `host` for the example host name."""
    env = {}
    for line in (DEPLOY / "ocrsite.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip().replace("ocr.example.com", host)
    env["SECRET_KEY"] = secrets.token_urlsafe(50)
    env.pop("OCRSITE_DATA_DIR")  # each test has its own
    return env


def test_check_deploy_is_clean_with_the_documented_production_environment(tmp_path) -> None:
    env = project_env(tmp_path, production_env("ocr.example.com"))
    done = manage(["check", "--deploy", "--fail-level", "DEBUG"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout


def test_check_deploy_names_what_is_missing_without_it(tmp_path) -> None:
    env = project_env(tmp_path, {"DEBUG": "false", "SECRET_KEY": secrets.token_urlsafe(50)})
    done = manage(["check", "--deploy", "--fail-level", "DEBUG"], env)
    assert done.returncode != 0
    assert {"security.W004", "security.W008"} <= set(re.findall(r"security\.W\d+", done.stdout + done.stderr))


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "localhost.crt", folder / "localhost.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def nginx_config(folder: Path, *, app_port: int, http_port: int, https_port: int, cert: Path, key: Path) -> Path:
    """docs/deploy/nginx.conf on test ports and paths, inside a minimal main configuration."""
    site = (DEPLOY / "nginx.conf").read_text()
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{app_port};",
        "/etc/ssl/certs/ocrsite.crt": str(cert),
        "/etc/ssl/private/ocrsite.key": str(key),
        "ocr.example.com": "localhost",
    }
    for old, new in replacements.items():
        assert old in site, f"docs/deploy/nginx.conf no longer has {old!r}"
        site = site.replace(old, new)
    (folder / "ocrsite.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = folder / "nginx.conf"
    main.write_text(
        f"user root;\nworker_processes 1;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n{temp}\n    include {folder / 'ocrsite.conf'};\n}}\n"
    )
    return main


@pytest.fixture
def proxied(tmp_path):
    """nginx (docs/deploy/nginx.conf) in front of `manage.py serve` with docs/deploy/ocrsite.env."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    if OPENSSL is None:
        pytest.skip("openssl is not installed: no certificate for the TLS test")
    proxy_dir = tmp_path / "nginx"
    proxy_dir.mkdir()
    cert, key = self_signed_certificate(proxy_dir)
    http_port, https_port = free_port(), free_port()
    data = tmp_path / "site"
    data.mkdir()
    env = production_env("localhost")
    with running_site(data, env) as site:
        config = nginx_config(proxy_dir, app_port=site.port, http_port=http_port, https_port=https_port, cert=cert, key=key)
        nginx = subprocess.Popen(
            [NGINX, "-p", str(proxy_dir), "-c", str(config), "-g", "daemon off;"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_until(lambda: port_open(https_port) or nginx.poll() is not None, 30, message="nginx to listen")
            assert nginx.poll() is None, nginx.stdout.read().decode()
            context = ssl.create_default_context(cafile=str(cert))
            yield site, http_port, https_port, context
        finally:
            nginx.send_signal(signal.SIGQUIT)  # graceful: workers finish and exit
            try:
                nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()


def test_nginx_in_front_of_serve_login_upload_websocket_413_and_https(proxied, tmp_path) -> None:
    from websockets.sync.client import connect

    site, http_port, https_port, context = proxied
    session = login(https_port, USERNAME, PASSWORD, host="localhost", ssl_context=context)
    status, headers, _ = session.request("GET", "/scans/")
    assert status == 200
    assert headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"

    pdf = make_pdf(tmp_path / "letter.pdf", 2)
    content_type, _, body = multipart_form(session.csrf_token, [("letter.pdf", [pdf.read_bytes()], pdf.stat().st_size)])
    status, headers, _ = session.request(
        "POST", "/scans/upload/", b"".join(body),
        {"Content-Type": content_type, "Referer": f"{session.origin}/scans/upload/"},
    )
    assert status == 302, headers
    scan_id = int(re.fullmatch(r"/scans/(\d+)/", headers["Location"]).group(1))
    assert site.scan_count() == 1

    with connect(
        f"wss://localhost:{https_port}/ws/scans/{scan_id}/", ssl=context, open_timeout=30,
        additional_headers={"Cookie": session.cookie_header, "Origin": session.origin},
    ) as ws:
        snapshot = json.loads(ws.recv(timeout=30))
    assert snapshot["scan"]["id"] == scan_id and snapshot["scan"]["page_count"] == 2

    # 300 MB declared: nginx answers 413 from the request head alone, before any of the body.
    with socket.create_connection(("127.0.0.1", https_port)) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            f"POST /scans/upload/ HTTP/1.1\r\nHost: localhost:{https_port}\r\nCookie: {session.cookie_header}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {300 * MB}\r\n\r\n".encode()
        )
        tls.settimeout(30)
        assert tls.recv(65536).startswith(b"HTTP/1.1 413 ")
    assert site.scan_count() == 1 and site.files("tmp") == []

    # Plain HTTP goes to HTTPS, at the proxy; and the app itself redirects a request that did not
    # come over HTTPS (no X-Forwarded-Proto from the proxy).
    with socket.create_connection(("127.0.0.1", http_port)) as plain:
        plain.sendall(b"GET /scans/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        plain.settimeout(30)
        answer = plain.recv(65536)
    assert answer.startswith(b"HTTP/1.1 301 ") and b"\r\nLocation: https://localhost/scans/\r\n" in answer
    with socket.create_connection(("127.0.0.1", site.port)) as direct:
        direct.sendall(b"GET /scans/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        direct.settimeout(30)
        answer = direct.recv(65536)
    assert answer.startswith(b"HTTP/1.1 301 ") and re.search(rb"(?i)\r\nlocation: https://localhost/scans/\r\n", answer)
