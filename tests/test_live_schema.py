"""Every live event is declared as a TypedDict with a literal `type`, and payloads match their declaration."""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Literal, get_args, get_origin, get_type_hints, is_typeddict

import pytest

from ocrsite import live
from scans import events as scan_events
from tests.support import REPO
from vllm_control import events
from vllm_control.status import ServerState, ServerStatus

DECLARED: tuple[type, ...] = scan_events.SCAN_EVENT_TYPES + events.SERVER_EVENT_TYPES + live.LIVE_EVENT_TYPES
EMITTING_MODULES = ("ocrsite/live.py", "scans/progress.py", "scans/selectors.py", "scans/consumers.py", "vllm_control/events.py", "vllm_control/consumers.py")


def event_type_name(declaration: type) -> str:
    (name,) = get_args(get_type_hints(declaration)["type"])
    return name


EVENTS_BY_TYPE: dict[str, type] = {event_type_name(d): d for d in DECLARED}


def _check_value(value, hint, where: str) -> None:
    origin = get_origin(hint)
    if hint is type(None):
        assert value is None, f"{where}: expected None, got {value!r}"
    elif origin is Literal:
        assert value in get_args(hint), f"{where}: {value!r} not one of {get_args(hint)}"
    elif origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                _check_value(value, option, where)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: {value!r} matches none of {hint}: {errors}")
    elif origin is list:
        assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
        (item,) = get_args(hint) or (typing.Any,)
        for index, element in enumerate(value):
            _check_value(element, item, f"{where}[{index}]")
    elif origin is dict or hint is dict:
        assert isinstance(value, dict), f"{where}: expected a dict, got {value!r}"
    elif is_typeddict(hint):
        check_shape(value, hint, where)
    elif hint is typing.Any:
        pass
    elif hint is bool:
        assert isinstance(value, bool), f"{where}: expected bool, got {value!r}"
    elif hint is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: expected int, got {value!r}"
    elif hint is float:  # JSON does not tell 1.0 from 1
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: expected float, got {value!r}"
    elif hint is str:
        assert isinstance(value, str), f"{where}: expected str, got {value!r}"
    else:
        raise AssertionError(f"{where}: the checker does not know {hint!r}")


def check_shape(value, declaration: type, where: str = "payload") -> None:
    assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
    hints = get_type_hints(declaration)
    assert set(value) == set(hints), f"{where}: keys {sorted(value)} != declared {sorted(hints)}"
    for key, hint in hints.items():
        _check_value(value[key], hint, f"{where}.{key}")


def check_event(payload: dict) -> str:
    """Asserts that `payload` (as sent, and after a JSON round trip) matches its declared event; returns its type."""
    assert isinstance(payload, dict) and "type" in payload, payload
    declaration = EVENTS_BY_TYPE.get(payload["type"])
    assert declaration is not None, f"undeclared event type {payload['type']!r}"
    check_shape(payload, declaration, payload["type"])
    check_shape(json.loads(json.dumps(payload)), declaration, payload["type"])
    return payload["type"]


# --- the checker itself ----------------------------------------------------------------------------


def _server_status(**overrides) -> ServerStatus:
    values = dict(mode="local", state=ServerState.READY, model="m", pid=12, port=8000, log_tail=["line <b>"])
    values.update(overrides)
    return ServerStatus(**values)


def test_checker_rejects_missing_extra_and_mistyped_fields():
    good = events.status_event(_server_status(), detailed=True)
    check_event(good)
    missing = json.loads(json.dumps(good))
    del missing["status"]["pid"]
    extra = json.loads(json.dumps(good))
    extra["status"]["secret"] = "x"
    mistyped = json.loads(json.dumps(good))
    mistyped["status"]["pid"] = "12"
    bad_literal = json.loads(json.dumps(good))
    bad_literal["status"]["state"] = "exploded"
    undeclared = {"type": "scan.whatever"}
    for payload in (missing, extra, mistyped, bad_literal, undeclared):
        with pytest.raises(AssertionError):
            check_event(payload)


def test_every_declared_event_has_a_unique_literal_type():
    names = [event_type_name(d) for d in DECLARED]
    assert len(names) == len(set(names))
    assert {"scan.snapshot", "scan.progress", "page.update", "scans.list_item", "scans.snapshot",
            "server.status", "server.snapshot", "server.endpoints", "socket.error"} == set(names)


def test_every_type_literal_in_the_emitting_code_is_declared():
    """A payload built anywhere in the live modules uses a declared `type` (static check of the source)."""
    found = set()
    for module in EMITTING_MODULES:
        source = (REPO / module).read_text()
        found |= set(re.findall(r"""type=["']([a-z_]+\.[a-z_]+)["']""", source))
        found |= set(re.findall(r"""["']type["']\s*:\s*["']([a-z_]+\.[a-z_]+)["']""", source))
    assert found, "the scan found no event types: the pattern is out of date"
    assert found <= set(EVENTS_BY_TYPE), f"emitted but not declared: {found - set(EVENTS_BY_TYPE)}"


def test_server_status_variants_hide_details_from_the_public():
    status = _server_status(
        last_health_check="2025-01-01T00:00:00+00:00", latency_ms=3, uptime_s=1.5, state=ServerState.FAILED,
        last_error="vLLM exited with code 1 before it became ready. Last output: /srv/models/secret-path: denied",
        base_url="http://user:pw@gpu:8000/v1",
    )
    detailed = events.status_event(status, detailed=True)
    public = events.snapshot_event(status, detailed=False)
    check_event(detailed)
    check_event(public)
    assert detailed["status"]["log_tail"] == ["line <b>"]
    assert "secret-path" in detailed["status"]["last_error"]
    assert public["status"]["log_tail"] == []
    assert public["status"]["last_error"] == events.PUBLIC_ERROR
    assert public["status"]["pid"] == 12 and public["status"]["state"] == "failed"
    for variant in (detailed, public):
        assert variant["status"]["base_url"] == "http://***@gpu:8000/v1"
        assert "pw" not in json.dumps(variant)
    healthy = events.status_event(_server_status(), detailed=False)
    assert healthy["status"]["last_error"] is None


def test_urls_in_detailed_errors_and_log_lines_lose_their_credentials():
    status = _server_status(
        last_error="Cannot connect to the model server at https://ocr:s3cret@gpu.example/v1: refused.",
        log_tail=["proxy http://a:b@c:1/x up", "plain line"],
    )
    shown = events.status_payload(status, detailed=True)
    assert shown["last_error"] == "Cannot connect to the model server at https://***@gpu.example/v1: refused."
    assert shown["log_tail"] == ["proxy http://***@c:1/x up", "plain line"]


def test_server_status_accepts_every_state():
    for state in ServerState:
        check_event(events.status_event(_server_status(state=state, pid=None, port=None), detailed=False))



def test_endpoint_events_match_their_declaration_and_hide_url_credentials():
    from vllm_control.status import EndpointStatus

    statuses = [
        EndpointStatus(key="main", name="gpu1", kind="local", base_url="http://127.0.0.1:8000/v1", state=ServerState.READY,
                       capacity=16, in_flight=3, pages_per_s=4.5, latency_ms=950.0, port=8000, cuda_visible_devices="0"),
        EndpointStatus(key="server-2", name="http://u:pw@gpu2:8000/v1", kind="external", base_url="http://u:pw@gpu2:8000/v1",
                       state=ServerState.UNHEALTHY, capacity=8, last_error="Cannot connect to http://u:pw@gpu2:8000/v1."),
    ]
    event = events.endpoints_event(statuses)
    check_event(event)
    assert "pw" not in json.dumps(event)
    assert event["endpoints"][1]["base_url"] == "http://***@gpu2:8000/v1"
