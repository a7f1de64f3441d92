"""The `vllm serve` command line and environment for a LocalServerConfig.

Secrets go in the environment, never on the command line, which every local user can read (`ps`,
/proc/<pid>/cmdline): vLLM reads its API key from `VLLM_API_KEY` when `--api-key` is absent
(vllm/envs.py, used by vllm/entrypoints/openai/api_server.py), and Hugging Face's token from `HF_TOKEN`.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm_control.config import LocalServerConfig


def build_command(config: LocalServerConfig) -> list[str]:
    """`VLLM_BIN serve MODEL [options that are set] VLLM_SERVE_ARGS...`."""
    argv = [config.vllm_bin, "serve", config.model]
    options: list[tuple[str, object]] = [
        ("--host", config.host or None),
        ("--port", config.port),
        ("--served-model-name", config.served_model_name if config.served_model_name != config.model else None),
        ("--gpu-memory-utilization", config.gpu_memory_utilization),
        ("--max-model-len", config.max_model_len),
        ("--tensor-parallel-size", config.tensor_parallel_size),
        ("--data-parallel-size", config.data_parallel_size),
    ]
    for flag, value in options:
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(config.serve_args)


def server_environment(config: LocalServerConfig, base: Mapping[str, str]) -> dict[str, str]:
    """`base` (this process's environment) with the server's secrets from the settings (and its GPUs). `VLLM_API_KEY` is
    exactly the settings' key (removed when there is none): the server must expect the key ocrsite sends.
    A Hugging Face token in `base` stays unless the settings have one."""
    env = {key: value for key, value in base.items() if key != "VLLM_API_KEY"}
    if config.api_key:
        env["VLLM_API_KEY"] = config.api_key
    if config.hf_token:
        env["HF_TOKEN"] = env["HUGGING_FACE_HUB_TOKEN"] = config.hf_token
    if config.cuda_visible_devices:  # a server of several on this machine: its own GPUs
        env["CUDA_VISIBLE_DEVICES"] = config.cuda_visible_devices
    return env


def redact(argv: list[str]) -> list[str]:
    """The command line with an API key hidden (one given in VLLM_SERVE_ARGS), for logs and status."""
    shown = list(argv)
    for index, arg in enumerate(shown):
        if arg == "--api-key" and index + 1 < len(shown):
            shown[index + 1] = "***"
        elif arg.startswith("--api-key="):
            shown[index] = "--api-key=***"
    return shown
