"""vLLM's start-up phases, read from its log, so a first start of ten minutes does not look hung.

`PHASES` is the table, in the order a start usually goes through them. Each line vLLM prints is matched
against every phase's patterns; the last phase whose pattern matched is the one vLLM is in. Phases may
come back (torch.compile runs inside the memory-profiling pass, so `profiling` resumes after
`compiling`), and a phase that never shows (a model already downloaded, `--enforce-eager`) is skipped.

The patterns are vLLM's own log messages (vLLM 0.6 to 0.11+, V0 and V1 engines), searched anywhere in
the line so the logger's prefix (`(EngineCore_DP0 pid=12) INFO 10-26 21:47:44 [file.py:N]`) and tqdm's
carriage returns do not matter:
- weight_utils.py: "Using model weights format [...]", "Time spent downloading weights for M: N seconds"
- gpu_model_runner.py / model_runner.py: "Starting to load model M...", "Model loading took N GiB ...",
  "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE)" (tqdm), "Graph capturing finished in N secs"
- default_loader.py: "Loading safetensors checkpoint shards" (tqdm), "Loading weights took N seconds"
- compilation/backends.py, monitor.py: "... for vLLM's torch.compile", "Dynamo bytecode transform time",
  "Compiling a graph for ...", "torch.compile takes N s in total"
- gpu_worker.py, kv_cache_utils.py: "Memory profiling takes", "Available KV cache memory: N GiB",
  "GPU KV cache size: N tokens"
- v1/engine/core.py: "init engine (profile, create kv cache, warmup model) took N seconds"
- api_server.py and uvicorn: "Starting vLLM API server 0 on http://...", "Application startup complete."
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class StartupPhase(StrEnum):
    LAUNCHING = "launching"
    LOADING = "loading"
    DOWNLOADING = "downloading"
    PROFILING = "profiling"
    COMPILING = "compiling"
    CAPTURING = "capturing"
    API_SERVER = "api_server"
    API_UP = "api_up"


@dataclass(frozen=True)
class PhaseRule:
    phase: StartupPhase
    label: str  # what the status shows: "vLLM is <label>"
    patterns: tuple[re.Pattern[str], ...]


def _rules(*patterns: str) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(pattern) for pattern in patterns)


P = StartupPhase
PHASES: tuple[PhaseRule, ...] = (
    # Set when the process is spawned; these lines only confirm it.
    PhaseRule(P.LAUNCHING, "starting vLLM", _rules(r"vLLM API server version ", r"Initializing an? (V\d )?LLM engine")),
    PhaseRule(P.LOADING, "loading weights", _rules(
        r"Starting to load model ",
        r"Time spent downloading weights for ",  # the download is over; the shards are read next
        r"Loading \w+ checkpoint shards",
        r"Loading weights took ",
    )),
    PhaseRule(P.DOWNLOADING, "downloading weights", _rules(r"Using model weights format ")),
    PhaseRule(P.PROFILING, "profiling memory / KV cache", _rules(
        r"Model loading took ",  # the model is in memory; the profiling run comes next
        r"torch\.compile (takes|took) [\d.]+ s in total",  # compiling was part of the profiling run
        r"Memory profiling takes ",
        r"Available KV cache memory: ",
        r"GPU KV cache size: ",
        r"# (GPU|cuda) blocks: ",
    )),
    PhaseRule(P.COMPILING, "compiling (torch.compile)", _rules(
        r"for vLLM's torch\.compile",
        r"Dynamo bytecode transform time",
        r"Compiling a graph for ",
        r"Directly load the compiled graph",
    )),
    PhaseRule(P.CAPTURING, "capturing CUDA graphs", _rules(
        r"Capturing CUDA graphs",
        r"Capturing cudagraphs for decoding",
        r"Capturing the model for CUDA graphs",
    )),
    PhaseRule(P.API_SERVER, "starting the API server", _rules(
        r"Graph capturing finished in ",
        r"init engine \(profile, create kv cache, warmup model\) took ",
        r"Starting vLLM API server",
        r"Waiting for application startup",
    )),
    PhaseRule(P.API_UP, "API server up", _rules(r"Application startup complete")),
)

LABELS: dict[StartupPhase, str] = {rule.phase: rule.label for rule in PHASES}


def phase_of(line: str) -> StartupPhase | None:
    """The phase this log line says vLLM has entered, or None when it says nothing about the phase."""
    for rule in PHASES:
        if any(pattern.search(line) for pattern in rule.patterns):
            return rule.phase
    return None


def label(phase: str | None) -> str | None:
    """The phase's words, e.g. "capturing CUDA graphs" (None for no phase or one this version does not know)."""
    try:
        return LABELS[StartupPhase(phase)] if phase else None
    except ValueError:
        return None
