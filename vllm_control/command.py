"""The `vllm serve` command line for a LocalServerConfig."""

from __future__ import annotations

from vllm_control.config import LocalServerConfig


def build_command(config: LocalServerConfig) -> list[str]:
    """`VLLM_BIN serve MODEL [options that are set] VLLM_SERVE_ARGS...`."""
    argv = [config.vllm_bin, "serve", config.model]
    options: list[tuple[str, object]] = [
        ("--host", config.host or None),
        ("--port", config.port),
        ("--served-model-name", config.served_model_name if config.served_model_name != config.model else None),
        ("--api-key", config.api_key or None),
        ("--gpu-memory-utilization", config.gpu_memory_utilization),
        ("--max-model-len", config.max_model_len),
        ("--tensor-parallel-size", config.tensor_parallel_size),
        ("--data-parallel-size", config.data_parallel_size),
    ]
    for flag, value in options:
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(config.serve_args)


def redact(argv: list[str]) -> list[str]:
    """The command line with the API key hidden, for logs and status."""
    shown = list(argv)
    for index, arg in enumerate(shown[:-1]):
        if arg == "--api-key":
            shown[index + 1] = "***"
    return shown
