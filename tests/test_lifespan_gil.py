"""The site's start-up shortens the GIL switch interval (bench/live_latency_bench.py measured why)."""

from __future__ import annotations

import sys

import pytest
from asgiref.sync import sync_to_async

from ocrsite import lifespan
from vllm_control.models import VLMSettings


@pytest.mark.django_db(transaction=True)
async def test_startup_sets_the_switch_interval(settings):
    settings.OCRSITE_EMBEDDED_RUNNER = False
    await sync_to_async(VLMSettings.objects.create)(mode="builtin")
    default = sys.getswitchinterval()
    try:
        await lifespan.startup()
        assert sys.getswitchinterval() == pytest.approx(lifespan.GIL_SWITCH_INTERVAL_S) != default
        await lifespan.shutdown()
    finally:
        sys.setswitchinterval(default)
