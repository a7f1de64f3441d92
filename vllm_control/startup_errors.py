"""Turn vLLM's start-up output into a message a user can act on.

The patterns are the messages vLLM (0.6 - 0.11) and its dependencies really print; the raw log tail
stays available next to the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StartupError:
    kind: str
    message: str
    retryable: bool  # worth another attempt (memory may free up, a port may be released)


def not_found(vllm_bin: str) -> StartupError:
    return StartupError(
        "not_found",
        f"The vLLM executable '{vllm_bin}' was not found on PATH; install vllm (pip install -e '.[vllm]') "
        "on a GPU host, set VLLM_BIN, or switch to External or Built-in mode.",
        retryable=False,
    )


_MODEL_NAME = re.compile(r"([\w.\-]+/[\w.\-]+) is not a local folder")

_RULES: list[tuple[str, re.Pattern[str], str, bool]] = [
    (
        "no_gpu",
        re.compile(r"Failed to infer device type|No CUDA GPUs are available|Found no NVIDIA driver", re.I),
        "No usable GPU was found (vLLM: no CUDA GPUs available / failed to infer device type). Run vLLM on a "
        "GPU host and use External mode here, or switch to Built-in mode.",
        False,
    ),
    (
        "broken_install",
        re.compile(r"No module named 'vllm\._C'|vllm/_C\.[\w.]*so|undefined symbol", re.I),
        "The vLLM installation is broken (its compiled extension vllm._C cannot be loaded). Reinstall vllm "
        "with a build matching this machine's PyTorch and CUDA versions.",
        False,
    ),
    (
        "kv_cache",
        re.compile(
            r"larger than the maximum number of tokens that can be stored in KV cache"
            r"|KV cache is needed, which is larger than the available KV cache memory"
            r"|No available memory for the cache blocks",
            re.I,
        ),
        "The GPU memory left for the KV cache is too small for the model's maximum length. Set a lower "
        "maximum model length (max_model_len{estimate}) or a higher GPU memory utilization.",
        False,
    ),
    (
        "cuda_oom",
        re.compile(
            r"CUDA out of memory|OutOfMemoryError|Free memory on device .* is less than desired GPU memory utilization",
            re.I | re.S,
        ),
        "The GPU does not have enough free memory (CUDA out of memory / free memory is less than the desired "
        "GPU memory utilization). Free the GPU (another process may be using it), lower the GPU memory "
        "utilization or the maximum model length, or choose a smaller model.",
        True,
    ),
    (
        "address_in_use",
        re.compile(r"Address already in use|Errno 98", re.I),
        "vLLM could not listen on port {port}: the address is already in use. Stop the other server or choose "
        "another port.",
        True,
    ),
    (
        "gated",
        re.compile(r"GatedRepoError|Cannot access gated repo|is restricted\. You must have access", re.I),
        "The model '{model}' is gated on Hugging Face: accept its licence on huggingface.co and set a Hugging "
        "Face token (HF_TOKEN) in the settings.",
        False,
    ),
    (
        "model_not_found",
        re.compile(
            r"RepositoryNotFoundError|Repository Not Found|is not a local folder and is not a valid model identifier"
            r"|401 Client Error|Invalid repository ID",
            re.I,
        ),
        "The model '{model}' was not found: check the model id, or, if it is private or gated, set a Hugging "
        "Face token (HF_TOKEN) in the settings.",
        False,
    ),
]

_ESTIMATE = re.compile(r"estimated maximum model length is (\d+)", re.I)


def classify(lines: Iterable[str], *, model: str, port: int | None, returncode: int | None) -> StartupError:
    """The clear message for a vLLM process that exited before it became ready."""
    text = "\n".join(lines)
    for kind, pattern, template, retryable in _RULES:
        if pattern.search(text):
            estimate = _ESTIMATE.search(text)
            return StartupError(
                kind,
                template.format(
                    model=model,
                    port=port if port is not None else "?",
                    estimate=f"; vLLM estimates at most {estimate.group(1)} fits" if estimate else "",
                ),
                retryable,
            )
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    detail = f" Last output: {last}" if last else " It printed nothing."
    return StartupError("exited", f"vLLM exited with code {returncode} before it became ready.{detail}", True)
