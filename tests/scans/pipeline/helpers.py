"""Shared bits of the pipeline tests: OCR options, a page image, and the vLLM test double as a process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from scans.pipeline.types import PageImage
from scans.pipeline.vllm_engine import VLLMEngine
from tests.fakes.pages import page_image
from tests.support import FAKE_VLLM, free_port, kill_group, port_open, wait_until
from scans.pipeline.options import OCRConfig

MODEL = "test/ocr-model"

OCR = OCRConfig(
    prompt_preset="markdown",
    custom_prompt="",
    target_longest_side=1288,
    image_format="png",
    max_tokens=512,
    temperature=0.0,
    page_retries=3,
    max_in_flight=8,
    request_timeout_s=30,
)


def ocr_options(**changes) -> OCRConfig:
    return dataclasses.replace(OCR, **changes)


def marked_page(number: int, size: tuple[int, int] = (400, 520), rotation: int = 0) -> PageImage:
    """A small PNG page carrying `number`'s marker (rotated clockwise by `rotation`)."""
    image = page_image(number, size)
    if rotation:
        image = image.rotate(-rotation, expand=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PageImage(number=number, data=buffer.getvalue(), mime="image/png", width=image.width, height=image.height, rotation=rotation)


@dataclasses.dataclass
class FakeServer:
    base_url: str  # ends with /v1
    port: int
    state_dir: Path
    process: subprocess.Popen

    def requests(self) -> list[dict]:
        path = self.state_dir / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_fake_vllm(
    tmp_path: Path, *, env: dict[str, str] | None = None, args: list[str] | None = None, wait: bool = True,
    port: int | None = None,
) -> FakeServer:
    """The double on a free port (or on `port`, e.g. where a killed one served: its requests are counted anew)."""
    port = port or free_port()
    state_dir = tmp_path / f"fake-vllm-{port}"
    if state_dir.exists():
        state_dir = tmp_path / f"fake-vllm-{port}-{len(list(tmp_path.glob(f'fake-vllm-{port}*')))}"
    state_dir.mkdir()
    process_env = {**os.environ, "FAKE_VLLM_STARTUP_DELAY": "0.3", "FAKE_VLLM_STATE_DIR": str(state_dir), **(env or {})}
    process = subprocess.Popen(
        [str(FAKE_VLLM), "serve", MODEL, "--host", "127.0.0.1", "--port", str(port), *(args or [])],
        env=process_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = FakeServer(f"http://127.0.0.1:{port}/v1", port, state_dir, process)
    if wait:
        try:
            wait_until(lambda: port_open(port), timeout=20, message="the vLLM test double to listen")
        except BaseException:
            stop_fake_vllm(server)
            raise
    return server


def stop_fake_vllm(server: FakeServer) -> None:
    kill_group(server.process.pid)
    server.process.wait(timeout=10)


@contextmanager
def fake_vllm(tmp_path: Path, **kwargs) -> Iterator[FakeServer]:
    server = start_fake_vllm(tmp_path, **kwargs)
    try:
        yield server
    finally:
        stop_fake_vllm(server)


def decode(page: PageImage) -> Image.Image:
    image = Image.open(io.BytesIO(page.data))
    image.load()
    return image


def engine_for(server: FakeServer, **kwargs) -> VLLMEngine:
    """The real engine client, pointed at a running double."""
    options = {"timeout_s": 10, "max_in_flight": 8, **kwargs}
    model = options.pop("model", MODEL)
    api_key = options.pop("api_key", "")
    return VLLMEngine(server.base_url.removesuffix("/v1"), model, api_key, **options)


def sent(server: FakeServer, page: int | None) -> list[dict]:
    """The chat requests the double received for the page with marker `page`, in order."""
    return [entry for entry in server.requests() if entry["page_marker"] == page]


class Sleeps(list):
    """A stand-in for asyncio.sleep that records the backoff delays instead of waiting."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


async def no_rerender(rotation: int) -> PageImage:
    raise AssertionError("no re-render expected")
