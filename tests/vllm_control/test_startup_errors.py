"""Start-up failures become clear messages: vLLM's real output (printed by the double) through the supervisor."""

from __future__ import annotations

import pytest

from tests.vllm_control.conftest import make_local_config
from vllm_control.errors import ModelServerUnavailable
from vllm_control.startup_errors import classify
from vllm_control.status import ServerState
from vllm_control.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)

CASES = [
    ("no_gpu", "No usable GPU was found", False),
    ("no_cuda_gpus", "No usable GPU was found", False),
    ("cuda_oom", "The GPU does not have enough free memory", True),
    ("free_memory", "The GPU does not have enough free memory", True),
    ("kv_cache", "Set a lower maximum model length (max_model_len; vLLM estimates at most 12345 fits)", False),
    ("kv_cache_v0", "Set a lower maximum model length", False),
    ("address_in_use", "the address is already in use", True),
    ("model_not_found", "was not found: check the model id, or, if it is private or gated, set a Hugging Face token", False),
    ("gated", "is gated on Hugging Face: accept its licence on huggingface.co and set a Hugging Face token", False),
    ("broken_install", "The vLLM installation is broken", False),
]


@pytest.mark.parametrize(("case", "expected", "retryable"), CASES)
async def test_each_start_up_failure_has_a_clear_message(case, expected, retryable, port, tmp_path, test_marker, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL_WITH", case)
    supervisor = Supervisor(make_local_config(port, max_restart_attempts=0), data_dir=tmp_path)
    await supervisor.start()
    try:
        with pytest.raises(ModelServerUnavailable) as raised:
            await supervisor.wait_ready(30)
        assert expected in raised.value.message
        assert ("Gave up after 0 restart attempt(s)" in raised.value.message) == retryable
        assert supervisor.state == ServerState.FAILED
        assert any("Error" in line for line in supervisor.log_tail)  # the raw output stays available
    finally:
        await supervisor.stop()


def test_unknown_output_names_the_exit_code_and_last_line():
    error = classify(["loading", "Something unexpected", ""], model="m", port=1, returncode=3)
    assert error.kind == "exited" and error.retryable
    assert error.message == "vLLM exited with code 3 before it became ready. Last output: Something unexpected"


def test_a_cpu_build_warning_about_vllm_c_is_not_a_broken_install():
    lines = [
        "WARNING [_custom_ops.py:21] Failed to import from vllm._C with ModuleNotFoundError(\"No module named 'vllm._C'\")",
        "RuntimeError: Failed to infer device type",
    ]
    assert classify(lines, model="m", port=1, returncode=1).kind == "no_gpu"
