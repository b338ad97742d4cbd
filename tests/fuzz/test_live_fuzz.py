"""``sandbox fuzz`` against our server, in both protocol modes: it runs clean.

200 examples per mode (about 80 s each here); deeper by hand with
``sandbox fuzz URL --max-examples 1000 --steps 30``. The same machine in memory,
against the reference model itself and behind a proxy of the user's, as
docs/testing.md shows it.
"""

from __future__ import annotations

import json
from typing import Literal

import pytest
from _support import ServerThread
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from sandbox_cli import main as sandbox_main
from sandbox_conformance._fuzz import FuzzOptions, run_fuzz
from sandbox_proto.testing import Driver, Finding, ProtocolMachine, ReferenceDriver


@pytest.mark.parametrize("protocol", ["extended", "upstream"])
def test_our_server_runs_clean(protocol: Literal["extended", "upstream"]) -> None:
    with ServerThread(protocol=protocol) as server:
        result = run_fuzz(FuzzOptions(url=server.url, protocol=protocol, max_examples=200, steps=12, timeout=10.0))
    assert result.finding is None, f"{result.finding.report()}\n\n{result.reproduction}" if result.finding else ""
    assert result.checkpoints and result.snapshots
    assert result.stats.examples >= 200
    assert result.stats.rules["exec"] > 0 and result.stats.rules["attach"] > 0


def test_the_command_prints_progress_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread() as server:
        status = sandbox_main(["fuzz", server.url, "--max-examples", "3", "--steps", "4", "--seed", "7"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"fuzzing {server.url}" in out
    assert "seed 7" in out and "no finding" in out


def test_a_server_that_is_not_there_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    status = sandbox_main(["fuzz", "http://127.0.0.1:9", "--timeout", "2"])
    assert status == 1
    assert "cannot fuzz" in capsys.readouterr().out


# --------------------------------------------------------------------------
# in memory


in_memory = settings(max_examples=40, stateful_step_count=15, deadline=None, database=None)


@pytest.mark.parametrize("protocol", ["extended", "upstream"])
def test_the_model_agrees_with_itself(protocol: Literal["extended", "upstream"]) -> None:
    class Machine(ProtocolMachine):
        def make_driver(self) -> Driver:
            return ReferenceDriver(protocol=self.protocol)

    Machine.protocol = protocol
    run_state_machine_as_test(Machine, settings=in_memory)


def upper_case_errors(conn: str, frame: str) -> list[str]:
    """A proxy with a bug: it rewrites error messages."""
    obj = json.loads(frame)
    if obj.get("event") == "error":
        obj["message"] = obj["message"].upper()
    return [json.dumps(obj, separators=(",", ":"), ensure_ascii=False)]


def test_a_proxy_in_memory_is_fuzzed_as_the_docs_show() -> None:
    class ProxyMachine(ProtocolMachine):
        def make_driver(self) -> Driver:
            return ReferenceDriver(server_to_client=upper_case_errors)

    with pytest.raises(Finding) as caught:
        run_state_machine_as_test(
            # No explain phase: it replays the example hundreds of times to annotate the report.
            ProxyMachine,
            settings=settings(in_memory, phases=[Phase.generate, Phase.shrink], suppress_health_check=[*HealthCheck]),
        )
    assert '"event":"error"' in caught.value.problem
    assert caught.value.calls[0].startswith("session.create(")
