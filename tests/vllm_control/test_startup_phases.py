"""vLLM's start-up phases: the parser over vLLM's real log lines, and the supervisor following the double,
which prints vLLM 0.11's start-up lines and can be held in each phase (FAKE_VLLM_HOLD_PHASES)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.vllm_control.conftest import make_local_config
from vllm_control import runtime
from vllm_control.config import resolve_config
from vllm_control.errors import ModelServerUnavailable
from vllm_control.models import VLMSettings
from vllm_control.startup_phases import PHASES, StartupPhase, label, phase_of
from vllm_control.status import ServerState
from vllm_control.supervisor import Supervisor, read_shared_state

P = StartupPhase

# Lines as vLLM printed them (vLLM 0.6 to 0.11, V0 and V1 engines, one GPU and tensor-parallel; from
# logs people posted in vLLM's and other projects' issues), with the phase each one starts.
REAL_LINES = [
    ("(APIServer pid=2261) INFO 10-26 21:47:30 [api_server.py:1839] vLLM API server version 0.11.0", P.LAUNCHING),
    ("INFO 03-12 14:55:27 [llm_engine.py:235] Initializing a V0 LLM engine (v0.7.4.dev390+gdebd6bbf) with config: "
     "model='models/llama3.1-8B-INT8', speculative_config=None", P.LAUNCHING),
    ("(EngineCore_0 pid=1997) INFO 09-22 15:52:36 [gpu_model_runner.py:1953] Starting to load model "
     "/var/lib/gpustack/cache/huggingface/unsloth/gemma-3-4b-it...", P.LOADING),
    ("INFO 03-22 12:15:21 [weight_utils.py:257] Using model weights format ['*.safetensors']", P.DOWNLOADING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:44 [weight_utils.py:304] Using model weights format "
     "['*.safetensors']", P.DOWNLOADING),
    ("INFO 03-22 12:23:49 [weight_utils.py:273] Time spent downloading weights for "
     "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B: 508.576789 seconds", P.LOADING),
    ("Loading safetensors checkpoint shards:  67% Completed | 2/3 [00:00<00:00,  3.58it/s]", P.LOADING),
    ("Loading fastsafetensors checkpoint shards:  20% Completed | 1/5 [00:00<00:02,  1.77it/s]", P.LOADING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:45 [default_loader.py:267] Loading weights took 1.27 seconds",
     P.LOADING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:46 [gpu_model_runner.py:1975] Model loading took 7.6785 GiB "
     "and 2.195456 seconds", P.PROFILING),
    ("(Worker_TP0 pid=34322) INFO 05-06 20:59:59 [gpu_model_runner.py:4879] Model loading took 12.66 GiB memory "
     "and 31.657031 seconds", P.PROFILING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:50 [backends.py:538] Using cache directory: "
     "/home/matt/.cache/vllm/torch_compile_cache/f78161e411/rank_0_0/backbone for vLLM's torch.compile",
     P.COMPILING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:50 [backends.py:549] Dynamo bytecode transform time: 3.70 s",
     P.COMPILING),
    ("INFO 03-22 12:24:19 [backends.py:144] Compiling a graph for general shape takes 22.07 s", P.COMPILING),
    ("(EngineCore pid=1894) INFO 04-05 18:41:51 [backends.py:390] Compiling a graph for compile range (1, 8192) "
     "takes 6.06 s", P.COMPILING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:56 [backends.py:161] Directly load the compiled graph(s) for "
     "dynamic shape from the cache, took 5.920 s", P.COMPILING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:47:59 [monitor.py:34] torch.compile takes 3.70 s in total",
     P.PROFILING),
    ("(EngineCore pid=1623438) INFO 04-13 22:09:34 [monitor.py:48] torch.compile took 1.61 s in total", P.PROFILING),
    ("INFO 03-21 20:15:45 [worker.py:267] Memory profiling takes 34.26 seconds", P.PROFILING),
    ("(EngineCore_0 pid=3856547) INFO 10-26 21:48:00 [gpu_worker.py:276] Available KV cache memory: 18.38 GiB",
     P.PROFILING),
    ("(EngineCore_DP0 pid=387) INFO 03-08 16:44:29 [kv_cache_utils.py:1314] GPU KV cache size: 188,640 tokens",
     P.PROFILING),
    ("INFO 11-28 05:16:07 gpu_executor.py:122] # GPU blocks: 123055, # CPU blocks: 8192", P.PROFILING),
    ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|████▌     | 23/51 [00:00<00:00, 51.07it/s]",
     P.CAPTURING),
    ("Capturing CUDA graphs (decode, FULL):  12%|█▏        | 6/51 [01:41<06:11,  8.26s/it]", P.CAPTURING),
    ("INFO 11-28 05:16:09 model_runner.py:1329] Capturing the model for CUDA graphs. This may lead to unexpected "
     "consequences if the model is not static.", P.CAPTURING),
    ("INFO 11-28 05:16:29 model_runner.py:1456] Graph capturing finished in 20 secs.", P.API_SERVER),
    ("(EngineCore pid=9228) INFO 09-22 01:01:06 [model_runner.py:960] Graph capturing finished in 5 secs, took "
     "0.11 GiB", P.API_SERVER),
    ("(EngineCore_DP0 pid=412) INFO 10-26 21:48:10 [core.py:210] init engine (profile, create kv cache, warmup "
     "model) took 26.12 seconds", P.API_SERVER),
    ("(APIServer pid=2261) INFO 10-26 21:48:11 [api_server.py:1912] Starting vLLM API server 0 on "
     "http://0.0.0.0:8000", P.API_SERVER),
    ("(APIServer pid=2261) INFO:     Waiting for application startup.", P.API_SERVER),
    ("(APIServer pid=2261) INFO:     Application startup complete.", P.API_UP),
]

SILENT_LINES = [  # lines that say nothing about the phase
    "(APIServer pid=2261) INFO 10-26 21:48:11 [launcher.py:42] Route: /v1/chat/completions, Methods: POST",
    "(EngineCore_0 pid=1997) INFO 09-22 15:52:36 [cuda.py:328] Using Flash Attention backend on V1 engine.",
    'INFO:     127.0.0.1:52544 - "GET /health HTTP/1.1" 200 OK',
    "(EngineCore_DP0 pid=412) WARNING 10-26 21:48:00 [compilation.py:1233] Capping cudagraph capture sizes",
    "",
]

# What the supervisor sees while the double starts, one phase change at a time.
DOUBLE_PHASES = [P.LAUNCHING, P.LOADING, P.DOWNLOADING, P.LOADING, P.PROFILING, P.COMPILING, P.PROFILING,
                 P.CAPTURING, P.API_SERVER, P.API_UP]
# The double's steps (FAKE_VLLM_HOLD_PHASES) and the phase each one holds the server in.
HELD_STEPS = [("load", P.LOADING), ("download", P.DOWNLOADING), ("compile", P.COMPILING),
              ("profile", P.PROFILING), ("capture", P.CAPTURING), ("api_server", P.API_SERVER)]

pytestmark = pytest.mark.timeout(90)


class ManualClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("line", "phase"), REAL_LINES)
def test_real_vllm_lines_name_their_phase(line, phase):
    assert phase_of(line) == phase


@pytest.mark.parametrize("line", SILENT_LINES)
def test_other_lines_name_no_phase(line):
    assert phase_of(line) is None


def test_every_phase_has_words():
    assert [rule.phase for rule in PHASES] == list(StartupPhase)
    assert label("capturing") == "capturing CUDA graphs"
    assert label(None) is None and label("a-phase-of-a-later-version") is None


@pytest.fixture
async def supervised(tmp_path, test_marker, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_STATE_DIR", str(tmp_path / "double"))
    created: list[Supervisor] = []

    def make(port: int, *, clock=time.monotonic, **overrides) -> Supervisor:
        supervisor = Supervisor(make_local_config(port, **overrides), data_dir=tmp_path, clock=clock)
        created.append(supervisor)
        return supervisor

    yield make
    for supervisor in created:
        await supervisor.stop()


async def test_the_supervisor_follows_the_phases_in_order(supervised, port):
    supervisor = supervised(port)
    seen: list[str | None] = []
    supervisor.add_listener(lambda status: seen.append(status.phase) if status.phase != (seen or [None])[-1] else None)
    await supervisor.start()
    status = await supervisor.wait_ready(30)
    assert [phase for phase in seen if phase] == [str(phase) for phase in DOUBLE_PHASES]
    assert status.phase is None and status.phase_label is None  # ready: no start-up phase any more


async def test_each_held_phase_is_shown_with_its_time(supervised, port, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_HOLD_PHASES", "all")
    clock = ManualClock()
    supervisor = supervised(port, clock=clock)
    gates = tmp_path / "double"
    gates.mkdir()
    await supervisor.start()
    for step, phase in HELD_STEPS:
        await wait_for(lambda: supervisor.phase == phase, 30, f"phase {phase}")
        clock.advance(7)
        status = supervisor.status()
        assert status.state == ServerState.STARTING
        assert (status.phase, status.phase_label, status.phase_elapsed_s) == (str(phase), label(phase), 7.0)
        assert status.phase_started_at
        (gates / f"continue-{step}").touch()
    assert (await supervisor.wait_ready(30)).state == ServerState.READY


async def test_a_start_timeout_names_the_phase(supervised, port, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_HOLD_PHASES", "capture")
    clock = ManualClock()
    supervisor = supervised(port, clock=clock, start_timeout_s=600, max_restart_attempts=0)
    await supervisor.start()
    await wait_for(lambda: supervisor.phase == P.CAPTURING, 30, "capturing CUDA graphs")
    clock.advance(601)  # ten minutes in that phase
    with pytest.raises(ModelServerUnavailable) as raised:
        await supervisor.wait_ready(30)
    assert supervisor.state == ServerState.FAILED
    assert ("vLLM did not become ready within 600 s; it was in phase 'capturing CUDA graphs' for 601 s."
            in raised.value.message)


async def test_another_process_sees_the_phase(supervised, port, monkeypatch, settings, tmp_path):
    """`vllm_status` and ocr_worker processes do not run the server: they read the owner's state file."""
    monkeypatch.setenv("FAKE_VLLM_HOLD_PHASES", "compile")
    settings.DATA_DIR = tmp_path
    supervisor = supervised(port)
    await supervisor.start()
    await wait_for(lambda: supervisor.phase == P.COMPILING, 30, "compiling")
    assert read_shared_state(tmp_path, port)["phase"] == "compiling"
    monkeypatch.setattr(runtime, "_supervisor", None)  # as in a process without a supervisor
    row = VLMSettings(mode="local", port=port, host="127.0.0.1")
    status = await runtime.current_status(resolve_config(row, environ={}))
    assert (status.state, status.phase, status.phase_label) == (ServerState.STARTING, "compiling", "compiling (torch.compile)")
    assert status.phase_elapsed_s is not None and status.phase_elapsed_s >= 0
    await supervisor.stop()
    assert read_shared_state(tmp_path, port) is None
