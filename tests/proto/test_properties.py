"""Property tests of the sans-IO core (style.md lesson 3).

* The codec round-trips every client and server frame type.
* Decoding arbitrary input returns a frame or raises ``RemoteProtocolError``.
* ``ClientProtocol`` never raises on server input; user calls raise only
  ``LocalProtocolError``; every exec ends exactly once and the session ends
  exactly once, whatever the server sends and however the connection dies.
* ``ServerProtocol`` never raises on client input and always answers.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_proto import (
    ALL_EXTENSIONS,
    CheckpointRequest,
    CheckpointRequested,
    ClientFrame,
    ClientProtocol,
    Close,
    CloseConnection,
    CloseStdinRequest,
    CloseStdinRequested,
    CreateOptions,
    ErrorFrame,
    ExecRejected,
    ExecRequest,
    ExecRequested,
    ExecStarted,
    InitRequest,
    KillProcessRequest,
    KillProcessRequested,
    KillSandboxDone,
    KillSandboxRequest,
    KillSandboxRequested,
    LocalProtocolError,
    Output,
    OutputFrame,
    OutputGapFrame,
    ProcessEnded,
    ProcessPhase,
    ProcessState,
    ReconnectPolicy,
    ReconnectRequest,
    ReconnectRequested,
    ReconnectScheduled,
    RemoteProtocolError,
    SandboxConnectionError,
    SandboxIdFrame,
    SandboxStateError,
    ServerFrame,
    ServerProtocol,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotRequest,
    SnapshotRequested,
    Status,
    StatusFrame,
    StdinReceived,
    StdinRequest,
    UnknownFrame,
    decode_server_frame,
    encode_client_frame,
    encode_server_frame,
    parse_status,
    valid_snapshot_name,
)

SERVER_FRAME_TYPES = (StatusFrame, SandboxIdFrame, OutputFrame, ErrorFrame, OutputGapFrame, UnknownFrame)

# --------------------------------------------------------------------------
# strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

unknown_status_strings = st.text(min_size=0, max_size=30).filter(lambda s: not isinstance(parse_status(s), Status))
statuses = st.sampled_from(list(Status)) | unknown_status_strings | st.just("SANDBOX_EXECUTION_FORCE_TERMINATED")
extension_lists = st.none() | st.lists(st.sampled_from(ALL_EXTENSIONS) | st.text(max_size=10), max_size=4).map(tuple)
optional_ints = st.none() | st.integers()

status_frames = st.builds(
    StatusFrame, statuses.filter(lambda s: s != "SANDBOX_EXECUTION_FORCE_TERMINATED"), extension_lists, optional_ints
)
sandbox_id_frames = st.builds(SandboxIdFrame, st.text(min_size=1, max_size=30), st.none() | st.text(max_size=40))
output_frames = st.builds(OutputFrame, st.sampled_from(["stdout", "stderr"]), st.text(max_size=50), optional_ints)
error_frames = st.builds(ErrorFrame, st.text(max_size=50))
gap_frames = st.builds(OutputGapFrame, st.integers(), st.integers())
encodable_server_frames = status_frames | sandbox_id_frames | output_frames | error_frames | gap_frames

SERVER_KEYS = [
    "event",
    "status",
    "data",
    "seq",
    "exit_code",
    "extensions",
    "sandbox_id",
    "sandbox_token",
    "message",
    "from_seq",
    "to_seq",
]
SERVER_EVENTS = ["status_update", "stdout", "stderr", "sandbox_id", "error", "output_gap", "stdin", "", "heartbeat"]

# JSON objects shaped like server frames but with arbitrary values in every field.
frame_like_objects = st.fixed_dictionaries(
    {"event": st.sampled_from(SERVER_EVENTS) | json_values},
    optional={key: json_values for key in SERVER_KEYS[1:]},
)
arbitrary_messages: st.SearchStrategy[str | bytes] = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    json_values.map(json.dumps),
    frame_like_objects.map(json.dumps),
    st.sampled_from(["", "{", "[]", "null", "NaN", "1e999", '{"event":"status_update","status":' * 3, "[" * 3000]),
)

snapshot_names = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True)
languages = st.sampled_from(["python", "bash"]) | st.text(max_size=10)


@st.composite
def init_requests(draw: st.DrawFn) -> InitRequest:
    idle = draw(
        st.none()
        | st.integers(min_value=-10, max_value=10**9)
        | st.floats(min_value=-1e6, max_value=1e12, allow_nan=False, allow_infinity=False)
    )
    return InitRequest(
        idle_timeout=idle,
        enable_checkpoint=draw(st.booleans()),
        enable_idle_timeout_auto_checkpoint=draw(st.booleans()),
        enable_sandbox_handoff=draw(st.booleans()),
        filesystem_snapshot_name=draw(st.none() | snapshot_names | st.text(max_size=12)),
        send_null_idle_timeout=draw(st.booleans()),
    )


client_action_frames = st.one_of(
    st.builds(ExecRequest, languages, st.text(max_size=40)),
    st.builds(StdinRequest, st.text(max_size=40)),
    st.just(KillProcessRequest()),
    st.just(KillSandboxRequest()),
    st.just(CheckpointRequest()),
    st.builds(SnapshotRequest, st.text(max_size=20)),
    st.builds(ReconnectRequest, st.none() | st.integers(min_value=0)),
    st.just(CloseStdinRequest()),
)


# --------------------------------------------------------------------------
# codec


@given(frame=encodable_server_frames)
def test_server_frames_round_trip(frame: ServerFrame) -> None:
    text = encode_server_frame(frame)
    assert decode_server_frame(text) == frame
    assert decode_server_frame(text.encode("utf-8").decode("utf-8")) == frame
    # The server's own format (1.2): compact, raw non-ASCII, "event" first.
    obj = json.loads(text)
    assert json.dumps(obj, separators=(",", ":"), ensure_ascii=False) == text
    assert next(iter(obj)) == "event"


@given(frame=status_frames)
def test_status_frames_never_carry_message(frame: StatusFrame) -> None:
    obj = json.loads(encode_server_frame(frame))
    assert list(obj)[:2] == ["event", "status"]
    assert "message" not in obj
    assert ("extensions" in obj) == (frame.extensions is not None)
    assert ("exit_code" in obj) == (frame.exit_code is not None)


@given(frame=sandbox_id_frames | output_frames | error_frames)
def test_upstream_key_order(frame: ServerFrame) -> None:
    keys = list(json.loads(encode_server_frame(frame)))
    if isinstance(frame, SandboxIdFrame):
        assert keys == ["event", "sandbox_id", "sandbox_token"]
    elif isinstance(frame, OutputFrame):
        assert keys == (["event", "data"] if frame.seq is None else ["event", "data", "seq"])
    else:
        assert keys == ["event", "message"]


def expected_request(frame: ClientFrame) -> Any:
    if isinstance(frame, ExecRequest):
        return ExecRequested(frame.language, frame.code) if frame.language in ("python", "bash") else None
    return {
        StdinRequest: lambda f: StdinReceived(f.data),
        KillProcessRequest: lambda f: KillProcessRequested(),
        KillSandboxRequest: lambda f: KillSandboxRequested(),
        CheckpointRequest: lambda f: CheckpointRequested(),
        SnapshotRequest: lambda f: SnapshotRequested(f.name),
        ReconnectRequest: lambda f: ReconnectRequested(f.last_seq),
        CloseStdinRequest: lambda f: CloseStdinRequested(),
    }[type(frame)](frame)


@given(frame=client_action_frames, running=st.booleans())
def test_client_frames_round_trip_through_the_server_role(frame: ClientFrame, running: bool) -> None:
    text = encode_client_frame(frame)
    obj = json.loads(text)
    assert json.dumps(obj, separators=(",", ":"), ensure_ascii=False) == text
    proto = ServerProtocol(create=False)
    if isinstance(frame, StdinRequest) or running:
        proto.exec_started()
        proto.data_to_send()
    request = proto.receive(text)
    expected = expected_request(frame)
    if isinstance(frame, ExecRequest) and running and expected is not None:
        expected = None  # 7.3.5: an exec is already running
    assert request == expected
    if expected is None:
        out = proto.data_to_send()
        assert out  # a refusal is always answered
        if isinstance(frame, ExecRequest) and frame.language not in ("python", "bash"):
            assert json.loads(out[1])["message"] == (
                f"Unsupported language: '{frame.language}'. Supported languages are: python, bash"
            )
    else:
        assert proto.data_to_send() == []


@given(frame=client_action_frames)
def test_upstream_server_profile_treats_extension_frames_by_the_dispatch_rule(frame: ClientFrame) -> None:
    proto = ServerProtocol(create=False, extensions=())
    request = proto.receive(encode_client_frame(frame))
    if isinstance(frame, CloseStdinRequest):
        assert request is None  # 3.1 rule 7: an exec request with no language
        assert "'None'" in json.loads(proto.data_to_send()[1])["message"]
    elif isinstance(frame, ReconnectRequest):
        assert request == ReconnectRequested(None)  # last_seq is not read without `seq`


@given(init=init_requests())
def test_init_round_trip(init: InitRequest) -> None:
    text = encode_client_frame(init)
    obj = json.loads(text)
    # Only truthy flags are sent (3.2, like upstream's Python client).
    assert all(obj[k] is True for k in obj if k.startswith("enable_"))
    proto = ServerProtocol(create=True)
    options = proto.receive_init(text)
    out = proto.data_to_send()
    assert out[0] == '{"event":"status_update","status":"SANDBOX_CREATING"}'
    if init.enable_sandbox_handoff and not init.enable_checkpoint:
        error: str | None = "Sandbox handoff requires checkpointing to be enabled."
    elif init.enable_idle_timeout_auto_checkpoint and not init.enable_checkpoint:
        error = "Idle timeout auto checkpoint requires checkpointing to be enabled."
    elif init.filesystem_snapshot_name and not valid_snapshot_name(init.filesystem_snapshot_name):
        error = "snapshot name"
    else:
        error = None
    if error is not None:
        assert options is None
        assert out[1] == '{"event":"status_update","status":"SANDBOX_CREATION_ERROR"}'
        assert error.split()[0] in json.loads(out[2])["message"]
        assert out[3] == Close(4000)
        return
    assert len(out) == 1
    if init.idle_timeout is None:
        idle = None if init.send_null_idle_timeout else 300.0
    else:
        idle = float(init.idle_timeout) or None
    assert options == CreateOptions(
        idle_timeout=idle,
        enable_checkpoint=init.enable_checkpoint,
        enable_idle_timeout_auto_checkpoint=init.enable_idle_timeout_auto_checkpoint,
        enable_sandbox_handoff=init.enable_sandbox_handoff,
        filesystem_snapshot_name=init.filesystem_snapshot_name or None,
    )


@given(message=arbitrary_messages)
def test_decode_returns_a_frame_or_raises_remote_protocol_error(message: str | bytes) -> None:
    try:
        frame = decode_server_frame(message)
    except RemoteProtocolError:
        return
    assert isinstance(frame, SERVER_FRAME_TYPES)


@given(obj=frame_like_objects)
def test_decode_frame_like_objects(obj: dict[str, Any]) -> None:
    text = json.dumps(obj)
    try:
        frame = decode_server_frame(text)
    except RemoteProtocolError:
        return
    assert isinstance(frame, SERVER_FRAME_TYPES)
    if isinstance(frame, StatusFrame):
        assert obj["event"] == "status_update"
        assert frame.exit_code is None or type(frame.exit_code) is int
    if isinstance(frame, OutputFrame):
        assert frame.data == obj["data"]


# --------------------------------------------------------------------------
# the client role under arbitrary input

wire_status_frames = st.builds(
    lambda s, ext, code: encode_server_frame(StatusFrame(s, ext, code)),
    statuses,
    st.none() | st.sampled_from([(), ALL_EXTENSIONS, ("seq",), ("exit_code",)]),
    st.none() | st.integers(-20, 255),
)
# Weighted towards the frames that drive the state machine.
server_messages: st.SearchStrategy[str | bytes] = st.one_of(
    wire_status_frames,
    wire_status_frames,
    st.sampled_from(
        [
            '{"event":"status_update","status":"SANDBOX_RUNNING"}',
            '{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}',
            '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE"}',
            '{"event":"sandbox_id","sandbox_id":"sandbox-1","sandbox_token":"secret-token"}',
            '{"event":"error","message":"m"}',
        ]
    ),
    output_frames.map(encode_server_frame),
    error_frames.map(encode_server_frame),
    sandbox_id_frames.map(encode_server_frame),
    gap_frames.map(encode_server_frame),
    arbitrary_messages,
)

operations = st.one_of(
    st.tuples(st.just("recv"), server_messages),
    st.tuples(st.just("recv"), server_messages),
    st.tuples(st.just("recv"), server_messages),
    st.tuples(st.just("exec"), languages),
    st.tuples(st.just("stdin"), st.integers(-1, 4)),
    st.tuples(st.just("kill_process"), st.integers(-1, 4)),
    st.tuples(st.just("close_stdin"), st.integers(-1, 4)),
    st.tuples(st.just("kill_process_timed_out"), st.integers(-1, 4)),
    st.tuples(st.just("checkpoint"), st.none()),
    st.tuples(st.just("snapshot"), st.text(max_size=5)),
    st.tuples(st.just("kill_sandbox"), st.none()),
    st.tuples(st.just("kill_sandbox_timed_out"), st.none()),
    st.tuples(st.just("operation_timed_out"), st.none()),
    st.tuples(st.just("snapshot_timed_out"), st.none()),
    st.tuples(st.just("close"), st.none()),
    st.tuples(st.just("drop"), st.sampled_from([1000, 1006, 1011, 1012, 4000])),
    st.tuples(st.just("advance"), st.floats(0, 30)),
)


@dataclass
class Harness:
    """A well-behaved adapter around a ClientProtocol, recording everything it emits."""

    client: ClientProtocol
    events: list[Any] = field(default_factory=list)
    exec_ids: list[int] = field(default_factory=list)
    socket_open: bool = False
    attempt_pending: bool = True
    now: float = 0.0
    #: Execs the adapter gave up on (kill timeout) before their first status.
    ended_before_start: set[int] = field(default_factory=set)

    def collect(self) -> None:
        for text in self.client.data_to_send():
            assert isinstance(text, str)
            json.loads(text)
        new = self.client.events()
        self.events.extend(new)
        for event in new:
            if isinstance(event, ReconnectScheduled):
                self.attempt_pending = True
            if isinstance(event, CloseConnection | SessionEnded):
                self.attempt_pending = self.attempt_pending and not self.client.is_ended

    def connect(self, ok: bool, cookies: list[str], http_status: int | None) -> None:
        self.attempt_pending = False
        self.client.handshake()
        if ok:
            self.socket_open = True
            self.client.connection_opened(cookies)
        else:
            self.client.connection_failed(SandboxConnectionError("refused"), now=self.now, http_status=http_status)

    def user(self, name: str, arg: Any) -> None:
        client = self.client
        exec_id = self.exec_ids[arg] if isinstance(arg, int) and -len(self.exec_ids) <= arg < len(self.exec_ids) else 99
        try:
            if name == "exec":
                self.exec_ids.append(client.exec(arg, "code"))
            elif name == "stdin":
                client.write_stdin(exec_id, "data")
            elif name == "kill_process":
                client.kill_process(exec_id)
            elif name == "close_stdin":
                client.close_stdin(exec_id)
            elif name == "kill_process_timed_out":
                if self.exec_ids and exec_id == self.exec_ids[-1] and client.process_state is ProcessState.STARTING:
                    self.ended_before_start.add(exec_id)
                client.kill_process_timed_out(exec_id)
            elif name == "checkpoint":
                client.checkpoint()
            elif name == "snapshot":
                client.snapshot_filesystem(arg)
            elif name == "kill_sandbox":
                client.kill_sandbox()
            elif name == "kill_sandbox_timed_out":
                client.kill_sandbox_timed_out()
            elif name == "operation_timed_out":
                client.operation_timed_out("setup")
            elif name == "snapshot_timed_out":
                client.snapshot_timed_out()
            elif name == "close":
                client.close()
            else:  # pragma: no cover
                raise AssertionError(name)
        except LocalProtocolError:
            pass  # the only exception a user call may raise

    def run(self, ops: list[tuple[str, Any]], connect_plan: list[tuple[bool, int | None]]) -> None:
        plan = iter(connect_plan)
        for name, arg in ops:
            if self.attempt_pending and not self.client.is_ended:
                ok, http_status = next(plan, (True, None))
                self.connect(ok, ["A=1; Path=/", "B=2"], http_status)
                self.collect()
            if name == "recv":
                if self.socket_open:
                    self.client.receive(arg)  # must never raise
            elif name == "drop":
                if self.socket_open:
                    self.socket_open = False
                    self.client.connection_closed(arg, now=self.now)
            elif name == "advance":
                self.now += arg
            else:
                self.user(name, arg)
            before = len(self.events)
            self.collect()
            if self.socket_open and any(isinstance(e, CloseConnection) for e in self.events[before:]):
                # The adapter obeys CloseConnection; the close handshake completes.
                self.socket_open = False
                self.client.connection_closed(1000, now=self.now)
                self.collect()

    def finish(self) -> None:
        """The socket dies; if a reconnect is then pending, the user gives up."""
        if self.socket_open:
            self.socket_open = False
            before = len(self.events)
            self.client.connection_closed(1006, now=self.now)
            self.collect()
            if not any(isinstance(e, ReconnectScheduled) for e in self.events[before:]):
                # No reconnect: the close alone ends the session.
                assert self.client.is_ended
                assert any(isinstance(e, SessionEnded) for e in self.events)
        if not self.client.is_ended:
            self.client.close()
            self.collect()


def check_invariants(h: Harness) -> None:
    events = h.events
    ended = [i for i, e in enumerate(events) if isinstance(e, SessionEnded)]
    assert len(ended) == 1, events
    # After SessionEnded, at most the CloseConnection that goes with it.
    assert all(isinstance(e, CloseConnection) for e in events[ended[0] + 1 :]), events
    setups = [e for e in events if isinstance(e, SetupComplete | SetupFailed)]
    assert len(setups) <= 1
    assert len([e for e in events if isinstance(e, KillSandboxDone)]) <= 1
    assert len(set(h.exec_ids)) == len(h.exec_ids)
    for exec_id in h.exec_ids:
        mine = [e for e in events if getattr(e, "exec_id", None) == exec_id]
        terminal = [i for i, e in enumerate(mine) if isinstance(e, ExecRejected | ProcessEnded)]
        assert len(terminal) == 1, (exec_id, mine)
        started = [i for i, e in enumerate(mine) if isinstance(e, ExecStarted)]
        assert len(started) <= 1, mine
        if isinstance(mine[terminal[0]], ExecRejected):
            assert started == [], mine
        elif exec_id in h.ended_before_start and not started:
            # kill_process_timed_out() on a starting exec ends it with ProcessEnded
            # (the asyncio adapter treats both ends alike); it never produced output.
            assert not any(isinstance(e, Output) for e in mine), mine
            continue
        else:
            assert started and started[0] < terminal[0], mine
        outputs = [i for i, e in enumerate(mine) if isinstance(e, Output)]
        assert all(started[0] < i < terminal[0] for i in outputs), mine
    # Every exec ends before the session does.
    terminal_positions = [i for i, e in enumerate(events) if isinstance(e, ExecRejected | ProcessEnded)]
    assert all(i < ended[0] for i in terminal_positions)


@given(
    create=st.booleans(),
    auto_reconnect=st.booleans(),
    ops=st.lists(operations, max_size=40),
    connect_plan=st.lists(st.tuples(st.booleans(), st.sampled_from([None, None, 403, 503])), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_client_survives_arbitrary_server_input(
    create: bool,
    auto_reconnect: bool,
    ops: list[tuple[str, Any]],
    connect_plan: list[tuple[bool, int | None]],
    seed: int,
) -> None:
    kwargs: dict[str, Any] = {"init": InitRequest()} if create else {"sandbox_id": "sandbox-1", "sandbox_token": "tok"}
    client = ClientProtocol(
        "http://127.0.0.1:8080",
        auto_reconnect=auto_reconnect,
        reconnect_policy=ReconnectPolicy(deadline=20.0),
        rng=random.Random(seed),
        **kwargs,
    )
    h = Harness(client)
    h.run(ops, connect_plan)
    h.finish()
    check_invariants(h)


# A scripted happy path with random noise mixed in: the state machine gets deep.
happy_script = [
    '{"event":"status_update","status":"SANDBOX_CREATING"}',
    '{"event":"sandbox_id","sandbox_id":"sandbox-1","sandbox_token":"tok"}',
    '{"event":"status_update","status":"SANDBOX_RUNNING","extensions":["exit_code","seq","close_stdin"]}',
]


@given(
    ops=st.lists(operations, max_size=60),
    auto_reconnect=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_client_after_setup_survives_arbitrary_sequences(
    ops: list[tuple[str, Any]], auto_reconnect: bool, seed: int
) -> None:
    client = ClientProtocol(
        "https://h.example", init=InitRequest(), auto_reconnect=auto_reconnect, rng=random.Random(seed)
    )
    h = Harness(client)
    h.connect(True, [], None)
    for text in happy_script:
        client.receive(text)
    h.collect()
    assert isinstance(h.events[0], SetupComplete)
    h.run(ops, [])
    h.finish()
    check_invariants(h)


# --------------------------------------------------------------------------
# user calls


user_calls = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "exec",
                "stdin",
                "kill_process",
                "close_stdin",
                "kill_process_timed_out",
                "checkpoint",
                "snapshot",
                "kill_sandbox",
                "kill_sandbox_timed_out",
                "operation_timed_out",
                "snapshot_timed_out",
                "close",
            ]
        ),
        st.integers(-3, 3) | st.text(max_size=5),
    ),
    max_size=30,
)


@given(calls=user_calls, setup=st.sampled_from(["before-open", "creating", "running"]))
def test_user_calls_raise_only_local_protocol_error(calls: list[tuple[str, Any]], setup: str) -> None:
    client = ClientProtocol("ws://h", init=InitRequest())
    if setup != "before-open":
        client.connection_opened()
    if setup == "running":
        for text in happy_script:
            client.receive(text)
    h = Harness(client, attempt_pending=False)
    for name, arg in calls:
        h.user(name, arg if name != "exec" else str(arg))
        h.collect()


@given(
    url=st.text(max_size=40) | st.from_regex(r"(https?|wss?|ftp)://[^/?#]{0,12}[/?#]?.{0,10}", fullmatch=True),
    sandbox_id=st.none() | st.text(max_size=10),
    token=st.none() | st.text(max_size=10),
)
def test_constructor_raises_only_local_protocol_error(url: str, sandbox_id: str | None, token: str | None) -> None:
    try:
        if sandbox_id is None:
            client = ClientProtocol(url, init=InitRequest())
        else:
            client = ClientProtocol(url, sandbox_id=sandbox_id, sandbox_token=token)
        client.handshake()
    except LocalProtocolError:
        return


def test_local_protocol_error_is_a_state_error() -> None:
    assert issubclass(LocalProtocolError, SandboxStateError)
    with pytest.raises(SandboxStateError):
        ClientProtocol("ws://h", init=InitRequest()).exec("python", "x")


# Exhaustive (state, input) table, as in h2's test_state_machines.py.


def _scenarios() -> dict[str, ClientProtocol]:
    def base(**kw: Any) -> ClientProtocol:
        c = ClientProtocol("ws://h", init=InitRequest(), rng=random.Random(0), **kw)
        c.connection_opened()
        return c

    def running(**kw: Any) -> ClientProtocol:
        c = base(**kw)
        for text in happy_script:
            c.receive(text)
        return c

    out: dict[str, ClientProtocol] = {"creating": base(), "running": running()}
    c = running()
    c.exec("python", "x")
    out["exec-starting"] = c
    c = running()
    c.exec("python", "x")
    c.receive('{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}')
    out["exec-running"] = c
    c = running()
    c.exec("python", "x")
    c.receive('{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}')
    c.kill_process(1)
    out["exec-killing"] = c
    c = running()
    c.checkpoint()
    out["checkpointing"] = c
    c = running()
    c.snapshot_filesystem("s")
    out["snapshotting"] = c
    c = running()
    c.kill_sandbox()
    out["killing-sandbox"] = c
    c = running(auto_reconnect=True)
    c.exec("python", "x")
    c.receive('{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}')
    c.connection_closed(1006, now=0.0)
    c.connection_opened()
    out["reattaching"] = c
    c = ClientProtocol("ws://h", sandbox_id="sandbox-1", sandbox_token="t")
    c.connection_opened()
    c.receive('{"event":"status_update","status":"SANDBOX_RESTORING"}')
    out["restoring"] = c
    return out


SCENARIO_NAMES = list(_scenarios())


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
def test_every_status_in_every_state(scenario: str) -> None:
    for status in [*Status, "SANDBOX_SOMETHING_NEW"]:
        for follow in (
            '{"event":"error","message":"m"}',
            '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE"}',
        ):
            client = _scenarios()[scenario]
            events = client.events()
            client.data_to_send()
            client.receive(encode_server_frame(StatusFrame(status)))
            client.receive(follow)
            client.connection_closed(1006, now=1.0)
            if not client.is_ended:
                client.close()
            events += client.events()
            assert len([e for e in events if isinstance(e, SessionEnded)]) == 1, (scenario, status, events)
            exec_ends = [e for e in events if isinstance(e, ExecRejected | ProcessEnded)]
            if scenario.startswith("exec-") or scenario == "reattaching":
                assert len(exec_ends) == 1, (scenario, status, events)
            else:
                assert exec_ends == []


# --------------------------------------------------------------------------
# the server role under arbitrary input

client_messages: st.SearchStrategy[str | bytes] = st.one_of(
    arbitrary_messages,
    client_action_frames.map(encode_client_frame),
    st.fixed_dictionaries(
        {},
        optional={
            k: json_values | st.sampled_from(["python", "bash", "checkpoint", "kill_process", "stdin", "reconnect"])
            for k in ["action", "event", "language", "code", "data", "name", "last_seq"]
        },
    ).map(json.dumps),
)


@given(
    message=client_messages,
    phase=st.sampled_from(list(ProcessPhase)),
    extensions=st.sampled_from([(), ALL_EXTENSIONS]),
)
def test_server_receive_answers_everything(
    message: str | bytes, phase: ProcessPhase, extensions: tuple[str, ...]
) -> None:
    proto = ServerProtocol(create=False, extensions=extensions)
    proto.process = phase
    request = proto.receive(message)
    out = proto.data_to_send()
    if request is not None:
        assert out == []  # the server acts on it
        return
    if not out:
        # The one silent case: stdin for an exec that has already exited (7.4).
        obj = json.loads(message)
        assert obj.get("event") == "stdin" and "data" in obj and phase is ProcessPhase.EXITED
        return
    first = json.loads(out[0])
    assert first["event"] == "status_update"
    assert first["status"] in {s.value for s in Status}
    assert json.loads(out[1])["event"] == "error"  # every refusal has its error frame (6.1)
    dones = [x for x in out if x == '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE"}']
    assert len(dones) <= 1
    if dones:
        assert phase is not ProcessPhase.RUNNING  # DONE-iff-idle (7.3.5)


@given(message=client_messages, checkpoint=st.booleans(), snapshots=st.booleans())
def test_server_receive_init_answers_everything(message: str | bytes, checkpoint: bool, snapshots: bool) -> None:
    proto = ServerProtocol(create=True, checkpoint_enabled=checkpoint, snapshots_enabled=snapshots)
    options = proto.receive_init(message)
    out = proto.data_to_send()
    assert out[0] == '{"event":"status_update","status":"SANDBOX_CREATING"}'
    if options is None:
        assert out[1] == '{"event":"status_update","status":"SANDBOX_CREATION_ERROR"}'
        assert json.loads(out[2])["event"] == "error"
        assert out[3:] == [Close(4000)]
    else:
        assert out == ['{"event":"status_update","status":"SANDBOX_CREATING"}']
        assert options.idle_timeout is None or (math.isfinite(options.idle_timeout) and options.idle_timeout != 0)
        assert not options.enable_sandbox_handoff or options.enable_checkpoint
        assert options.filesystem_snapshot_name is None or valid_snapshot_name(options.filesystem_snapshot_name)
