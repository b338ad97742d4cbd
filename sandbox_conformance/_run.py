"""Play the vectors one after another against one server, each to a verdict within a bounded time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from websockets.exceptions import WebSocketException

from ._vectors import IDLE_TIMEOUT, VECTORS, Need, Vector
from ._wire import DEFAULT_IDLE_SWEEP, DEFAULT_TIMEOUT, Failed, ProtocolChoice, Runner, Skipped

__all__ = ["Result", "Verdict", "run_vectors"]

Verdict = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True, slots=True)
class Result:
    vector: str
    title: str
    verdict: Verdict
    reason: str = ""

    def line(self) -> str:
        """The runner's report line: verdict, name, title and the reason if any."""
        text = f"{self.verdict}  {self.vector:<11} {self.title}"
        return f"{text}: {self.reason}" if self.reason else text


async def run_vectors(
    url: str,
    *,
    protocol: ProtocolChoice = "auto",
    timeout: float = DEFAULT_TIMEOUT,
    idle_sweep: float = DEFAULT_IDLE_SWEEP,
    headers: dict[str, str] | None = None,
    include_ref: bool = True,
    include_http: bool = False,
    only: Sequence[str] = (),
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Play the vectors (all, or those named in ``only``) against ``url``; one :class:`Result` each.

    ``timeout`` bounds every wait for a frame, a handshake or an HTTP answer;
    ``idle_sweep`` is how much later than its idle timeout the server may
    expire a sandbox (CV-29). ``on_result`` sees each result as it comes.
    """
    runner = Runner(url, protocol=protocol, timeout=timeout, idle_sweep=idle_sweep, headers=headers)
    wanted = {name.upper() for name in only}
    results: list[Result] = []
    for vector in VECTORS:
        if wanted and vector.name.upper() not in wanted:
            continue
        result = await _play(runner, vector, include_ref=include_ref, include_http=include_http)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


async def _play(runner: Runner, vector: Vector, *, include_ref: bool, include_http: bool) -> Result:
    if vector.check is None:
        return Result(vector.name, vector.title, "SKIP", vector.skip)
    if vector.http and not include_http:
        return Result(vector.name, vector.title, "SKIP", "HTTP endpoint, not requested (--http)")
    if vector.ref and not include_ref:
        return Result(vector.name, vector.title, "SKIP", "reference-server behaviour that upstream lacks (--no-ref)")
    # A budget for the whole vector on top of the per-frame timeouts: a server that keeps
    # talking without ever finishing (endless output) must not hang the run either.
    budget = runner.timeout * 8 + runner.idle_sweep + IDLE_TIMEOUT
    try:
        async with asyncio.timeout(budget):
            for need in vector.needs:
                await _require(runner, need)
            await vector.check(runner)
    except Failed as exc:
        return Result(vector.name, vector.title, "FAIL", str(exc))
    except Skipped as exc:
        return Result(vector.name, vector.title, "SKIP", str(exc))
    except TimeoutError:
        return Result(vector.name, vector.title, "FAIL", f"did not finish within {budget:g}s")
    except (OSError, WebSocketException) as exc:
        return Result(vector.name, vector.title, "FAIL", f"{type(exc).__name__}: {exc}")
    finally:
        await runner.cleanup()
    note = "upstream fails this one" if vector.ref else ""
    return Result(vector.name, vector.title, "PASS", note)


async def _require(runner: Runner, need: Need) -> None:
    """Skip unless the server, asked, says it has (or lacks) the storage the vector needs."""
    what = "checkpoints" if need.endswith("checkpoints") else "snapshots"
    enabled = await (runner.checkpoints_enabled() if what == "checkpoints" else runner.snapshots_enabled())
    if enabled != (not need.startswith("no ")):
        raise Skipped(f"server has {what} {'enabled' if enabled else 'disabled'}")
