"""``sandbox fuzz URL``: the protocol state machine of :mod:`sandbox_proto.testing` against a live server.

Hypothesis draws sequences of client actions (:class:`~sandbox_proto.testing.ProtocolMachine`);
each is played over real WebSockets and every reply is compared with what the
reference model says a conforming server sends. A failure is shrunk to the
shortest sequence hypothesis finds and reported as a transcript and as a
Python script that replays it (:class:`FuzzSession`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Literal, TextIO

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.control import current_build_context
from hypothesis.stateful import get_state_machine_test
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from _sandbox_anyio import default_ssl_context
from sandbox_proto import LocalProtocolError, websocket_base
from sandbox_proto.testing import (
    Action,
    Closed,
    Driver,
    DriverError,
    Finding,
    ProtocolMachine,
    ProtocolSession,
    ReferenceDriver,
)

from ._cli import add_header_option, parsed_headers
from ._wire import Failed, Runner

__all__ = ["FuzzSession", "WebSocketDriver", "fuzz_main", "run_fuzz"]

Mode = Literal["extended", "upstream"]

DEFAULT_EXAMPLES = 100
DEFAULT_STEPS = 20
#: Seconds to wait for each frame or handshake.
DEFAULT_TIMEOUT = 10.0
DEFAULT_SHRINK_BUDGET = 60.0
#: Seconds between two progress lines.
PROGRESS_EVERY = 5.0


class WebSocketDriver:
    """A :class:`~sandbox_proto.testing.Driver` over real WebSockets (``websockets``' blocking client)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT, headers: dict[str, str] | None = None) -> None:
        self.base = websocket_base(url)
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._ssl = default_ssl_context(self.base, None)
        self._conns: dict[str, ClientConnection] = {}

    def open(self, conn: str, path: str) -> None:
        old = self._conns.pop(conn, None)
        if old is not None:
            old.close_socket()
        try:
            self._conns[conn] = connect(
                self.base + path,
                open_timeout=self.timeout,
                additional_headers=self.headers,
                max_size=None,
                ssl=self._ssl,
                proxy=None,
                legacy=True,  # a connection object of our own, not a context manager
            )
        except InvalidStatus as exc:
            raise DriverError(f"HTTP {exc.response.status_code}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise DriverError(f"{type(exc).__name__}: {exc}") from None

    def send(self, conn: str, text: str) -> None:
        ws = self._conns.get(conn)
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed, OSError):  # the next receive reports the close
            ws.send(text)

    def receive(self, conn: str, timeout: float) -> str | Closed | None:
        ws = self._conns.get(conn)
        if ws is None:
            return Closed(1006)
        try:
            message = ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except ConnectionClosed as exc:
            return Closed(exc.rcvd.code if exc.rcvd is not None else 1006)
        if isinstance(message, bytes):
            return f"<binary frame of {len(message)} bytes>"  # no JSON: the matcher reports it
        return message

    def drop(self, conn: str) -> None:
        ws = self._conns.pop(conn, None)
        if ws is None:
            return
        with contextlib.suppress(OSError):
            # Linger 0: closing sends a reset, no close frame and no FIN, as a failed network does.
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.close_socket()

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        conns, self._conns = self._conns, {}
        for ws in conns.values():
            ws.close_socket()


class FuzzSession(ProtocolSession):
    """A :class:`~sandbox_proto.testing.ProtocolSession` on a live server: what reproduction scripts use.

    As a context manager it deletes what is left on the server if an action
    fails (and lets the :class:`~sandbox_proto.testing.Finding` through).
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: Mode = "extended",
        checkpoints: bool = True,
        snapshots: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
        prefix: str | None = None,
    ) -> None:
        super().__init__(
            WebSocketDriver(url, timeout=timeout, headers=headers),
            protocol=protocol,
            checkpoints=checkpoints,
            snapshots=snapshots,
            timeout=timeout,
            prefix=prefix or f"fuzz-{secrets.token_hex(4)}",
        )

    def __enter__(self) -> FuzzSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.cleanup()


@dataclass
class FuzzStats:
    """What a run did, for the progress lines and the summary."""

    examples: int = 0
    steps: int = 0
    max_steps: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    #: A failure was seen: hypothesis is shrinking it, and the time budget no longer applies.
    failing: bool = False
    #: When the first failure was seen (``time.monotonic()``).
    failed_at: float = 0.0
    shrink_runs: int = 0
    #: The failure with the fewest actions seen so far.
    best: Finding | None = None


@dataclass(frozen=True)
class FuzzOptions:
    url: str
    protocol: Mode = "extended"
    max_examples: int = DEFAULT_EXAMPLES
    steps: int = DEFAULT_STEPS
    seed: int | None = None
    time_budget: float | None = None
    #: Seconds hypothesis may spend shrinking a failure before the actions are pruned one by one.
    shrink_budget: float = DEFAULT_SHRINK_BUDGET
    timeout: float = DEFAULT_TIMEOUT
    headers: dict[str, str] = field(default_factory=dict)
    #: Whether the server has checkpoint and snapshot storage; ``None``: ask it.
    checkpoints: bool | None = None
    snapshots: bool | None = None
    #: Whether creates may ask for handoff (it needs the deployment's shared lock storage).
    handoff: bool = True


@dataclass
class FuzzResult:
    stats: FuzzStats
    seed: int
    checkpoints: bool
    snapshots: bool
    elapsed: float
    finding: Finding | None = None
    #: The shrunk finding did not happen again when replayed once more (timing-dependent).
    flaky: bool = False
    reproduction: str = ""


async def _probe(options: FuzzOptions) -> tuple[bool, bool]:
    """Ask the server whether it has checkpoint and snapshot storage (as the conformance runner does)."""
    runner = Runner(options.url, timeout=options.timeout, headers=options.headers)
    try:
        checkpoints = options.checkpoints
        if checkpoints is None:
            checkpoints = await runner.checkpoints_enabled()
        snapshots = options.snapshots
        if snapshots is None:
            snapshots = await runner.snapshots_enabled()
        return checkpoints, snapshots
    finally:
        await runner.cleanup()


def run_fuzz(options: FuzzOptions, *, progress: TextIO | None = None) -> FuzzResult:
    """Fuzz the server at ``options.url``; the result says what was found, if anything.

    Raises :class:`~sandbox_conformance._wire.Failed` (or ``OSError``) when the
    server cannot even be asked what storage it has.
    """
    checkpoints, snapshots = asyncio.run(_probe(options))
    run_seed = options.seed if options.seed is not None else secrets.randbits(32)
    stats = FuzzStats()
    started = time.monotonic()
    prefix = f"fuzz-{secrets.token_hex(4)}"
    last_report = [started]

    def say(text: str) -> None:
        if progress is not None:
            progress.write(text + "\n")
            progress.flush()

    class LiveMachine(ProtocolMachine):
        protocol: ClassVar[Mode] = options.protocol
        timeout: ClassVar[float] = options.timeout

        def __init__(self) -> None:
            now, budget = time.monotonic(), options.time_budget
            # Once a budget is spent (the time for new examples, or for shrinking), examples run
            # against the model in memory: they pass at once and hypothesis ends soon. Stopping it
            # otherwise (rejecting, raising) would make a sequence it ran before behave differently
            # (Flaky). Its final replay of the failure it shrank runs live again.
            spent = (budget is not None and not stats.failing and now - started > budget) or (
                stats.failing and now - stats.failed_at > options.shrink_budget
            )
            self.live = not spent or current_build_context().is_final
            if self.live:
                stats.examples += 1
                stats.shrink_runs += stats.failing
            super().__init__()

        def make_driver(self) -> Driver:
            if not self.live:
                return ReferenceDriver(protocol=self.protocol, checkpoints=checkpoints, snapshots=snapshots)
            return WebSocketDriver(options.url, timeout=options.timeout, headers=options.headers)

        def prefix(self) -> str:
            return prefix

        def teardown(self) -> None:
            try:
                super().teardown()
            finally:
                if self.live:
                    self._account()

        def _account(self) -> None:
            ran = sum(self.session.counts.values()) - self.session.counts["finish"]
            stats.steps += ran
            stats.max_steps = max(stats.max_steps, ran)
            stats.rules.update(self.session.counts)
            finding = self.session.finding
            if finding is not None and (stats.best is None or len(finding.actions) <= len(stats.best.actions)):
                stats.best = finding
            if finding is not None and not stats.failing:
                stats.failing, stats.failed_at = True, time.monotonic()
                say(f"found a failure in example {stats.examples}; shrinking it")
            now = time.monotonic()
            if now - last_report[0] >= PROGRESS_EVERY:
                last_report[0] = now
                shrinking = f", {stats.shrink_runs} shrink runs" if stats.failing else ""
                say(f"{stats.examples} examples, {stats.steps} actions, {now - started:.0f}s{shrinking}")

    LiveMachine.checkpoints = checkpoints
    LiveMachine.snapshots = snapshots
    LiveMachine.handoff = options.handoff
    run_settings = settings(
        max_examples=options.max_examples,
        stateful_step_count=options.steps,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        phases=[Phase.generate, Phase.shrink],
    )
    test = hypothesis_seed(run_seed)(get_state_machine_test(LiveMachine, settings=run_settings))
    result = FuzzResult(stats, run_seed, checkpoints, snapshots, 0.0)
    try:
        test()
    except Finding as exc:
        result.finding = exc
    except BaseExceptionGroup as group:  # hypothesis' FlakyFailure: the failure did not repeat on replay
        findings = [exc for exc in _leaves(group) if isinstance(exc, Finding)]
        if not findings:
            raise
        result.finding = findings[0]
    if stats.best is not None and result.finding is not None and len(stats.best.actions) < len(result.finding.actions):
        result.finding = stats.best
    if result.finding is not None:
        say(f"shrunk by hypothesis to {len(result.finding.actions)} actions; removing those it does not need")
        result.finding = minimize(options, result, result.finding)
        # Hypothesis' own replay can differ for reasons of its own (its FlakyFailure); the verdict
        # that the report gives is whether the shrunk sequence fails again here, now.
        try:
            again = replay(options, result, result.finding.actions)
        except ValueError:
            again = None
        result.flaky = again is None or not _same_problem(again, result.finding)
        result.reproduction = reproduction(options, result, result.finding)
    result.elapsed = time.monotonic() - started
    return result


def replay(options: FuzzOptions, result: FuzzResult, actions: list[Action]) -> Finding | None:
    """Play ``actions`` on a fresh session: the finding they lead to, ``None`` if none.

    A sequence the model cannot play (an action on a connection that a
    removed action would have opened) raises ``ValueError``.
    """
    session = FuzzSession(
        options.url,
        protocol=options.protocol,
        checkpoints=result.checkpoints,
        snapshots=result.snapshots,
        timeout=options.timeout,
        headers=options.headers,
    )
    try:
        for name, args, kwargs in actions:
            getattr(session, name)(*args, **kwargs)
    except Finding as exc:
        session.cleanup()
        return exc
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        session.cleanup()
        raise ValueError(f"not a sequence the model can play: {exc!r}") from None
    if not session.failed and (not actions or actions[-1][0] != "finish"):
        session.cleanup()
    return None


def minimize(options: FuzzOptions, result: FuzzResult, finding: Finding) -> Finding:
    """Remove actions one at a time while the same problem remains (hypothesis' shrinker leaves some in).

    Each candidate is replayed against the server; ``finish`` stays last, as
    it checks the kills that end every sequence.
    """
    best = finding
    changed = True
    while changed:
        changed = False
        for index in range(len(best.actions) - 1, -1, -1):
            if best.actions[index][0] == "finish":
                continue
            candidate = best.actions[:index] + best.actions[index + 1 :]
            try:
                found = replay(options, result, candidate)
            except ValueError:
                continue
            if found is not None and _same_problem(found, best):
                best, changed = found, True
    return best


def _same_problem(a: Finding, b: Finding) -> bool:
    """The same problem up to the names of connections and sandboxes and the ids the server chose."""

    def general(text: str) -> str:
        return re.sub(r"\b[cs]\d+(-end\d+)?\b|sandbox-[0-9a-f]+", "_", text)

    return general(a.problem) == general(b.problem)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def reproduction(options: FuzzOptions, result: FuzzResult, finding: Finding) -> str:
    """A Python script that replays the finding's actions against the server; it fails while the defect is there."""
    uses_program = any("Program(" in call for call in finding.calls)
    imports = "from sandbox_conformance import FuzzSession\n"
    if uses_program:
        imports += "from sandbox_proto.testing import Program\n"
    headers = "" if not options.headers else "    # The server needs headers: add headers={...} to FuzzSession.\n"
    first_line = finding.problem.splitlines()[0] if finding.problem else "a finding"
    body = "".join(f"    {call}\n" for call in finding.calls)
    return (
        f'"""Found by `sandbox fuzz` (seed {result.seed}): {first_line}\n\n'
        "Replays the shrunk sequence; raises Finding (exit status 1) while the server misbehaves.\n"
        '"""\n\n'
        f"{imports}\n"
        f"with FuzzSession(\n"
        f"    {options.url!r},\n"
        f"    protocol={options.protocol!r},\n"
        f"    checkpoints={result.checkpoints!r},\n"
        f"    snapshots={result.snapshots!r},\n"
        f"    timeout={options.timeout!r},\n"
        f") as session:\n"
        f"{headers}{body}"
    )


def summary(result: FuzzResult) -> str:
    stats = result.stats
    mean = stats.steps / stats.examples if stats.examples else 0.0
    rules = ", ".join(f"{name} {count}" for name, count in sorted(stats.rules.items()))
    storage = f"checkpoints {'on' if result.checkpoints else 'off'}, snapshots {'on' if result.snapshots else 'off'}"
    return (
        f"{stats.examples} examples, {stats.steps} actions (mean {mean:.1f}, max {stats.max_steps} per example), "
        f"{result.elapsed:.1f}s, seed {result.seed}, {storage}\nactions: {rules}"
    )


# --------------------------------------------------------------------------
# command line


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Property-based fuzzing of a Cloud Run Sandbox server: hypothesis draws sequences of client "
        "actions on several sandboxes and connections at once, plays them over real WebSockets, and compares "
        "every reply with a reference model of a conforming server. A failure is shrunk and printed as a "
        "transcript and a Python reproduction. Creates and deletes sandboxes on the server, and leaves small "
        "filesystem snapshots named fuzz-<random>-snapN if it has snapshot storage.",
    )
    parser.add_argument("url", help="service URL, e.g. http://127.0.0.1:8080")
    parser.add_argument(
        "--protocol",
        choices=("extended", "upstream"),
        default="extended",
        help="'extended' asks for the extensions of protocol.md 15 (all, some or none per connection) and "
        "expects them granted; 'upstream' asks for none and expects exactly the upstream protocol (default: extended)",
    )
    parser.add_argument("--max-examples", type=int, default=DEFAULT_EXAMPLES, help="sequences to try (default 100)")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"most actions per sequence (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed, to repeat a run (default: random)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new sequence after this long (shrinking a failure found may take longer)",
    )
    parser.add_argument(
        "--shrink-budget",
        type=float,
        default=DEFAULT_SHRINK_BUDGET,
        metavar="SECONDS",
        help="how long hypothesis may shrink a failure before the remaining actions are pruned one at a time "
        f"(default {DEFAULT_SHRINK_BUDGET:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for each frame or handshake; no answer in time is a finding "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    add_header_option(parser)
    parser.add_argument(
        "--no-handoff",
        action="store_true",
        help="never ask for enable_sandbox_handoff (for a server whose handoff lock storage is missing)",
    )
    parser.add_argument("--repro", metavar="FILE", help="also write the reproduction script of a finding to FILE")
    return parser


def fuzz_main(argv: Sequence[str] | None = None, *, prog: str = "sandbox fuzz") -> int:
    """The command: 0 when nothing was found, 1 for a finding (or a server that cannot be reached), 2 for usage."""
    parser = _parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    headers = parsed_headers(parser, args.header)
    if args.timeout <= 0 or args.max_examples < 1 or args.steps < 1:
        parser.error("--timeout, --max-examples and --steps must be positive")
    try:
        websocket_base(args.url)
    except LocalProtocolError as exc:
        parser.error(str(exc))
    options = FuzzOptions(
        url=args.url,
        protocol=args.protocol,
        max_examples=args.max_examples,
        steps=args.steps,
        seed=args.seed,
        time_budget=args.time_budget,
        shrink_budget=args.shrink_budget,
        timeout=args.timeout,
        headers=headers,
        handoff=not args.no_handoff,
    )
    out = sys.stdout
    out.write(f"fuzzing {args.url} (protocol {args.protocol}, up to {args.max_examples} sequences)\n")
    out.flush()
    try:
        result = run_fuzz(options, progress=out)
    except (Failed, OSError, WebSocketException) as exc:
        out.write(f"cannot fuzz {args.url}: {exc}\n")
        return 1
    out.write(summary(result) + "\n")
    if result.finding is None:
        out.write("no finding\n")
        return 0
    finding = result.finding
    flaky = " (it did not happen again on replay: timing-dependent)" if result.flaky else ""
    out.write(f"\nFINDING{flaky}, shrunk to {len(finding.calls)} actions: {finding.report()}\n")
    out.write(f"\nReproduction (python3 repro.py; rerun the search with --seed {result.seed}):\n\n")
    out.write(result.reproduction)
    if args.repro:
        with open(args.repro, "w", encoding="utf-8") as f:
            f.write(result.reproduction)
        out.write(f"\n(written to {args.repro})\n")
    out.flush()
    return 1
