"""A stand-in for `vllm serve`: same command line, same HTTP API shapes, same process behaviour.

Run through the `vllm` script next to this file. Only the standard library is imported at start-up;
Pillow (and `pages`) are imported on the first chat request, setproctitle by the child processes.

Processes, as `vllm serve` with its multiprocessing executor: the API server (the process started)
spawns `VLLM::EngineCore` in its process group, which spawns one worker per tensor-parallel rank
(`VLLM::Worker`, or `VLLM::Worker_TP0`, ... with --tensor-parallel-size N). Both rename themselves with
setproctitle as vLLM does, which overwrites their command line and environment block. SIGTERM or SIGINT
to the API server stops them all; so does SIGTERM to the group. When the API server dies abnormally
(SIGKILL, FAKE_VLLM_CRASH_AFTER) the EngineCore stays, and with it its workers; a worker exits when its
EngineCore is gone (its death pipe reaches end-of-file).

Knobs (environment variables):
  FAKE_VLLM_STARTUP_DELAY   seconds before listening (port bound at once, connections refused), default 0.5
  FAKE_VLLM_HOLD_UNTIL      a path: after the start-up delay, keep starting (not listening) until it exists,
                            so a test sees `starting` for as long as it needs and then releases the server
  FAKE_VLLM_HOLD_PHASES     start-up steps to stop in (comma-separated, or "all"): load, download, compile,
                            profile, capture, api_server. The double prints vLLM 0.11's start-up lines in order
                            (STARTUP_STEPS) and, after the opening lines of each step listed, waits until
                            `continue-<step>` exists in FAKE_VLLM_STATE_DIR
  FAKE_VLLM_LATENCY         seconds per chat request, spent while holding a capacity slot, default 0
  FAKE_VLLM_CAPACITY        chat requests processed at once (others wait), default 256
  FAKE_VLLM_ERROR_RATE      fraction of chat requests answered 500
  FAKE_VLLM_429_RATE        fraction answered 429 (with Retry-After: FAKE_VLLM_RETRY_AFTER, default 1)
  FAKE_VLLM_FINISH_LENGTH_RATE  fraction of answers cut in half with finish_reason "length"
  FAKE_VLLM_BAD_OUTPUT_RATE     fraction of answers that are unusable prose (no "PAGE", no front matter)
  FAKE_VLLM_SCRIPT          JSON {"<page>": [outcome, ...]}: outcomes of that page's successive requests, then "ok"
                            (deterministic retry tests). Outcomes: ok, 500, 429, length (cut in half), garbage (prose),
                            hang, drop (connection closed), hold (answered once FAKE_VLLM_STATE_DIR/release or
                            release-<page> exists; hold:<outcome> then answers with that outcome), think_forever
                            (reasons until max_tokens, never answers), empty (answers nothing), loop / loop_phrase
                            (a table row / a phrase repeated until max_tokens),
                            html_502 / html_503 / html_504 (the HTML error page of an nginx / AWS load balancer /
                            Cloudflare proxy in front of the server), 401 (as if the API key had just been revoked)
  FAKE_VLLM_THINKING        the model reasons before answering: inline (it writes <think>...</think> itself) or
                            template (its chat template opens <think>, so the answer starts inside it: ...</think>);
                            `serve --reasoning-parser X` moves the reasoning to the message's reasoning field, and
                            chat_template_kwargs {"enable_thinking": false} in the request turns thinking off
  FAKE_VLLM_REASONING_FIELD the message field of parsed reasoning: reasoning_content (vLLM 0.11, default) | reasoning
  FAKE_VLLM_MODELS_WITHOUT_MAX_LEN  1: /v1/models lists the models without max_model_len (as gateways in front of vLLM do)
  FAKE_VLLM_PAGE_TOKEN_FACTOR  "<page>:<factor>,...": those pages' images cost factor x the tokens of other images of
                            their size (as if tiled at a far higher resolution), to overflow max_model_len
  FAKE_VLLM_SEED            seed for the rates above
  FAKE_VLLM_HANG_AFTER      after N answered chat requests every endpoint (even /health) stops answering
  FAKE_VLLM_CRASH_AFTER     after N answered chat requests the API process exits 1, its EngineCore left behind
  FAKE_VLLM_IGNORE_SIGTERM  1: SIGTERM and SIGINT ignored by the API process, its EngineCore and workers
  FAKE_VLLM_FAIL_WITH       print vLLM's failure output and exit 1 without listening: see FAIL_CASES
  FAKE_VLLM_REQUIRE_HF_TOKEN  fail like a gated repo unless HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) equals it
  FAKE_VLLM_ROTATED_PAGES   pages that olmOCR-style prompts report as needing rotation_correction 90 until
                            they arrive turned by Image.transpose(ROTATE_90)
  FAKE_VLLM_STATE_DIR       append one JSON line per chat request to requests.jsonl there
  FAKE_VLLM_DECODE          fast (default: PNG checked by CRC and only the marker rows inflated) | full
  FAKE_VLLM_ACCESS_LOG      0 turns off uvicorn-style access lines
  FAKE_VLLM_MAX_LIFETIME    the whole double exits (code 3) after this many seconds, default 600
  FAKE_VLLM_ORPHAN_LINGER   seconds the EngineCore child outlives a parent that died abnormally, default 120
  FAKE_VLLM_PYTHON          interpreter used by the `vllm` script (default: the project's .venv)

Answers follow vLLM 0.11: one token per 28x28 px of image and per 4 characters of text; a prompt or max_tokens
that does not fit --max-model-len (default 32768) gets vLLM's own 400 messages, an answer that reaches it is cut
off ("length"). A page image without a marker that is blank (near-uniform) gets an empty answer, as a model's.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = "0.11.0"
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_MAX_MODEL_LEN = 32768
HERE = Path(__file__).resolve().parent
# vLLM flags that take no value (argparse store_true / BooleanOptionalAction); `--no-*` are all flags too.
BOOLEAN_FLAGS = {
    "trust-remote-code", "enforce-eager", "disable-log-requests", "disable-log-stats", "enable-log-requests",
    "enable-prefix-caching", "enable-chunked-prefill", "disable-frontend-multiprocessing", "headless",
    "enable-auto-tool-choice", "disable-custom-all-reduce", "skip-tokenizer-init", "enable-lora",
    "disable-fastapi-docs", "enable-prompt-tokens-details", "enable-server-load-tracking", "disable-uvicorn-access-log",
    "enable-log-outputs", "enable-sleep-mode", "enable-expert-parallel", "async-scheduling", "enable-force-include-usage",
    "return-tokens-as-token-ids", "disable-mm-preprocessor-cache", "enable-request-id-headers", "allow-credentials",
}


# --------------------------------------------------------------------------------------------- knobs


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def _int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def _int_set(name: str) -> set[int]:
    return {int(part) for part in os.environ.get(name, "").replace(" ", "").split(",") if part}


@dataclass
class Knobs:
    startup_delay: float = field(default_factory=lambda: _float("FAKE_VLLM_STARTUP_DELAY", 0.5))
    hold_until: str = field(default_factory=lambda: os.environ.get("FAKE_VLLM_HOLD_UNTIL", ""))
    hold_phases: set[str] = field(default_factory=lambda: {
        part.strip() for part in os.environ.get("FAKE_VLLM_HOLD_PHASES", "").split(",") if part.strip()})
    latency: float = field(default_factory=lambda: _float("FAKE_VLLM_LATENCY", 0.0))
    capacity: int = field(default_factory=lambda: _int("FAKE_VLLM_CAPACITY", 256) or 256)
    error_rate: float = field(default_factory=lambda: _float("FAKE_VLLM_ERROR_RATE", 0.0))
    rate_429: float = field(default_factory=lambda: _float("FAKE_VLLM_429_RATE", 0.0))
    retry_after: int = field(default_factory=lambda: _int("FAKE_VLLM_RETRY_AFTER", 1) or 0)
    finish_length_rate: float = field(default_factory=lambda: _float("FAKE_VLLM_FINISH_LENGTH_RATE", 0.0))
    bad_output_rate: float = field(default_factory=lambda: _float("FAKE_VLLM_BAD_OUTPUT_RATE", 0.0))
    hang_after: int | None = field(default_factory=lambda: _int("FAKE_VLLM_HANG_AFTER", None))
    crash_after: int | None = field(default_factory=lambda: _int("FAKE_VLLM_CRASH_AFTER", None))
    ignore_sigterm: bool = field(default_factory=lambda: os.environ.get("FAKE_VLLM_IGNORE_SIGTERM", "") == "1")
    fail_with: str = field(default_factory=lambda: os.environ.get("FAKE_VLLM_FAIL_WITH", "").strip())
    state_dir: str = field(default_factory=lambda: os.environ.get("FAKE_VLLM_STATE_DIR", ""))
    rotated_pages: set[int] = field(default_factory=lambda: _int_set("FAKE_VLLM_ROTATED_PAGES"))
    script: dict[int, list[str]] = field(default_factory=lambda: _script(os.environ.get("FAKE_VLLM_SCRIPT", "")))
    seed: int | None = field(default_factory=lambda: _int("FAKE_VLLM_SEED", None))
    max_lifetime: float = field(default_factory=lambda: _float("FAKE_VLLM_MAX_LIFETIME", 600.0))
    orphan_linger: float = field(default_factory=lambda: _float("FAKE_VLLM_ORPHAN_LINGER", 120.0))
    access_log: bool = field(default_factory=lambda: os.environ.get("FAKE_VLLM_ACCESS_LOG", "1") != "0")
    decode: str = field(default_factory=lambda: os.environ.get("FAKE_VLLM_DECODE", "fast"))
    require_hf_token: str = field(default_factory=lambda: os.environ.get("FAKE_VLLM_REQUIRE_HF_TOKEN", ""))
    thinking: str = field(default_factory=lambda: os.environ.get("FAKE_VLLM_THINKING", "").strip())
    reasoning_field: str = field(
        default_factory=lambda: os.environ.get("FAKE_VLLM_REASONING_FIELD", "").strip() or "reasoning_content")
    models_without_max_len: bool = field(
        default_factory=lambda: os.environ.get("FAKE_VLLM_MODELS_WITHOUT_MAX_LEN", "") == "1")
    page_token_factor: dict[int, float] = field(
        default_factory=lambda: _factors(os.environ.get("FAKE_VLLM_PAGE_TOKEN_FACTOR", "")))


OUTCOMES = {"ok", "500", "429", "length", "garbage", "hang", "drop", "hold", "think_forever", "empty", "loop",
            "loop_phrase", "html_502", "html_503", "html_504", "401"}


def _factors(raw: str) -> dict[int, float]:
    """FAKE_VLLM_PAGE_TOKEN_FACTOR: "2:200,5:3" -> {2: 200.0, 5: 3.0}."""
    pairs = (part.split(":", 1) for part in raw.replace(" ", "").split(",") if part)
    return {int(page): float(factor) for page, factor in pairs}


def _script(raw: str) -> dict[int, list[str]]:
    """FAKE_VLLM_SCRIPT: JSON {"<page>": ["500", "429", "ok", ...]}, the outcomes of that page's
    successive requests (after the list: "ok")."""
    if not raw.strip():
        return {}
    parsed = json.loads(raw)
    script = {int(page): [str(o) for o in outcomes] for page, outcomes in parsed.items()}
    for outcomes in script.values():
        unknown = {o.removeprefix("hold:") for o in outcomes} - OUTCOMES
        if unknown:
            raise SystemExit(f"FAKE_VLLM_SCRIPT: unknown outcome(s) {sorted(unknown)}; known: {sorted(OUTCOMES)}")
    return script


# --------------------------------------------------------------------------------------------- logging

_log_lock = threading.Lock()


def _emit(stream, line: str) -> None:
    with _log_lock:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass


def log(level: str, where: str, message: str, role: str = "APIServer", pid: int | None = None) -> None:
    """A vLLM logger line, e.g. `(APIServer pid=12) INFO 11-22 10:00:00 [api_server.py:1885] ...`."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    _emit(sys.stdout, f"({role} pid={pid or os.getpid()}) {level} {stamp} [{where}] {message}")


def uvicorn(message: str, level: str = "INFO") -> None:
    _emit(sys.stderr, f"{level + ':':<10}{message}")


# --------------------------------------------------------------------------------------------- CLI


@dataclass
class ServeArgs:
    model: str
    host: str | None = None
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    other: dict[str, str | bool] = field(default_factory=dict)


USAGE = "usage: vllm serve [model_tag] [options]"


def _usage_error(message: str) -> None:
    _emit(sys.stderr, USAGE)
    _emit(sys.stderr, f"vllm serve: error: {message}")
    raise SystemExit(2)


def parse_serve_args(argv: list[str]) -> ServeArgs:
    positionals: list[str] = []
    options: dict[str, list[str] | bool] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            name, eq, inline = token.lstrip("-").partition("=")
            if eq:
                options[name] = [inline]
            elif name in BOOLEAN_FLAGS or name.startswith("no-"):
                options[name] = True
            elif name in ("served-model-name", "middleware", "allowed-origins", "api-key"):
                values = []
                while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    values.append(argv[i + 1])
                    i += 1
                if not values:
                    _usage_error(f"argument --{name}: expected at least one argument")
                options[name] = values
            elif i + 1 < len(argv) and (not argv[i + 1].startswith("-") or _is_number(argv[i + 1])):
                options[name] = [argv[i + 1]]
                i += 1
            else:
                options[name] = True
        else:
            positionals.append(token)
        i += 1
    if len(positionals) > 1:
        _usage_error(f"unrecognized arguments: {' '.join(positionals[1:])}")
    model_opt = options.pop("model", None)
    model = positionals[0] if positionals else (model_opt[0] if isinstance(model_opt, list) else DEFAULT_MODEL)
    args = ServeArgs(model=model)
    host = options.pop("host", None)
    if isinstance(host, list):
        args.host = host[0]
    port = options.pop("port", None)
    if port is not None:
        if not isinstance(port, list) or not port[0].isdigit():
            _usage_error(f"argument --port: invalid int value: '{port[0] if isinstance(port, list) else ''}'")
        args.port = int(port[0])
    names = options.pop("served-model-name", None)
    args.served_model_names = list(names) if isinstance(names, list) else [model]
    api_key = options.pop("api-key", None)
    if isinstance(api_key, list):
        args.api_key = api_key[0]
    elif os.environ.get("VLLM_API_KEY"):
        args.api_key = os.environ["VLLM_API_KEY"]
    max_len = options.get("max-model-len")
    if isinstance(max_len, list):
        try:
            args.max_model_len = _parse_len(max_len[0])
        except ValueError:
            _usage_error(f"argument --max-model-len: invalid value: '{max_len[0]}'")
    args.other = {k: (v if isinstance(v, bool) else " ".join(v)) for k, v in options.items()}
    return args


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_len(raw: str) -> int:
    lowered = raw.lower()
    for suffix, factor in (("k", 1000), ("m", 1000_000)):
        if lowered.endswith(suffix):
            return int(float(lowered[:-1]) * factor)
    return int(lowered)


# --------------------------------------------------------------------------------------------- failures

SITE = "/usr/local/lib/python3.12/site-packages"


def _frames(*frames: tuple[str, int, str, str]) -> list[str]:
    lines = ["Traceback (most recent call last):"]
    for path, line, func, code in frames:
        lines.append(f'  File "{path}", line {line}, in {func}')
        lines.append(f"    {code}")
    return lines


def _cli_frames() -> list[tuple[str, int, str, str]]:
    return [
        ("/usr/local/bin/vllm", 10, "<module>", "sys.exit(main())"),
        (f"{SITE}/vllm/entrypoints/cli/main.py", 73, "main", "args.dispatch_function(args)"),
        (f"{SITE}/vllm/entrypoints/cli/serve.py", 60, "cmd", "uvloop.run(run_server(args))"),
        (f"{SITE}/vllm/entrypoints/openai/api_server.py", 1941, "run_server", "await run_server_worker(listen_address, sock, args, **uvicorn_kwargs)"),
    ]


def failure_text(case: str, args: ServeArgs, engine_pid: int) -> list[str] | None:
    """What vLLM prints (stdout and stderr merged) when it fails in this way, ending in the exception line."""
    model = args.model
    engine = f"(EngineCore_DP0 pid={engine_pid})"
    engine_failed = [
        *_frames(*_cli_frames(),
                 (f"{SITE}/vllm/v1/engine/core_client.py", 916, "_wait_for_engine_startup", "wait_for_engine_startup("),
                 (f"{SITE}/vllm/v1/engine/utils.py", 880, "wait_for_engine_startup", 'raise RuntimeError("Engine core initialization failed. "')),
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    if case == "no_gpu":
        return [
            f"(APIServer pid={os.getpid()}) INFO {time.strftime('%m-%d %H:%M:%S')} [__init__.py:220] No platform detected, vLLM is running on UnspecifiedPlatform",
            *_frames(*_cli_frames(),
                     (f"{SITE}/vllm/engine/arg_utils.py", 1154, "create_engine_config", "device_config = DeviceConfig("),
                     (f"{SITE}/vllm/config/device.py", 58, "__post_init__", "raise RuntimeError(")),
            "RuntimeError: Failed to infer device type, please set the environment variable `VLLM_LOGGING_LEVEL=DEBUG` to turn on verbose logging to help debug the issue.",
        ]
    if case == "no_cuda_gpus":
        return [
            *(f"{engine} {line}" for line in _frames(
                (f"{SITE}/vllm/v1/engine/core.py", 701, "run_engine_core", "engine_core = EngineCoreProc(*args, **kwargs)"),
                (f"{SITE}/vllm/v1/worker/gpu_worker.py", 160, "init_device", "torch.cuda.set_device(self.device)"),
                (f"{SITE}/torch/cuda/__init__.py", 372, "_lazy_init", "torch._C._cuda_init()"))),
            f"{engine} RuntimeError: No CUDA GPUs are available",
            *engine_failed,
        ]
    if case == "cuda_oom":
        return [
            *(f"{engine} {line}" for line in _frames(
                (f"{SITE}/vllm/v1/engine/core.py", 701, "run_engine_core", "engine_core = EngineCoreProc(*args, **kwargs)"),
                (f"{SITE}/vllm/v1/worker/gpu_model_runner.py", 2560, "load_model", "self.model = model_loader.load_model("),
                (f"{SITE}/torch/nn/modules/module.py", 1355, "convert", "return t.to("))),
            f"{engine} torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.02 GiB. GPU 0 has a total capacity "
            "of 23.55 GiB of which 412.06 MiB is free. Including non-PyTorch memory, this process has 23.13 GiB memory in use. "
            "Of the allocated memory 22.61 GiB is allocated by PyTorch, and 108.44 MiB is reserved by PyTorch but unallocated. "
            "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
            "fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
            *engine_failed,
        ]
    if case == "free_memory":
        utilization = args.other.get("gpu-memory-utilization", "0.9")
        return [
            *(f"{engine} {line}" for line in _frames(
                (f"{SITE}/vllm/v1/engine/core.py", 701, "run_engine_core", "engine_core = EngineCoreProc(*args, **kwargs)"),
                (f"{SITE}/vllm/v1/worker/gpu_worker.py", 239, "init_device", "raise ValueError("))),
            f"{engine} ValueError: Free memory on device (7.12/23.55 GiB) on startup is less than desired GPU memory "
            f"utilization ({utilization}, 21.20 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
            *engine_failed,
        ]
    if case == "kv_cache":
        return [
            *(f"{engine} {line}" for line in _frames(
                (f"{SITE}/vllm/v1/engine/core.py", 701, "run_engine_core", "engine_core = EngineCoreProc(*args, **kwargs)"),
                (f"{SITE}/vllm/v1/core/kv_cache_utils.py", 1122, "get_kv_cache_configs", "check_enough_kv_cache_memory(vllm_config, kv_cache_spec_one_worker, available_memory_one_worker)"),
                (f"{SITE}/vllm/v1/core/kv_cache_utils.py", 700, "check_enough_kv_cache_memory", "raise ValueError("))),
            f"{engine} ValueError: To serve at least one request with the models's max seq len ({args.max_model_len}), "
            "(3.50 GiB KV cache is needed, which is larger than the available KV cache memory (1.32 GiB). Based on the "
            "available memory, the estimated maximum model length is 12345. Try increasing `gpu_memory_utilization` or "
            "decreasing `max_model_len` when initializing the engine.",
            *engine_failed,
        ]
    if case == "kv_cache_v0":
        return [
            *_frames(*_cli_frames(),
                     (f"{SITE}/vllm/worker/worker.py", 600, "raise_if_cache_size_invalid", "raise ValueError(")),
            f"ValueError: The model's max seq len ({args.max_model_len}) is larger than the maximum number of tokens that can be "
            "stored in KV cache (12345). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
            "initializing the engine.",
        ]
    if case == "address_in_use":
        return [
            *_frames(*_cli_frames()[:3],
                     (f"{SITE}/vllm/entrypoints/openai/api_server.py", 1905, "run_server", "listen_address, sock = setup_server(args)"),
                     (f"{SITE}/vllm/entrypoints/openai/api_server.py", 1868, "setup_server", "sock = create_server_socket(sock_addr)"),
                     (f"{SITE}/vllm/entrypoints/openai/api_server.py", 1836, "create_server_socket", "sock.bind(addr)")),
            "OSError: [Errno 98] Address already in use",
        ]
    if case == "model_not_found":
        return [
            *_frames(*_cli_frames(),
                     (f"{SITE}/huggingface_hub/utils/_http.py", 459, "hf_raise_for_status", "raise _format(RepositoryNotFoundError, message, response) from e")),
            f"huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. (Request ID: Root=1-{uuid.uuid4().hex[:24]})",
            "",
            f"Repository Not Found for url: https://huggingface.co/api/models/{model}/tree/main?recursive=True&expand=False.",
            "Please make sure you specified the correct `repo_id` and `repo_type`.",
            "If you are trying to access a private or gated repo, make sure you are authenticated. For more details, see https://huggingface.co/docs/huggingface_hub/authentication",
        ]
    if case == "gated":
        return [
            *_frames(*_cli_frames(),
                     (f"{SITE}/huggingface_hub/utils/_http.py", 426, "hf_raise_for_status", "raise _format(GatedRepoError, message, response) from e")),
            f"huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: Root=1-{uuid.uuid4().hex[:24]})",
            "",
            f"Cannot access gated repo for url https://huggingface.co/{model}/resolve/main/config.json.",
            f"Access to model {model} is restricted. You must have access to it and be authenticated to access it. Please log in.",
        ]
    if case == "broken_install":
        return [
            f"(APIServer pid={os.getpid()}) WARNING {time.strftime('%m-%d %H:%M:%S')} [_custom_ops.py:21] "
            "Failed to import from vllm._C with ModuleNotFoundError(\"No module named 'vllm._C'\")",
            *_frames(("/usr/local/bin/vllm", 5, "<module>", "from vllm.entrypoints.cli.main import main"),
                     (f"{SITE}/vllm/platforms/cuda.py", 18, "<module>", "import vllm._C  # noqa")),
            f"ImportError: {SITE}/vllm/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDeviceEab",
        ]
    return None


FAIL_CASES = ("no_gpu", "no_cuda_gpus", "cuda_oom", "free_memory", "kv_cache", "kv_cache_v0", "address_in_use",
              "model_not_found", "gated", "broken_install")
# Cases that happen before anything is spawned or loaded (printed at once, no start-up delay).
IMMEDIATE_CASES = {"broken_install", "address_in_use", "no_gpu"}


# --------------------------------------------------------------------------------------------- engine core child


def set_process_title(name: str) -> None:
    """vLLM's `set_process_title`: setproctitle("VLLM::<name>"). Like vLLM's, it overwrites the process's
    command line and environment block (/proc/PID/cmdline and /proc/PID/environ), so nothing can find
    the process by a variable its parent set any more."""
    import setproctitle  # test-only dependency (pyproject's dev extra), as vLLM depends on it

    setproctitle.setproctitle(f"VLLM::{name}")


def _exit_on_sigterm(knobs: Knobs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server stops us; Ctrl+C to the group is its job
    signal.signal(signal.SIGTERM, signal.SIG_IGN if knobs.ignore_sigterm else lambda *_: os._exit(0))


# vLLM 0.11's start-up, as the EngineCore (one GPU: the model runs in its process) prints it between
# "Initializing a V1 LLM engine" and "init engine ... took": (step, [(logger line or tqdm bar), ...]). The
# first line of each step opens it; FAKE_VLLM_HOLD_PHASES stops the double right after it.
def startup_steps(model: str) -> list[tuple[str, list[tuple[str, str]]]]:
    return [
        ("load", [
            ("gpu_model_runner.py:2602", f"Starting to load model {model}..."),
            ("gpu_model_runner.py:2634", "Loading model from scratch..."),
            ("cuda.py:366", "Using Flash Attention backend on V1 engine."),
        ]),
        ("download", [
            ("weight_utils.py:392", "Using model weights format ['*.safetensors']"),
            ("weight_utils.py:413", f"Time spent downloading weights for {model}: 0.612345 seconds"),
            ("tqdm", "Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:00<00:00,  2.31it/s]"),
            ("default_loader.py:267", "Loading weights took 0.87 seconds"),
            ("gpu_model_runner.py:2653", "Model loading took 4.2374 GiB and 1.912345 seconds"),
        ]),
        ("compile", [
            ("backends.py:548", "Using cache directory: /root/.cache/vllm/torch_compile_cache/9f0e2c1a4b/rank_0_0/"
                                "backbone for vLLM's torch.compile"),
            ("backends.py:559", "Dynamo bytecode transform time: 3.70 s"),
            ("backends.py:197", "Cache the graph for dynamic shape for later use"),
            ("backends.py:218", "Compiling a graph for dynamic shape takes 20.15 s"),
        ]),
        ("profile", [
            ("monitor.py:34", "torch.compile takes 23.85 s in total"),
            ("gpu_worker.py:298", "Available KV cache memory: 18.38 GiB"),
            ("kv_cache_utils.py:1087", "GPU KV cache size: 172,032 tokens"),
            ("kv_cache_utils.py:1091", "Maximum concurrency for 32,768 tokens per request: 5.25x"),
        ]),
        ("capture", [
            ("tqdm", "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 67/67 "
                     "[00:03<00:00, 19.21it/s]"),
            ("tqdm", "Capturing CUDA graphs (decode, FULL): 100%|##########| 35/35 [00:01<00:00, 21.94it/s]"),
            ("gpu_model_runner.py:3480", "Graph capturing finished in 5 secs, took 0.49 GiB"),
        ]),
    ]


def hold_phase(knobs: Knobs, step: str, stop: threading.Event | None = None) -> bool:
    """FAKE_VLLM_HOLD_PHASES: wait in `step` until the test creates continue-<step>; False when stopped first."""
    if step not in knobs.hold_phases and "all" not in knobs.hold_phases:
        return True
    gate = Path(knobs.state_dir or ".") / f"continue-{step}"
    while not gate.exists():
        if stop is not None and stop.wait(0.02):
            return False
        if stop is None:
            time.sleep(0.02)
    return True


def print_startup_steps(knobs: Knobs, model: str, role: str) -> None:
    for step, lines in startup_steps(model):
        for index, (where, message) in enumerate(lines):
            if where == "tqdm":  # progress bars go to stderr with the process's prefix
                _emit(sys.stderr, f"({role} pid={os.getpid()}) {message}")
            else:
                log("INFO", where, message, role)
            if index == 0:
                hold_phase(knobs, step)


def run_engine_core(parent_pid: int, workers: int, ready_fd: int, model: str = DEFAULT_MODEL) -> int:
    """The EngineCore child: renames itself, spawns its workers and reports ready (one byte on `ready_fd`,
    vLLM's start-up handshake) once they are, idles; stops on SIGTERM.

    Orphaned (its API server died without stopping it) it lingers for FAKE_VLLM_ORPHAN_LINGER seconds,
    as vLLM's does (vllm-project/vllm#55510)."""
    knobs = Knobs()
    set_process_title("EngineCore")
    role = "EngineCore_DP0"
    _exit_on_sigterm(knobs)
    log("INFO", "core.py:93", "Initializing a V1 LLM engine (v%s) with config: device_config=cpu (test double)" % VERSION, role)
    # vLLM's MultiprocExecutor: one worker per tensor-parallel rank, each watching a death pipe from us and
    # reporting ready on a pipe of its own.
    death_read, _death_write = os.pipe()  # we hold the write end until we exit
    ready_read, ready_write = os.pipe()
    names = ["Worker"] if workers == 1 else [f"Worker_TP{rank}" for rank in range(workers)]
    for name in names:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(death_read), str(ready_write)]
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(death_read, ready_write))
    os.close(death_read)
    os.close(ready_write)
    for _ in names:
        if not os.read(ready_read, 1):
            log("ERROR", "multiproc_executor.py:520", "WorkerProc failed to start.", role)
            return 1
    print_startup_steps(knobs, model, role)
    log("INFO", "core.py:215", "init engine (profile, create kv cache, warmup model) took 0.01 seconds", role)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    started = time.monotonic()
    orphaned_at: float | None = None
    while True:
        now = time.monotonic()
        if orphaned_at is None and os.getppid() != parent_pid:
            orphaned_at = now
        if orphaned_at is not None and now - orphaned_at > knobs.orphan_linger:
            return 0
        if now - started > knobs.max_lifetime:
            return 0
        time.sleep(0.2)


def run_worker(name: str, death_pipe: int, ready_fd: int) -> int:
    """A worker grandchild: renames itself, reports ready; exits on SIGTERM or when its EngineCore is gone
    (its death pipe reaches end-of-file), as vLLM's WorkerProc does."""
    knobs = Knobs()
    set_process_title(name)
    _exit_on_sigterm(knobs)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    readable, _, _ = select.select([death_pipe], [], [], knobs.max_lifetime)
    if readable:  # nothing is ever written: readable means end-of-file
        log("INFO", "multiproc_executor.py:574", "Parent process exited, terminating worker queues", name)
    return 0


# --------------------------------------------------------------------------------------------- server state


class HTTPError(Exception):
    def __init__(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class DoubleState:
    def __init__(self, args: ServeArgs, knobs: Knobs) -> None:
        self.args, self.knobs = args, knobs
        self.created = int(time.time())
        self.capacity = threading.BoundedSemaphore(knobs.capacity)
        self.lock = threading.Lock()
        self.random = random.Random(knobs.seed)
        self.chat_answered = 0
        self.page_attempts: dict[int | None, int] = {}
        self.hung = threading.Event()
        self.stopping = threading.Event()
        self.log_path = Path(knobs.state_dir) / "requests.jsonl" if knobs.state_dir else None
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def chance(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self.lock:
            return self.random.random() < rate

    def next_outcome(self, page: int | None) -> str:
        with self.lock:
            attempt = self.page_attempts.get(page, 0)
            self.page_attempts[page] = attempt + 1
        script = self.knobs.script.get(page) if page is not None else None
        if script and attempt < len(script):
            return script[attempt]
        return "ok"

    def record(self, entry: dict) -> None:
        if not self.log_path:
            return
        line = json.dumps(entry) + "\n"
        with self.lock, open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()


# --------------------------------------------------------------------------------------------- chat


def _message_parts(messages: list) -> tuple[str, list[str]]:
    texts, images = [], []
    for message in messages:
        if not isinstance(message, dict):
            raise HTTPError(400, error_body("messages must be a list of objects", "BadRequestError", 400, "messages"))
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(str(url or ""))
    return "\n".join(texts), images


@dataclass
class Decoded:
    """An uploaded image: its real size and a way to get pixels for reading the page marker."""

    size: tuple[int, int]
    raw: bytes
    top: object | None = None  # full-size canvas with only the marker band decoded (fast path)

    def full(self):
        from PIL import Image

        image = Image.open(io.BytesIO(self.raw))
        if image.format == "JPEG":
            image.draft("L", (image.width // 2, image.height // 2))  # DCT scaling: same validation, less work
        image.load()
        # vLLM converts to RGB, which drops alpha rather than flattening it; L and RGB need no conversion here.
        return image if image.mode in ("L", "RGB") else image.convert("RGB")


def decode_image(url: str, fast: bool = True) -> Decoded:
    from PIL import Image  # deferred: keeps start-up fast

    if not url.startswith("data:"):
        raise HTTPError(400, error_body(
            "The test double only accepts base64 data URIs for image_url (no network access)", "BadRequestError", 400))
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise HTTPError(400, error_body("image_url data URI must be base64-encoded", "BadRequestError", 400))
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPError(400, error_body(f"Invalid base64 image data: {exc}", "BadRequestError", 400)) from exc
    try:
        probe = Image.open(io.BytesIO(raw))
        decoded = Decoded(probe.size, raw)
        if fast and probe.format == "PNG" and len(probe.tile) == 1 and not probe.info.get("interlace"):
            decoded.top = _png_top_band(probe, raw)
        else:
            decoded.top = decoded.full()
    except Exception as exc:  # Pillow raises many types for bad data
        raise HTTPError(400, error_body(f"Failed to load image: {exc}", "BadRequestError", 400)) from exc
    return decoded


def _png_top_band(probe, raw: bytes):
    """Check every chunk's CRC, then inflate only the rows holding the marker (PNG decoding dominates the
    double's CPU use otherwise; real vLLM runs on a big machine, the double shares the test's CPUs)."""
    from PIL import Image

    Image.open(io.BytesIO(raw)).verify()
    width, height = probe.size
    rows = min(height, max(8, int(height * 0.06)))
    tile = probe.tile[0]
    fields = (tile[0], (0, 0, width, rows), *tile[2:])
    probe.tile = [type(tile)(*fields) if hasattr(tile, "_replace") else fields]  # a NamedTuple since Pillow 11
    probe._size = (width, rows)
    probe.load()
    band = probe.convert("L")
    canvas = Image.new("L", (width, height), 255)
    canvas.paste(band, (0, 0))
    return canvas


def _olmocr_text(page: str, rotation_valid: bool, correction: int) -> str:
    return (
        "---\nprimary_language: en\n"
        f"is_rotation_valid: {rotation_valid}\nrotation_correction: {correction}\n"
        "is_table: False\nis_diagram: False\n---\n"
        f"# PAGE {page}\n\nText of page {page}.\n"
    )


def _markdown_text(page: str) -> str:
    return f"# PAGE {page}\n\nText of page {page}.\n\n- first point of page {page}\n- second point of page {page}\n"


def _pages():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import pages  # tests/fakes/pages.py, imported lazily with Pillow

    return pages


class Chat:
    """The chat-completions endpoint, kept apart from HTTP plumbing."""

    def __init__(self, state: DoubleState) -> None:
        self.state = state

    def validate(self, body: object) -> tuple[dict, str, object | None]:
        if not isinstance(body, dict):
            raise HTTPError(400, error_body("Request body must be a JSON object", "BadRequestError", 400))
        model = body.get("model")
        if model not in self.state.args.served_model_names:
            raise HTTPError(404, error_body(f"The model `{model}` does not exist.", "NotFoundError", 404, "model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, error_body("messages: Field required", "BadRequestError", 400, "messages"))
        if body.get("stream"):
            raise HTTPError(400, error_body("The test double does not support stream=true", "BadRequestError", 400, "stream"))
        prompt, images = _message_parts(messages)
        image = decode_image(images[0], fast=self.state.knobs.decode != "full") if images else None
        return body, prompt, image

    def check_context(self, prompt: str, image, page: int | None, max_tokens: int | None) -> int:
        """The prompt's tokens, or vLLM 0.11's 400 for a request that does not fit --max-model-len: the text
        prompt and max_tokens are checked first (serving_engine.py `_validate_input`), then the prompt with
        the image's tokens (the V1 engine's processor)."""
        limit = self.state.args.max_model_len
        text_tokens = _tokens(prompt)
        if text_tokens >= limit:
            raise HTTPError(400, error_body(
                f"This model's maximum context length is {limit} tokens. However, your request has {text_tokens} "
                "input tokens. Please reduce the length of the input messages.", "BadRequestError", 400))
        if max_tokens is not None and text_tokens + max_tokens > limit:
            raise HTTPError(400, error_body(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
                f"length is {limit} tokens and your request has {text_tokens} input tokens ({max_tokens} > {limit} "
                f"- {text_tokens}).", "BadRequestError", 400))
        if image is None:
            return text_tokens
        prompt_tokens = text_tokens + round(_image_tokens(image) * self.state.knobs.page_token_factor.get(page, 1))
        if prompt_tokens > limit:
            raise HTTPError(400, error_body(
                f"The decoder prompt (length {prompt_tokens}) is longer than the maximum model length of {limit}. "
                "Make sure that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens. "
                "For image inputs, the number of image tokens depends on the number of images, and possibly their "
                "aspect ratios as well.", "BadRequestError", 400))
        return prompt_tokens

    def page_text(self, prompt: str, image, outcome: str, page: int | None, rotation: int) -> str:
        """What the model reads on the page (before any reasoning), "" for a blank page."""
        knobs = self.state.knobs
        label = "?" if page is None else str(page)
        if page is None and image is not None and _is_blank(image.full()):
            return ""
        olmocr = "front matter" in prompt.lower() or "primary_language" in prompt
        if olmocr:
            target = 90 if page in knobs.rotated_pages else 0
            arrived = (360 - rotation) % 360  # the image is the upright page turned counter-clockwise by this
            correction = (target - arrived) % 360
            text = _olmocr_text(label, correction == 0, correction)
        else:
            text = _markdown_text(label)
        if outcome == "garbage" or (outcome == "ok" and self.state.chance(knobs.bad_output_rate)):
            return "I'm sorry, I cannot read this page."
        if outcome == "empty":
            return ""
        if outcome == "loop":
            return f"# PAGE {label}\n\n| Item | Quantity |\n|---|---|\n" + "| Item | 1 |\n" * 50_000
        if outcome == "loop_phrase":
            return f"# PAGE {label}\n\nThe terms and conditions apply " + "to the terms and conditions " * 20_000
        return text

    def respond(self, body: dict, prompt: str, image, outcome: str, page: int | None, rotation: int) -> tuple[int, dict, dict]:
        args, knobs = self.state.args, self.state.knobs
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
        prompt_tokens = self.check_context(prompt, image, page, max_tokens)
        budget = args.max_model_len - prompt_tokens if max_tokens is None else min(max_tokens, args.max_model_len - prompt_tokens)
        text = self.page_text(prompt, image, outcome, page, rotation)
        finish = "stop"
        if outcome == "length" or (outcome == "ok" and self.state.chance(knobs.finish_length_rate)):
            text, finish = text[: max(1, len(text) // 2)], "length"
        kwargs = body.get("chat_template_kwargs")
        thinking_off = isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False
        thinking = "" if thinking_off else knobs.thinking
        forever = outcome == "think_forever" and not thinking_off
        if forever:
            thinking = thinking or "inline"
        output = _generated(thinking, _reasoning_prose(page, forever=forever), text, answers=not forever)
        if _tokens(output) > budget:
            output, finish = output[: budget * 4], "length"
        message: dict = {"role": "assistant", "content": output, knobs.reasoning_field: None, "tool_calls": []}
        if thinking and args.other.get("reasoning-parser"):
            message["content"], message[knobs.reasoning_field] = _parse_reasoning(output)
        completion_tokens = _tokens(output)
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": None},
            "prompt_logprobs": None,
        }
        return 200, response, {"finish_reason": finish}


def _reasoning_prose(page: int | None, forever: bool) -> str:
    label = "?" if page is None else page
    first = (f"Okay, let me look at this page. The user wants it transcribed as Markdown. I can see a heading, "
             f"PAGE {label}, then a short paragraph and a list of two points. Let me write it out carefully.")
    if not forever:
        return first
    return first + " Wait, let me check the heading again, and the spacing of the list." * 5_000


def _generated(thinking: str, reasoning: str, text: str, *, answers: bool) -> str:
    """The model's raw output. A thinking model reasons first; its chat template may have opened the block."""
    if not thinking:
        return text
    opening = "<think>\n" if thinking == "inline" else ""
    return opening + reasoning + ("\n</think>\n\n" + text if answers else "")


def _parse_reasoning(output: str) -> tuple[str | None, str | None]:
    """(content, reasoning) as vLLM's think-tag reasoning parsers (qwen3, deepseek_r1) split the output: an
    unclosed block is all reasoning; an empty part is null."""
    output = output.partition("<think>")[2] or output
    if "</think>" in output:
        reasoning, _, content = output.partition("</think>")
        return content or None, reasoning or None
    return None, output or None


def _is_blank(image) -> bool:
    from PIL import ImageStat

    return ImageStat.Stat(image.convert("L")).stddev[0] < 12


PROXY_PAGES = {
    "html_502": (502, "nginx/1.24.0", "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                 "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"),
    "html_503": (503, "awselb/2.0", "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
                 "<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n</body>\r\n</html>\r\n"),
    "html_504": (504, "cloudflare", "<!DOCTYPE html>\n<!--[if lt IE 7]> <html class=\"no-js ie6 oldie\" lang=\"en-US\"> "
                 "<![endif]-->\n<html class=\"no-js\" lang=\"en-US\">\n<head>\n<title>ocr.example.com | 504: Gateway "
                 "time-out</title>\n<meta charset=\"UTF-8\" />\n</head>\n<body>\n<div id=\"cf-wrapper\">\n<h1>"
                 "<span class=\"inline-block\">Gateway time-out</span> <span class=\"code-label\">Error code 504</span>"
                 "</h1>\n<p>The web server reported a gateway time-out error.</p>\n</div>\n</body>\n</html>\n"),
}


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _image_tokens(image: Decoded) -> int:
    width, height = image.size
    return max(1, (width // 28) * (height // 28))


# --------------------------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; don't wait for delayed ACKs
    server_version = "uvicorn"
    sys_version = ""
    state: DoubleState  # set on the subclass built in serve()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def _access(self, status: int) -> None:
        if self.state.knobs.access_log:
            host, port = self.client_address[:2]
            phrase = HTTPStatus(status).phrase
            uvicorn(f'{host}:{port} - "{self.command} {self.path} HTTP/1.1" {status} {phrase}')

    def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        self._access(status)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _hang_if_needed(self) -> bool:
        if self.state.hung.is_set():
            self.state.stopping.wait()
            self.close_connection = True
            return True
        return False

    def _authorized(self) -> bool:
        key = self.state.args.api_key
        if not key or not self.path.startswith("/v1"):
            return True
        return self.headers.get("authorization", "") == f"Bearer {key}"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._read_body()
        if self._hang_if_needed():
            return
        path = self.path.split("?", 1)[0]
        if not self._authorized():
            return self._send(401, {"error": "Unauthorized"})
        if path in ("/health", "/ping"):
            return self._send(200, None)
        if path == "/version":
            return self._send(200, {"version": VERSION})
        if path == "/v1/models":
            args = self.state.args
            data = [{
                "id": name, "object": "model", "created": self.state.created, "owned_by": "vllm", "root": args.model,
                "parent": None, "max_model_len": args.max_model_len,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                "created": self.state.created, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}],
            } for name in args.served_model_names]
            if self.state.knobs.models_without_max_len:
                for card in data:
                    del card["max_model_len"]
            return self._send(200, {"object": "list", "data": data})
        if path == "/v1/chat/completions":
            return self._send(405, {"detail": "Method Not Allowed"})
        return self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        raw = self._read_body()
        if self._hang_if_needed():
            return
        path = self.path.split("?", 1)[0]
        if not self._authorized():
            return self._send(401, {"error": "Unauthorized"})
        if path != "/v1/chat/completions":
            return self._send(404 if path not in ("/health", "/v1/models", "/version") else 405,
                              {"detail": "Not Found" if path not in ("/health", "/v1/models", "/version") else "Method Not Allowed"})
        try:
            self._chat(raw)
        except HTTPError as exc:
            self._send(exc.status, exc.body, exc.headers)

    def _chat(self, raw: bytes) -> None:
        state, knobs = self.state, self.state.knobs
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, error_body(f"Invalid JSON body: {exc}", "BadRequestError", 400)) from exc
        chat = Chat(state)
        body, prompt, image = chat.validate(body)
        page, rotation = None, 0
        if image is not None:
            page = _pages().read_marker(image.top)
            if page is None:
                found = _pages().read_marker_any_rotation(image.full())
                if found:
                    page, rotation = found
        outcome = state.next_outcome(page)
        entry = {"page_marker": page, "model": body.get("model"), "temperature": body.get("temperature"),
                 "rotation": rotation, "max_tokens": body.get("max_tokens"), "outcome": outcome,
                 "image_size": list(image.size) if image is not None else None,
                 "chat_template_kwargs": body.get("chat_template_kwargs")}
        held = outcome == "hold" or outcome.startswith("hold:")
        if held:  # recorded on arrival, so the test sees it is held; then answered as the rest says
            state.record(entry)
            if not self._wait_for_release(page):
                return
            outcome = outcome.partition(":")[2] or "ok"

        def record(entry: dict) -> None:  # each request is recorded once
            if not held:
                state.record(entry)

        if outcome in PROXY_PAGES:  # the proxy in front of the server answers; the server never sees it
            record(entry)
            status, server, page_html = PROXY_PAGES[outcome]
            return self._send_html(status, page_html, server)
        if outcome == "401":
            record(entry)
            return self._send(401, {"error": "Unauthorized"})
        if outcome == "ok" and state.chance(knobs.rate_429):
            outcome = entry["outcome"] = "429"
        if outcome == "429":
            record(entry)
            raise HTTPError(429, error_body("Too many requests: the server is at capacity, retry later.",
                                            "RateLimitError", 429), {"retry-after": str(knobs.retry_after)})
        with state.capacity:
            if knobs.latency > 0:
                state.stopping.wait(knobs.latency)
            if outcome == "hang":
                record(entry)
                state.stopping.wait()
                self.close_connection = True
                return
            if outcome == "drop":
                record(entry)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if outcome == "ok" and state.chance(knobs.error_rate):
                outcome = entry["outcome"] = "500"
            if outcome == "500":
                record(entry)
                self._send(500, error_body("EngineCore encountered an issue. See stack trace (above) for the root cause.",
                                           "InternalServerError", 500))
                self._finish_chat()
                return
            try:
                status, response, extra = chat.respond(body, prompt, image, outcome, page, rotation)
            except HTTPError as exc:
                entry.update(outcome=str(exc.status), error=exc.body["error"]["message"])
                record(entry)
                raise
        if extra["finish_reason"] == "length" and entry["outcome"] == "ok":
            entry["outcome"] = "length"
        entry["finish_reason"] = extra["finish_reason"]
        record(entry)
        self._send(status, response)
        self._finish_chat()

    def _wait_for_release(self, page: int | None) -> bool:
        """Hold a request until the test creates `release` (or `release-<page>`) in FAKE_VLLM_STATE_DIR;
        False when the server stops first."""
        folder = Path(self.state.knobs.state_dir or ".")
        while not ((folder / "release").exists() or (folder / f"release-{page}").exists()):
            if self.state.stopping.wait(0.02):
                self.close_connection = True
                return False
        return True

    def _send_html(self, status: int, page: str, server: str) -> None:
        payload = page.encode()
        self.send_response_only(status)  # the proxy's own headers, not uvicorn's
        self.send_header("server", server)
        self.send_header("date", self.date_time_string())
        self.send_header("content-type", "text/html" if server != "cloudflare" else "text/html; charset=UTF-8")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        self._access(status)

    def _finish_chat(self) -> None:
        state, knobs = self.state, self.state.knobs
        with state.lock:
            state.chat_answered += 1
            answered = state.chat_answered
        if knobs.crash_after is not None and answered >= knobs.crash_after:
            self.wfile.flush()
            log("ERROR", "core_client.py:564", "Engine core proc EngineCore_DP0 died unexpectedly, shutting down client.")
            _emit(sys.stderr, "RuntimeError: Engine core died unexpectedly (FAKE_VLLM_CRASH_AFTER)")
            os._exit(1)  # like a crash: the EngineCore child is left behind
        if knobs.hang_after is not None and answered >= knobs.hang_after and not state.hung.is_set():
            log("WARNING", "core.py:780", "EngineCore stopped responding (FAKE_VLLM_HANG_AFTER)")
            state.hung.set()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # clients going away is normal
        super().handle_error(request, client_address)


# --------------------------------------------------------------------------------------------- main


def spawn_engine_core(args: ServeArgs) -> tuple[subprocess.Popen, int]:
    """The EngineCore and the read end of the pipe on which it reports ready."""
    size = str(args.other.get("tensor-parallel-size", "1"))
    workers = size if size.isdigit() and int(size) > 0 else "1"
    ready_read, ready_write = os.pipe()
    # Same process group as us (no new session): a group signal reaches it, a parent-only kill does not.
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--engine-core", str(os.getpid()), workers, str(ready_write),
         args.model],
        stdin=subprocess.DEVNULL,
        pass_fds=(ready_write,),
    )
    os.close(ready_write)
    return child, ready_read


def engine_ready(ready_fd: int, stop: threading.Event) -> bool:
    """Wait for the EngineCore's handshake, as vLLM's API server does before it serves: True when it
    reported ready; False when it died first or we were asked to stop."""
    while not stop.is_set():
        readable, _, _ = select.select([ready_fd], [], [], 0.1)
        if readable:
            return bool(os.read(ready_fd, 1))
    return False


def stop_child(child: subprocess.Popen | None, grace: float = 5.0) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def serve(argv: list[str]) -> int:
    knobs = Knobs()
    args = parse_serve_args(argv)
    stop = threading.Event()
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame) -> None:
        stop.set()

    if knobs.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def lifetime_guard() -> None:
        if not stop.wait(knobs.max_lifetime):
            log("WARNING", "fake_vllm.py:1", f"FAKE_VLLM_MAX_LIFETIME ({knobs.max_lifetime:g}s) reached; exiting")
            if child is not None and child.poll() is None:
                child.kill()
            os._exit(3)

    threading.Thread(target=lifetime_guard, daemon=True).start()

    log("INFO", "api_server.py:1839", f"vLLM API server version {VERSION}")
    non_default = {"model_tag": args.model, **({"host": args.host} if args.host else {}),
                   **({"port": args.port} if args.port != 8000 else {}),
                   **({"api_key": "<redacted>"} if args.api_key else {}),
                   **({"served_model_name": args.served_model_names} if args.served_model_names != [args.model] else {}),
                   **{k.replace("-", "_"): v for k, v in args.other.items()}}
    log("INFO", "utils.py:233", f"non-default args: {non_default}")

    def fail(case: str, engine_pid: int) -> int:
        for line in failure_text(case, args, engine_pid) or []:
            _emit(sys.stderr, line)
        stop_child(child)
        return 1

    if knobs.fail_with and knobs.fail_with not in FAIL_CASES:
        _emit(sys.stderr, f"FAKE_VLLM_FAIL_WITH: unknown case {knobs.fail_with!r}; known: {', '.join(FAIL_CASES)}")
        return 2
    if knobs.fail_with in IMMEDIATE_CASES:
        return fail(knobs.fail_with, 0)

    host = args.host or "0.0.0.0"
    handler = type("BoundHandler", (Handler,), {})
    server = Server((host, args.port), handler, bind_and_activate=False)
    try:
        server.server_bind()  # bound at once (as vLLM does) but not listening: connections are refused
    except OSError as exc:
        server.server_close()
        lines = failure_text("address_in_use", args, 0) or []
        for line in lines[:-1]:
            _emit(sys.stderr, line)
        _emit(sys.stderr, f"OSError: [Errno {exc.errno}] {exc.strerror}")
        return 1

    child, engine_ready_fd = spawn_engine_core(args)
    if knobs.require_hf_token and os.environ.get("HF_TOKEN", os.environ.get("HUGGING_FACE_HUB_TOKEN", "")) != knobs.require_hf_token:
        stop.wait(knobs.startup_delay)
        server.server_close()
        return fail("gated", child.pid)
    stopped = stop.wait(knobs.startup_delay)
    while knobs.hold_until and not stopped and not Path(knobs.hold_until).exists():
        stopped = stop.wait(0.05)
    if stopped or not engine_ready(engine_ready_fd, stop):
        server.server_close()
        if not stop.is_set():
            _emit(sys.stderr, "RuntimeError: Engine core initialization failed. See root cause above. "
                              "Failed core proc(s): {}")
            stop_child(child)
            return 1
        log("INFO", "launcher.py:110", "Shutting down FastAPI HTTP server.")
        stop_child(child)
        return 0
    if knobs.fail_with:
        server.server_close()
        return fail(knobs.fail_with, child.pid)

    state = DoubleState(args, knobs)
    handler.state = state
    shown = host if host != "0.0.0.0" else "0.0.0.0"
    log("INFO", "api_server.py:1912", f"Starting vLLM API server 0 on http://{shown}:{args.port}")
    log("INFO", "launcher.py:34", "Available routes are:")
    for route, methods in (("/health", "GET"), ("/version", "GET"), ("/v1/models", "GET"), ("/v1/chat/completions", "POST")):
        log("INFO", "launcher.py:42", f"Route: {route}, Methods: {methods}")
    uvicorn(f"Started server process [{os.getpid()}]")
    uvicorn("Waiting for application startup.")
    if not hold_phase(knobs, "api_server", stop):
        server.server_close()
        log("INFO", "launcher.py:110", "Shutting down FastAPI HTTP server.")
        stop_child(child)
        return 0
    uvicorn("Application startup complete.")
    server.server_activate()  # uvicorn listens once the application's start-up is complete
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()

    while not stop.wait(0.2):
        if child.poll() is not None and not stop.wait(0.5):  # a group signal reaches the child first
            log("ERROR", "core_client.py:564", "Engine core proc EngineCore_DP0 died unexpectedly, shutting down client.")
            state.stopping.set()
            return 1
    uvicorn("Shutting down")
    state.stopping.set()
    server.shutdown()
    server.server_close()
    uvicorn("Waiting for application shutdown.")
    uvicorn("Application shutdown complete.")
    stop_child(child)
    uvicorn(f"Finished server process [{os.getpid()}]")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--engine-core"]:
        return run_engine_core(int(argv[1]), int(argv[2]), int(argv[3]), *argv[4:5])
    if argv[:1] == ["--worker"]:
        return run_worker(argv[1], int(argv[2]), int(argv[3]))
    if argv[:1] in (["--version"], ["-v"]):
        print(VERSION)
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...")
        return 0 if argv else 2
    if argv[0] != "serve":
        _emit(sys.stderr, "usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...")
        _emit(sys.stderr, f"vllm: error: argument subparser: invalid choice: '{argv[0]}' (choose from 'chat', 'complete', 'serve', 'bench', 'collect-env', 'run-batch')")
        return 2
    return serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
