"""Tests of the vLLM test double (tests/fakes/vllm) and of the page-marker inputs (tests/fakes/pages.py)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageOps

from tests.fakes import pages
from tests.support import FAKE_VLLM, free_port, pid_alive, port_open, wait_until
from vllm_control.processes import group_members

MODEL = "Qwen/Qwen3-VL-2B-Instruct"
OLMOCR_PROMPT = (
    "Attached is one page of a document that you must process. Just return the plain text representation of "
    "this document as if you were reading it naturally. Return your output as markdown, with a front matter "
    "section on top specifying values for the primary_language, is_rotation_valid, rotation_correction, "
    "is_table, and is_diagram parameters."
)


@dataclass
class Double:
    proc: subprocess.Popen
    port: int
    out: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


@pytest.fixture
def start_double(tmp_path):
    started: list[Double] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, ready: bool = True, port: int | None = None,
              api_key: str | None = None) -> Double:
        port = port or free_port()
        out = tmp_path / f"vllm-{port}-{len(started)}.log"
        args = [str(FAKE_VLLM), "serve", MODEL, "--host", "127.0.0.1", "--port", str(port), *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        full_env = {**os.environ, "FAKE_VLLM_STARTUP_DELAY": "0.2", "FAKE_VLLM_MAX_LIFETIME": "60",
                    "FAKE_VLLM_ORPHAN_LINGER": "30", **(env or {})}
        with open(out, "wb") as sink:
            proc = subprocess.Popen(args, env=full_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        double = Double(proc, port, out)
        started.append(double)
        if ready:
            wait_until(lambda: _health(double) == 200 or proc.poll() is not None, 15, message="double ready")
            assert proc.poll() is None, double.output()
        return double

    yield start
    for double in started:
        double.kill()


def _health(double: Double) -> int | None:
    try:
        return httpx.get(f"{double.url}/health", timeout=1).status_code
    except httpx.HTTPError:
        return None


def data_uri(image: Image.Image, fmt: str = "PNG", **params) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat_body(uri: str | None, prompt: str = "Transcribe this page as Markdown.", model: str = MODEL, **extra) -> dict:
    content: list[dict] = [{"type": "text", "text": prompt}]
    if uri is not None:
        content.append({"type": "image_url", "image_url": {"url": uri}})
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def render_pdf_page(path: Path, index: int, longest: int = 1288) -> Image.Image:
    pdf = pdfium.PdfDocument(path)
    try:
        page = pdf[index]
        width, height = page.get_size()
        return page.render(scale=longest / max(width, height)).to_pil()
    finally:
        pdf.close()


# ------------------------------------------------------------------------------------ CLI and HTTP basics


def test_version_flag():
    result = subprocess.run([str(FAKE_VLLM), "--version"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert result.stdout.strip() == "0.11.0"


def test_refuses_connections_until_ready_then_serves_the_api(start_double):
    double = start_double("--served-model-name", "ocr", "ocr-alias", "--gpu-memory-utilization", "0.8",
                          "--max-model-len", "16384", "--trust-remote-code", "--tensor-parallel-size", "1",
                          env={"FAKE_VLLM_STARTUP_DELAY": "1.0"}, ready=False, api_key="secret")
    wait_until(lambda: "EngineCore" in double.output(), 10, message="engine core started")
    assert double.proc.poll() is None
    assert not port_open(double.port)
    wait_until(lambda: _health(double) == 200, 10, message="health")
    assert "Application startup complete." in double.output()
    assert f"Starting vLLM API server 0 on http://127.0.0.1:{double.port}" in double.output()

    assert httpx.get(f"{double.url}/version").json() == {"version": "0.11.0"}
    unauthorized = httpx.get(f"{double.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert (unauthorized.status_code, unauthorized.json()) == (401, {"error": "Unauthorized"})
    assert httpx.get(f"{double.url}/v1/models").status_code == 401
    models = httpx.get(f"{double.url}/v1/models", headers={"Authorization": "Bearer secret"}).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["ocr", "ocr-alias"]
    assert models["data"][0]["max_model_len"] == 16384


def test_chat_validation_errors(start_double):
    double = start_double()
    image_uri = data_uri(pages.page_image(3, (400, 520)))
    with httpx.Client(base_url=double.url) as client:
        wrong_model = client.post("/v1/chat/completions", json=chat_body(image_uri, model="other/model"))
        assert wrong_model.status_code == 404
        assert wrong_model.json()["error"] == {
            "message": "The model `other/model` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}

        not_image = "data:image/png;base64," + base64.b64encode(b"%PDF-1.4 definitely not a png").decode()
        bad = client.post("/v1/chat/completions", json=chat_body(not_image))
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "BadRequestError"

        bad_b64 = client.post("/v1/chat/completions", json=chat_body("data:image/png;base64,@@@"))
        assert bad_b64.status_code == 400

        png = base64.b64decode(image_uri.split(",", 1)[1])
        truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
        assert client.post("/v1/chat/completions", json=chat_body(truncated)).status_code == 400

        no_messages = client.post("/v1/chat/completions", json={"model": MODEL})
        assert no_messages.status_code == 400

        text_only = client.post("/v1/chat/completions", json=chat_body(None))
        assert text_only.status_code == 200
        assert "PAGE ?" in text_only.json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------------ answers from the image


@pytest.mark.parametrize(("fmt", "decode"), [("PNG", "fast"), ("JPEG", "fast"), ("PNG", "full")])
def test_page_marker_round_trip_through_a_rendered_pdf(start_double, tmp_path, fmt, decode):
    state_dir = tmp_path / "state"
    double = start_double(env={"FAKE_VLLM_STATE_DIR": str(state_dir), "FAKE_VLLM_DECODE": decode})
    pdf = pages.make_pdf(tmp_path / "doc.pdf", 3)
    with httpx.Client(base_url=double.url, timeout=10) as client:
        for index in range(3):
            image = render_pdf_page(pdf, index)
            assert max(image.size) == 1288
            params = {"quality": 85} if fmt == "JPEG" else {}
            response = client.post("/v1/chat/completions",
                                   json=chat_body(data_uri(image, fmt, **params), temperature=0.1 * index, max_tokens=4000))
            assert response.status_code == 200
            payload = response.json()
            assert payload["object"] == "chat.completion"
            assert payload["model"] == MODEL
            choice = payload["choices"][0]
            assert choice["finish_reason"] == "stop"
            assert choice["message"]["role"] == "assistant"
            assert f"PAGE {index + 1}\n" in choice["message"]["content"]
            usage = payload["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    entries = [json.loads(line) for line in (state_dir / "requests.jsonl").read_text().splitlines()]
    assert [(e["page_marker"], e["model"], e["temperature"]) for e in entries] == [
        (1, MODEL, 0.0), (2, MODEL, 0.1), (3, MODEL, 0.2)]


def test_olmocr_prompt_and_rotation_correction(start_double):
    double = start_double(env={"FAKE_VLLM_ROTATED_PAGES": "2"})
    upright = pages.page_image(2, (600, 780))
    with httpx.Client(base_url=double.url, timeout=10) as client:
        def ask(image: Image.Image, page_prompt: str = OLMOCR_PROMPT) -> str:
            response = client.post("/v1/chat/completions", json=chat_body(data_uri(image), page_prompt))
            assert response.status_code == 200
            return response.json()["choices"][0]["message"]["content"]

        first = ask(upright)
        assert first.startswith("---\nprimary_language: en\nis_rotation_valid: False\nrotation_correction: 90\n")
        # olmOCR applies the correction with Image.transpose(ROTATE_90) and asks again.
        second = ask(upright.transpose(Image.Transpose.ROTATE_90))
        assert "is_rotation_valid: True\nrotation_correction: 0\n" in second
        assert "PAGE 2" in second

        normal = ask(pages.page_image(5, (600, 780)))
        assert "is_rotation_valid: True" in normal and "is_diagram: False\n---\n" in normal and "PAGE 5" in normal
        sideways = ask(pages.page_image(6, (600, 780)).transpose(Image.Transpose.ROTATE_270))
        assert "is_rotation_valid: False\nrotation_correction: 90" in sideways
        assert "---" not in ask(pages.page_image(6, (600, 780)), "Transcribe this page.")


def test_max_tokens_truncates_with_finish_reason_length(start_double):
    double = start_double()
    response = httpx.post(f"{double.url}/v1/chat/completions",
                          json=chat_body(data_uri(pages.page_image(9, (400, 520))), max_tokens=3))
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] <= 3


def test_scripted_outcomes_per_page(start_double, tmp_path):
    script = {"1": ["500", "429", "length", "garbage", "ok"]}
    double = start_double(env={"FAKE_VLLM_SCRIPT": json.dumps(script), "FAKE_VLLM_RETRY_AFTER": "2",
                               "FAKE_VLLM_STATE_DIR": str(tmp_path)})
    body = chat_body(data_uri(pages.page_image(1, (400, 520))))
    with httpx.Client(base_url=double.url, timeout=10) as client:
        server_error = client.post("/v1/chat/completions", json=body)
        assert server_error.status_code == 500
        assert server_error.json()["error"]["code"] == 500
        limited = client.post("/v1/chat/completions", json=body)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "2"
        assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["finish_reason"] == "length"
        garbage = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert "PAGE" not in garbage
        assert "PAGE 1" in client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        other = client.post("/v1/chat/completions", json=chat_body(data_uri(pages.page_image(2, (400, 520)))))
        assert other.status_code == 200
    outcomes = [json.loads(line)["outcome"] for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert outcomes == ["500", "429", "length", "garbage", "ok", "ok"]


def test_error_rate_one_always_answers_500(start_double):
    double = start_double(env={"FAKE_VLLM_ERROR_RATE": "1"})
    response = httpx.post(f"{double.url}/v1/chat/completions", json=chat_body(data_uri(pages.page_image(1, (400, 520)))))
    assert response.status_code == 500


def test_320_simultaneous_connections_with_capacity_and_latency(start_double):
    double = start_double(env={"FAKE_VLLM_LATENCY": "0.2", "FAKE_VLLM_CAPACITY": "100", "FAKE_VLLM_ACCESS_LOG": "0"})
    bodies = {n: json.dumps(chat_body(data_uri(pages.page_image(n, (300, 390))))) for n in range(1, 11)}
    count = 320
    all_connected = threading.Barrier(count, timeout=30)

    def one(i: int) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", double.port, timeout=30)
        try:
            connection.connect()
            all_connected.wait()  # every connection is open before any request is sent
            connection.request("POST", "/v1/chat/completions", body=bodies[i % 10 + 1],
                               headers={"content-type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            return json.loads(response.read())["choices"][0]["message"]["content"]
        finally:
            connection.close()

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    assert all(f"PAGE {i % 10 + 1}\n" in answer for i, answer in enumerate(answers))


async def test_async_httpx_client_with_keep_alive(start_double):
    double = start_double(env={"FAKE_VLLM_ACCESS_LOG": "0"})
    uris = {n: data_uri(pages.page_image(n, (300, 390))) for n in range(1, 6)}
    async with httpx.AsyncClient(base_url=double.url, timeout=30, limits=httpx.Limits(max_connections=8)) as client:
        async def one(i: int) -> str:
            response = await client.post("/v1/chat/completions", json=chat_body(uris[i % 5 + 1]))
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        answers = await asyncio.gather(*(one(i) for i in range(40)))
    assert all(f"PAGE {i % 5 + 1}\n" in answer for i, answer in enumerate(answers))


# ------------------------------------------------------------------------------------ process behaviour


def _children(double: Double) -> list[int]:
    return [pid for pid in group_members(double.proc.pid) if pid != double.proc.pid]


def _names(pids: list[int]) -> list[str]:
    return sorted(psutil.Process(pid).name() for pid in pids)


def _engine_core(double: Double) -> int:
    (engine,) = [pid for pid in _children(double) if psutil.Process(pid).name() == "VLLM::EngineCore"]
    return engine


def test_engine_core_and_workers_rename_themselves_like_vllms(start_double, monkeypatch):
    monkeypatch.setenv("SET_BY_THE_PARENT", "visible")
    double = start_double("--tensor-parallel-size", "2")  # ready: the EngineCore and its workers are up
    children = _children(double)
    assert _names(children) == ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    engine = psutil.Process(_engine_core(double))
    assert engine.ppid() == double.proc.pid
    assert {child.ppid() for child in map(psutil.Process, children) if child != engine} == {engine.pid}
    # setproctitle overwrote their command line and environment block, as it does in vLLM's processes.
    assert psutil.Process(double.proc.pid).environ()["SET_BY_THE_PARENT"] == "visible"
    for pid in children:
        assert "SET_BY_THE_PARENT" not in psutil.Process(pid).environ()
        assert psutil.Process(pid).cmdline()[0].startswith("VLLM::")
    assert _names(_children(start_double())) == ["VLLM::EngineCore", "VLLM::Worker"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_and_its_engine_core(start_double, signum):
    double = start_double()
    children = _children(double)
    assert len(children) == 2
    os.kill(double.proc.pid, signum)
    assert double.proc.wait(10) == 0
    wait_until(lambda: not group_members(double.proc.pid), 10, message="group empty")
    assert "Shutting down" in double.output()


def test_ignore_sigterm_needs_sigkill(start_double):
    double = start_double(env={"FAKE_VLLM_IGNORE_SIGTERM": "1"})
    os.killpg(double.proc.pid, signal.SIGTERM)
    os.killpg(double.proc.pid, signal.SIGINT)
    time.sleep(0.5)
    assert double.proc.poll() is None
    assert len(group_members(double.proc.pid)) == 3
    double.kill()
    wait_until(lambda: not group_members(double.proc.pid), 10, message="group empty")


def test_sigkill_of_the_parent_leaves_the_engine_core_and_worker_running(start_double):
    double = start_double()
    children = _children(double)
    os.kill(double.proc.pid, signal.SIGKILL)
    double.proc.wait(5)
    time.sleep(1.0)
    assert all(pid_alive(child) for child in children)  # orphaned, like vLLM's; only a group kill cleans up
    os.killpg(double.proc.pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(child) for child in children), 10, message="orphans killed")


def test_a_worker_exits_when_its_engine_core_is_gone(start_double):
    double = start_double()
    engine = _engine_core(double)
    (worker,) = set(_children(double)) - {engine}
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: not pid_alive(worker), 10, message="the worker to notice its death pipe")
    assert "Parent process exited, terminating worker queues" in double.output()


def test_crash_after_n_requests_exits_1_and_orphans_the_child(start_double):
    double = start_double(env={"FAKE_VLLM_CRASH_AFTER": "2"})
    child = _engine_core(double)
    body = chat_body(data_uri(pages.page_image(4, (400, 520))))
    with httpx.Client(base_url=double.url, timeout=10) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert double.proc.wait(10) == 1
    assert not port_open(double.port)
    assert pid_alive(child)
    assert "died unexpectedly" in double.output()


def test_hang_after_n_requests_stops_every_endpoint(start_double):
    double = start_double(env={"FAKE_VLLM_HANG_AFTER": "1"})
    body = chat_body(data_uri(pages.page_image(4, (400, 520))))
    assert httpx.post(f"{double.url}/v1/chat/completions", json=body, timeout=10).status_code == 200
    with pytest.raises(httpx.TimeoutException):
        httpx.get(f"{double.url}/health", timeout=0.5)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{double.url}/v1/chat/completions", json=body, timeout=0.5)
    assert double.proc.poll() is None


FAIL_PHRASES = {
    "no_gpu": "RuntimeError: Failed to infer device type",
    "no_cuda_gpus": "RuntimeError: No CUDA GPUs are available",
    "cuda_oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate",
    "free_memory": "is less than desired GPU memory utilization (0.9,",
    "kv_cache": "larger than the available KV cache memory",
    "kv_cache_v0": "is larger than the maximum number of tokens that can be stored in KV cache",
    "address_in_use": "OSError: [Errno 98] Address already in use",
    "model_not_found": f"Repository Not Found for url: https://huggingface.co/api/models/{MODEL}",
    "gated": f"Access to model {MODEL} is restricted. You must have access to it and be authenticated",
    "broken_install": "vllm/_C.abi3.so: undefined symbol",
}


def test_fail_with_prints_vllms_message_and_exits_1(start_double):
    # All cases at once (each is a separate double) to keep the suite fast.
    doubles = {case: start_double(env={"FAKE_VLLM_FAIL_WITH": case, "FAKE_VLLM_STARTUP_DELAY": "0.1"}, ready=False)
               for case in FAIL_PHRASES}
    problems = []
    for case, double in doubles.items():
        code = double.proc.wait(15)
        output = double.output()
        if code != 1 or FAIL_PHRASES[case] not in output or "Traceback (most recent call last):" not in output:
            problems.append(f"{case}: exit {code}, output:\n{output}")
        if "Application startup complete." in output:
            problems.append(f"{case}: became ready")
    assert not problems, "\n\n".join(problems)
    for double in doubles.values():
        wait_until(lambda: not group_members(double.proc.pid), 10, message="no process left")


def test_port_taken_by_a_stranger_fails_with_address_in_use(start_double):
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        double = start_double(port=stranger.getsockname()[1], ready=False)
        assert double.proc.wait(10) == 1
    assert "Address already in use" in double.output()
    assert not _children(double)


def test_required_hf_token(start_double):
    gated = start_double(env={"FAKE_VLLM_REQUIRE_HF_TOKEN": "hf_x", "HF_TOKEN": ""}, ready=False)
    assert gated.proc.wait(10) == 1
    assert "Cannot access gated repo" in gated.output()
    start_double(env={"FAKE_VLLM_REQUIRE_HF_TOKEN": "hf_x", "HF_TOKEN": "hf_x"})


def test_max_lifetime_ends_the_whole_double(start_double):
    double = start_double(env={"FAKE_VLLM_MAX_LIFETIME": "1.5"})
    assert double.proc.wait(10) == 3
    wait_until(lambda: not group_members(double.proc.pid), 10, message="group gone")


# ------------------------------------------------------------------------------------ the inputs and marker


@pytest.mark.parametrize("number", [0, 1, 2, 7, 255, 500, 4096, pages.MAX_NUMBER])
@pytest.mark.parametrize("longest", [400, 1288])
def test_marker_survives_resize_jpeg_and_grayscale(number, longest):
    image = pages.page_image(number)
    scale = longest / max(image.size)
    small = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=70)
    decoded = Image.open(buffer)
    assert pages.read_marker(decoded) == number
    assert pages.read_marker(decoded.convert("L")) == number
    assert pages.read_marker_any_rotation(decoded.transpose(Image.Transpose.ROTATE_90)) == (number, 270)
    assert pages.read_marker_any_rotation(decoded.transpose(Image.Transpose.ROTATE_180)) == (number, 180)


def test_marker_absent_gives_none():
    blank = Image.new("RGB", (850, 1100), "white")
    assert pages.read_marker(blank) is None
    assert pages.read_marker_any_rotation(blank) is None
    page = pages.page_image(12)
    assert all(pages.read_marker(page.rotate(angle, expand=True)) is None for angle in (90, 180, 270))
    with pytest.raises(ValueError):
        pages.page_image(pages.MAX_NUMBER + 1)


def test_pdf_with_text_layer(tmp_path):
    path = pages.make_pdf(tmp_path / "text.pdf", 4, text_layer=True, size=(595, 842))
    pdf = pdfium.PdfDocument(path)
    try:
        assert len(pdf) == 4
        assert [round(v) for v in pdf[0].get_size()] == [595, 842]
        for index in range(4):
            assert pdf[index].get_textpage().get_text_range().strip() == f"Text layer of page {index + 1}"
    finally:
        pdf.close()
    assert [pages.read_marker(render_pdf_page(path, i)) for i in range(4)] == [1, 2, 3, 4]
    plain = pages.make_pdf(tmp_path / "plain.pdf", 1)
    pdf = pdfium.PdfDocument(plain)
    try:
        assert pdf[0].get_textpage().get_text_range().strip() == ""
    finally:
        pdf.close()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
def test_image_files_with_exif_orientation(tmp_path, fmt, orientation):
    path = pages.make_image(tmp_path / f"page.{fmt.lower()}", 21, fmt, exif_orientation=orientation)
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        assert pages.read_marker(upright) == 21
        if orientation not in (None, 1):
            assert pages.read_marker(image) is None


def test_transparent_image_reads_only_after_flattening_onto_white(tmp_path):
    path = pages.make_image(tmp_path / "alpha.png", 33, "PNG", alpha=True)
    with Image.open(path) as image:
        assert image.mode == "RGBA"
        assert pages.read_marker(image) is None  # what a model sees when alpha is simply dropped
        flat = Image.new("RGB", image.size, "white")
        flat.paste(image, mask=image.getchannel("A"))
        assert pages.read_marker(flat) == 33


def test_multipage_tiff(tmp_path):
    path = pages.make_tiff(tmp_path / "scan.tiff", 3)
    with Image.open(path) as image:
        assert image.n_frames == 3
        numbers = []
        for frame in range(3):
            image.seek(frame)
            numbers.append(pages.read_marker(image))
    assert numbers == [1, 2, 3]
