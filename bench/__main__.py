"""``python -m bench``: run the benchmarks of issue 7 and print one table.

Every result is a ratio against a baseline measured in the same run,
alternating with it, and each number is the median of ``--repeats`` runs:
the machine is shared and noisy, absolute numbers are only indicative.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import clients, measure
from .blaster import Blaster
from .clients import LIBRARY_OF

BASELINE = "raw websockets"
ALL = ("throughput", "roundtrip", "scale", "memory", "core", "reconnect", "sync", "chunking")
#: What sandbox_sync is compared with: the async API it wraps, on the same transport.
SYNC_BASELINE = "websockets"
#: Measured by default; trio-websocket (trio's other transport) on request.
TRANSPORTS = ("websockets", "aiohttp", "trio")
ALL_TRANSPORTS = (*TRANSPORTS, "trio-websocket")
MB = 1e6
MIB = 2**20
#: The "small constant" of the bounded-memory goal, above the stream buffer.
MEMORY_SLACK = 4 * MIB


@dataclass
class Row:
    bench: str
    client: str
    result: str
    baseline: str
    ratio: str
    goal: str
    met: str


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _rotations(names: list[str], repeats: int) -> list[list[str]]:
    # A different order each repeat, so drift on a shared machine does not favour one client.
    return [names[i % len(names) :] + names[: i % len(names)] for i in range(repeats)]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # noqa: T201 - progress goes to stderr, the table to stdout


def _with_libraries(transports: list[str]) -> list[str]:
    """The baseline, our transports, and the raw loop of each one's library (to split the gap)."""
    return [BASELINE, *transports, *(LIBRARY_OF[t] for t in transports if LIBRARY_OF[t] != BASELINE)]


def bench_throughput(url: str, args: argparse.Namespace) -> list[Row]:
    rows = []
    names = _with_libraries(args.transports)
    for count, size in ((args.small_frames, 64), (args.large_frames, 4096)):
        times: dict[str, list[float]] = {name: [] for name in names}
        for order in _rotations(names, args.throughput_repeats):
            for name in order:
                times[name].append(measure.throughput(name, url, count, size))
            _log(f"throughput {count}x{size}: " + ", ".join(f"{n} {count / times[n][-1]:,.0f}/s" for n in order))
        base = times[BASELINE]

        def describe(name: str, times: dict[str, list[float]] = times, count: int = count, size: int = size) -> str:
            seconds = _median(times[name])
            return f"{count / seconds:,.0f} msg/s, {count * size / seconds / MB:,.1f} MB/s"

        for name in names[1:]:
            ratio = _median([b / t for b, t in zip(base, times[name], strict=True)])
            ours = name in ALL_TRANSPORTS
            goal = 1.0 if name == "websockets" else 0.9
            extra = ""
            if ours and LIBRARY_OF[name] in times:
                lib = times[LIBRARY_OF[name]]
                extra = f" ({_median([b / t for b, t in zip(lib, times[name], strict=True)]):.2f}x its library)"
            rows.append(
                Row(
                    f"1. output {count:,} x {size} B",
                    name if ours else f"({name})",
                    describe(name),
                    describe(BASELINE),
                    f"{ratio:.2f}x{extra}",
                    f">= {goal:.1f}x" if ours else "-",
                    _verdict(ratio >= goal if ours else None),
                )
            )
    return rows


def bench_roundtrip(url: str, args: argparse.Namespace) -> list[Row]:
    names = _with_libraries(args.transports)
    latencies: dict[str, list[list[float]]] = {name: [] for name in names}
    for order in _rotations(names, args.repeats):
        for name in order:
            latencies[name].append(measure.round_trips(name, url, args.execs))
        _log("round trip: " + ", ".join(f"{n} {_median(latencies[n][-1]) * 1e6:.0f}us" for n in order))

    def describe(name: str) -> str:
        runs = latencies[name]
        median = _median([_median(r) for r in runs]) * 1e6
        return f"median {median:.0f} us, p99 {_median([_p99(r) for r in runs]) * 1e6:.0f} us"

    def ratio(name: str, baseline: str) -> float:
        return _median([_median(t) / _median(b) for b, t in zip(latencies[baseline], latencies[name], strict=True)])

    rows = []
    base = latencies[BASELINE]
    for name in names[1:]:
        ours = name in ALL_TRANSPORTS
        p99 = _median([_p99(t) / _p99(b) for b, t in zip(base, latencies[name], strict=True)])
        extra = f", {ratio(name, LIBRARY_OF[name]):.2f}x its library" if ours and LIBRARY_OF[name] != BASELINE else ""
        rows.append(
            Row(
                f"2. exec round trip x {args.execs:,}",
                name if ours else f"({name})",
                describe(name),
                describe(BASELINE),
                f"{ratio(name, BASELINE):.2f}x (p99 {p99:.2f}x{extra})",
                "<= 1.05x" if ours else "-",
                _verdict(ratio(name, BASELINE) <= 1.05 if ours else None),
            )
        )
    return rows


def bench_scale(url: str, args: argparse.Namespace) -> list[Row]:
    names = _with_libraries(args.transports)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for order in _rotations(names, args.repeats):
        for name in order:
            results[name].append(measure.in_child("scale", name, url, args.sandboxes))
        _log("scale: " + ", ".join(f"{n} {results[n][-1]['rss_per_conn'] / 1024:.1f} KiB" for n in order))

    def describe(name: str) -> str:
        seconds = _median([r["seconds"] for r in results[name]])
        kib = _median([r["rss_per_conn"] for r in results[name]]) / 1024
        return f"{seconds:.2f} s to open, {kib:.1f} KiB each"

    def memory_ratio(name: str, baseline: str) -> float:
        pairs = zip(results[baseline], results[name], strict=True)
        return _median([t["rss_per_conn"] / b["rss_per_conn"] for b, t in pairs])

    rows = []
    for name in names[1:]:
        ours = name in ALL_TRANSPORTS
        memory = memory_ratio(name, BASELINE)
        pairs = zip(results[BASELINE], results[name], strict=True)
        seconds = _median([t["seconds"] / b["seconds"] for b, t in pairs])
        extra = ""
        if ours and LIBRARY_OF[name] != BASELINE:
            extra = f" ({memory_ratio(name, LIBRARY_OF[name]):.2f}x its library)"
        rows.append(
            Row(
                f"3. {args.sandboxes:,} idle sandboxes",
                name if ours else f"({name})",
                describe(name),
                describe(BASELINE),
                f"memory {memory:.2f}x{extra}, time {seconds:.2f}x",
                "<= 1.2x" if ours else "-",
                _verdict(memory <= 1.2 and seconds <= 1.2 if ours else None),
            )
        )
    return rows


def bench_memory(url: str, args: argparse.Namespace) -> list[Row]:
    rows = []
    total = args.memory_mb * 10**6
    buffer = args.buffer_mib * MIB
    for name in args.transports:
        runs = [measure.in_child("bounded", name, url, total, args.pause, buffer) for _ in range(args.memory_repeats)]
        growth = _median([r["peak_growth"] for r in runs])
        buffered = _median([r["buffered"] for r in runs])
        intact = all(r["received"] == r["expected"] for r in runs)
        _log(f"memory: {name} peak growth {growth / MIB:.1f} MiB, {buffered / MIB:.1f} MiB buffered when paused")
        rows.append(
            Row(
                f"4. {total / MB:.0f} MB, reader paused {args.pause:g} s",
                name,
                f"RSS +{growth / MIB:.1f} MiB ({buffered / MIB:.1f} MiB buffered); "
                f"all bytes: {'yes' if intact else 'NO'}",
                f"buffer {args.buffer_mib} MiB + {MEMORY_SLACK // MIB} MiB",
                f"{growth / buffer:.2f}x buffer",
                "<= buffer + 4 MiB",
                _verdict(intact and growth <= buffer + MEMORY_SLACK),
            )
        )
    return rows


def bench_core(args: argparse.Namespace) -> list[Row]:
    count = args.small_frames
    runs = [measure.core(count, 64) for _ in range(args.repeats)]
    ours = _median([count / o for o, _ in runs])
    bare = _median([count / b for _, b in runs])
    ratio = _median([b / o for o, b in runs])
    return [
        Row(
            f"5. core alone, {count:,} stdout frames",
            "sandbox_proto",
            f"{ours:,.0f} events/s",
            f"json.loads {bare:,.0f}/s",
            f"{ratio:.2f}x",
            "(report)",
            "-",
        )
    ]


def bench_reconnect(args: argparse.Namespace) -> list[Row]:
    from . import reconnect

    names = [BASELINE, *args.transports]
    runs: dict[str, list[list[float]]] = {name: [] for name in names}
    with reconnect.server_and_proxy() as (server_url, proxy):
        for order in _rotations(names, args.repeats):
            for name in order:
                if name == BASELINE:
                    runs[name].append(reconnect.raw_attach(server_url, proxy, args.reconnects))
                else:
                    runs[name].append(reconnect.ours(name, proxy, args.reconnects))
            _log("reconnect: " + ", ".join(f"{n} {_median(runs[n][-1]) * 1e3:.2f} ms" for n in order))

    def describe(name: str) -> str:
        median = _median([_median(r) for r in runs[name]]) * 1e3
        return f"median {median:.2f} ms, max {_median([max(r) for r in runs[name]]) * 1e3:.2f} ms"

    rows = []
    for name in args.transports:
        ratio = _median([_median(t) / _median(b) for b, t in zip(runs[BASELINE], runs[name], strict=True)])
        rows.append(
            Row(
                f"6. reconnect after a cut x {args.reconnects}",
                name,
                describe(name),
                f"raw attach: {describe(BASELINE)}",
                f"{ratio:.2f}x",
                "(report)",
                "-",
            )
        )
    return rows


def bench_sync(url: str, args: argparse.Namespace) -> list[Row]:
    """sandbox_sync against sandbox_asyncio (websockets) in the same run: what the thread hop costs."""
    names = [SYNC_BASELINE, "sync"]
    latencies: dict[str, list[list[float]]] = {name: [] for name in names}
    for order in _rotations(names, args.repeats):
        for name in order:
            latencies[name].append(measure.round_trips(name, url, args.execs))
        _log("sync round trip: " + ", ".join(f"{n} {_median(latencies[n][-1]) * 1e6:.0f}us" for n in order))

    def describe_latency(name: str) -> str:
        runs = latencies[name]
        median = _median([_median(r) for r in runs]) * 1e6
        return f"median {median:.0f} us, p99 {_median([_p99(r) for r in runs]) * 1e6:.0f} us"

    pairs = list(zip(latencies[SYNC_BASELINE], latencies["sync"], strict=True))
    ratio = _median([_median(t) / _median(b) for b, t in pairs])
    p99 = _median([_p99(t) / _p99(b) for b, t in pairs])
    rows = [
        Row(
            f"7. sync: exec round trip x {args.execs:,}",
            "sync",
            describe_latency("sync"),
            f"asyncio websockets: {describe_latency(SYNC_BASELINE)}",
            f"{ratio:.2f}x time (p99 {p99:.2f}x)",
            "(report)",
            "-",
        )
    ]
    for count, size in ((args.small_frames, 64), (args.large_frames, 4096)):
        times: dict[str, list[float]] = {name: [] for name in names}
        for order in _rotations(names, args.throughput_repeats):
            for name in order:
                times[name].append(measure.throughput(name, url, count, size))
            _log(f"sync throughput {count}x{size}: " + ", ".join(f"{n} {count / times[n][-1]:,.0f}/s" for n in order))

        def describe(name: str, times: dict[str, list[float]] = times, count: int = count, size: int = size) -> str:
            seconds = _median(times[name])
            return f"{count / seconds:,.0f} msg/s, {count * size / seconds / MB:,.1f} MB/s"

        speed = _median([b / t for b, t in zip(times[SYNC_BASELINE], times["sync"], strict=True)])
        rows.append(
            Row(
                f"7. sync: output {count:,} x {size} B",
                "sync",
                describe("sync"),
                f"asyncio websockets: {describe(SYNC_BASELINE)}",
                f"{speed:.2f}x throughput",
                "(report)",
                "-",
            )
        )
    return rows


def bench_chunking(args: argparse.Namespace) -> list[Row]:
    """Our server's output chunking against the upstream server's, if one is given (issue 17)."""
    from . import chunking

    names = ["ours", *(["upstream"] if args.upstream_url else [])]
    runs: dict[str, list[chunking.Chunking]] = {name: [] for name in names}
    with chunking.our_server() as our_url:
        urls = {"ours": our_url, "upstream": args.upstream_url}
        for order in _rotations(names, args.repeats):
            for name in order:
                runs[name].append(chunking.measure(urls[name], args.chunking_runs, args.chunking_lines))
            _log("chunking: " + ", ".join(f"{n} {runs[n][-1].split_fraction:.1%} split" for n in order))

    def split(name: str) -> float:
        return _median([r.split_fraction for r in runs[name]])

    def describe_split(name: str) -> str:
        count, lines = sum(r.split for r in runs[name]), sum(r.lines for r in runs[name])
        return f"{split(name):.1%} of lines split ({count:,} of {lines:,})"

    def latency(name: str, kind: str) -> float:
        return _median([_median(getattr(r, kind)) for r in runs[name]])

    def describe_latency(name: str, kind: str) -> str:
        p99 = _median([_p99(getattr(r, kind)) for r in runs[name]])
        return f"median {latency(name, kind) * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us"

    upstream = "upstream" in runs
    missing = "(no --upstream-url)"
    rows = [
        Row(
            f"8. split lines, {args.chunking_runs} x 20 print()",
            "sandbox_server",
            describe_split("ours"),
            f"upstream: {describe_split('upstream')}" if upstream else missing,
            f"{split('ours') / split('upstream'):.2f}x" if upstream and split("upstream") else "-",
            "<= upstream",
            _verdict(split("ours") <= split("upstream") if upstream else None),
        )
    ]
    for kind, what in (("line_latency", "a whole line"), ("partial_latency", "a partial line")):
        rows.append(
            Row(
                f"8. write to frame, {what}",
                "sandbox_server",
                describe_latency("ours", kind),
                f"upstream: {describe_latency('upstream', kind)}" if upstream else missing,
                f"{latency('ours', kind) / latency('upstream', kind):.2f}x" if upstream else "-",
                "(report)",
                "-",
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    header = Row("benchmark", "client", "result", "baseline (raw websockets loop)", "ratio", "goal", "met")
    table = [header, *rows]
    widths = [max(len(getattr(r, f)) for r in table) for f in Row.__dataclass_fields__]
    for index, row in enumerate(table):
        cells = [getattr(row, f).ljust(w) for f, w in zip(Row.__dataclass_fields__, widths, strict=True)]
        print("| " + " | ".join(cells) + " |")  # noqa: T201
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")  # noqa: T201


def profile(url: str, name: str, args: argparse.Namespace) -> None:
    """cProfile one client's 64-byte throughput run (or its round trips, with ``--only roundtrip``).

    Prints the time split into ours / library / runtime.
    """
    profiler = cProfile.Profile()
    if args.only == ["roundtrip"]:
        profiler.runcall(measure.round_trips, name, url, args.execs)
    else:
        profiler.runcall(measure.throughput, name, url, args.small_frames, 64)
    stats = pstats.Stats(profiler)
    groups: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        groups[_owner(filename)] = groups.get(_owner(filename), 0.0) + tottime
    total = sum(groups.values())
    for owner, seconds in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"{owner:12} {seconds:7.2f} s  {seconds / total:5.1%}")  # noqa: T201
    stats.sort_stats("tottime").print_stats(args.profile_lines)


def _owner(filename: str) -> str:
    for part in ("sandbox_proto", "_sandbox_anyio", "sandbox_asyncio", "sandbox_trio", "sandbox_sync"):
        if f"/{part}/" in filename:
            return "ours"
    for part in ("websockets", "aiohttp", "trio_websocket", "wsproto", "h11", "anyio", "trio"):
        if f"/{part}/" in filename:
            return part
    if "asyncio" in filename or "selectors" in filename:
        return "asyncio"
    return "other"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated subset of our transports")
    parser.add_argument("--quick", action="store_true", help="small sizes and two repeats: about a minute")
    parser.add_argument("--repeats", type=int, help="runs per measurement (median reported); default 3, quick 2")
    parser.add_argument(
        "--throughput-repeats", type=int, help="runs of the (slow) throughput benchmark; default 2, quick 2"
    )
    parser.add_argument("--small-frames", type=int, help="64-byte frames per exec (default 200000)")
    parser.add_argument("--large-frames", type=int, help="4 KiB frames per exec (default 20000)")
    parser.add_argument("--execs", type=int, help="sequential execs of the round-trip benchmark (default 2000)")
    parser.add_argument("--sandboxes", type=int, help="concurrent sandboxes of the scale benchmark (default 1000)")
    parser.add_argument("--reconnects", type=int, help="reconnects after a cut, per run (default 20)")
    parser.add_argument("--memory-mb", type=int, help="MB written while the reader pauses (default 200)")
    parser.add_argument("--pause", type=float, help="seconds the reader pauses (default 5)")
    parser.add_argument("--buffer-mib", type=int, help="stream_buffer_size of the memory benchmark (default 16)")
    parser.add_argument(
        "--upstream-url",
        help="an upstream server (http://host:port) to compare output chunking with; without it, ours only",
    )
    parser.add_argument("--chunking-runs", type=int, help="execs of 20 print()s per chunking run (default 100)")
    parser.add_argument("--chunking-lines", type=int, help="timed writes per latency run (default 100)")
    parser.add_argument(
        "--exec-timeout",
        type=float,
        default=30.0,
        help="timeout= of our clients' exec, in s; 0 for none, to see what the timeout costs (default 30)",
    )
    parser.add_argument(
        "--profile",
        metavar="CLIENT",
        help="cProfile one client's 64 B throughput run instead (its round trips with --only roundtrip)",
    )
    parser.add_argument("--profile-lines", type=int, default=25)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "repeats": 2 if quick else 3,
        # 200k small frames take ~20 s per run on our slower transports: 2 runs keep the default under ~5 min.
        "throughput_repeats": 2,
        "small_frames": 20_000 if quick else 200_000,
        "large_frames": 2_000 if quick else 20_000,
        "execs": 300 if quick else 2_000,
        "sandboxes": 200 if quick else 1_000,
        "reconnects": 10 if quick else 20,
        "memory_mb": 20 if quick else 200,
        "pause": 1.0 if quick else 5.0,
        # Small enough that even the slowest transport fills it within the quick pause.
        "buffer_mib": 4 if quick else 16,
        "chunking_runs": 30 if quick else 100,
        "chunking_lines": 50 if quick else 100,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.memory_repeats = 1
    args.only = [name for name in args.only.split(",") if name]
    args.transports = [name for name in args.transports.split(",") if name]
    unknown = set(args.only) - set(ALL) | set(args.transports) - set(ALL_TRANSPORTS)
    if unknown:
        parser.error(f"unknown names: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    clients.Ours.exec_timeout = args.exec_timeout or None
    started = time.perf_counter()
    benches: dict[str, Callable[[str, argparse.Namespace], list[Row]]] = {
        "throughput": bench_throughput,
        "roundtrip": bench_roundtrip,
        "scale": bench_scale,
        "memory": bench_memory,
        "sync": bench_sync,
    }
    rows: list[Row] = []
    with Blaster() as blaster:
        if args.profile:
            profile(blaster.url, args.profile, args)
            return
        for name in args.only:
            if name == "core":
                rows += bench_core(args)
            elif name == "reconnect":
                rows += bench_reconnect(args)
            elif name == "chunking":
                rows += bench_chunking(args)
            else:
                rows += benches[name](blaster.url, args)
    print_table(rows)
    _log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
