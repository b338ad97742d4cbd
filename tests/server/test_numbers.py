"""Numbers out of range in every numeric field of every request: the documented error frames, never a crash.

Python's ``json`` reads integers of any size and the ``NaN``/``Infinity``
literals; ``10**400`` then overflowed ``float()`` in the init check, and the
connection closed with 1000 and no frame.
"""

from __future__ import annotations

import json

import pytest

from sandbox_proto._server import MAX_SEQ, MSG_INVALID_STDIN_SEQ, unsupported_language_message
from sandbox_server import LocalServer

from ._server_wire import Wire, err, st

pytestmark = pytest.mark.anyio

HUGE = "1" + "0" * 400
#: Out of range or of the wrong kind for any number the server reads (JSON literals, as sent).
BAD_NUMBERS = [HUGE, "-" + HUGE, "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.5", "1.0", "-1", "0"]
#: Beyond the integers every JSON reader holds exactly: refused as a sequence number.
BAD_SEQS = [*BAD_NUMBERS, str(MAX_SEQ + 1), str(2**64)]
IDLE_MESSAGE = "Invalid idle_timeout: it must be a number of seconds or null."


def raw(**fields: str) -> str:
    """A JSON object from values given as JSON text, so that ``NaN`` and 400-digit integers go out verbatim."""
    return "{" + ", ".join(f'"{key}": {value}' for key, value in fields.items()) + "}"


async def open_create(local: LocalServer, init: str) -> Wire:
    wire = await Wire.open(local.url, "/create", "extended")
    await wire.send(init)
    await wire.expect(st("SANDBOX_CREATING"))
    return wire


@pytest.mark.parametrize("value", [HUGE, "-" + HUGE, "NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
async def test_init_idle_timeout_out_of_range_is_a_creation_error(local: LocalServer, value: str) -> None:
    wire = await open_create(local, raw(idle_timeout=value))
    await wire.expect(st("SANDBOX_CREATION_ERROR"), err(IDLE_MESSAGE))
    await wire.expect_close(4000)


async def test_init_integer_too_long_to_read_is_a_creation_error(local: LocalServer) -> None:
    wire = await open_create(local, raw(idle_timeout="1" + "0" * 5000))
    await wire.expect(st("SANDBOX_CREATION_ERROR"))
    assert (await wire.frame())["message"].startswith("Invalid init message: ")
    await wire.expect_close(4000)


@pytest.mark.parametrize("value", ["-5", "1.5", "0", str(MAX_SEQ + 1), "1e300"])
async def test_init_idle_timeout_in_range_is_accepted(local: LocalServer, value: str) -> None:
    # Negative expires at the first sweep and 0 disables expiry (3.2); any finite number is a number of seconds.
    wire = await open_create(local, raw(idle_timeout=value))
    assert (await wire.frame())["event"] == "sandbox_id"
    await wire.expect(st("SANDBOX_RUNNING"))
    await wire.close()


@pytest.mark.parametrize("value", [HUGE, "NaN", "-Infinity", "1.5"])
async def test_init_flags_and_snapshot_name_as_numbers(local: LocalServer, value: str) -> None:
    # Flags are read for truthiness (3.2): a huge number is true.
    wire = await open_create(local, raw(enable_checkpoint=value, enable_sandbox_handoff=value))
    await wire.expect(st("SANDBOX_LOCK_ACQUIRING"), st("SANDBOX_LOCK_ACQUIRED"))
    assert (await wire.frame())["event"] == "sandbox_id"
    await wire.expect(st("SANDBOX_RUNNING"))
    await wire.close()
    wire = await open_create(local, raw(enable_sandbox_handoff=value))
    await wire.expect(st("SANDBOX_CREATION_ERROR"), err("Sandbox handoff requires checkpointing to be enabled."))
    await wire.expect_close(4000)
    wire = await open_create(local, raw(filesystem_snapshot_name=value))
    await wire.expect(st("SANDBOX_CREATION_ERROR"))
    assert (await wire.frame())["message"].startswith("Invalid filesystem snapshot name")
    await wire.expect_close(4000)


async def test_every_numeric_field_after_setup_gets_its_error_and_the_connection_stays(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    for value in BAD_NUMBERS:
        # exec: an unsupported language (with DONE: nothing runs), the exec ref ignored, the name refused.
        await wire.send(raw(language=value, code='"print(1)"'))
        message = unsupported_language_message(json.loads(value))
        await wire.expect(
            st("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"), err(message), st("SANDBOX_EXECUTION_DONE")
        )
        await wire.send(raw(action='"snapshot_filesystem"', name=value))
        await wire.expect(st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"))
        assert (await wire.frame())["event"] == "error"
        # reconnect: a malformed last_seq is read as absent (no exec: one DONE, S1).
        await wire.send(raw(action='"reconnect"', last_seq=value))
        await wire.expect(st("SANDBOX_EXECUTION_DONE"))
        # Actions read no other field (3.5).
        await wire.send(raw(action='"kill_process"', seq=value, x=value))
        await wire.expect(st("SANDBOX_EXECUTION_FORCE_KILLED"))

    await wire.send(raw(language='"bash"', code='"cat"', ref=HUGE))
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))  # no ref echoed: it was not a string
    for value in BAD_SEQS:
        await wire.send(raw(event='"stdin"', data='"lost\\n"', seq=value))
        await wire.expect(st("SANDBOX_STDIN_ERROR"), err(MSG_INVALID_STDIN_SEQ))
        await wire.send(raw(action='"close_stdin"', seq=value))
        await wire.expect(st("SANDBOX_STDIN_ERROR"), err(MSG_INVALID_STDIN_SEQ))
        await wire.send(raw(event='"stdin"', data=value))
        await wire.expect(st("SANDBOX_ERROR"))
        assert (await wire.frame())["message"].startswith("stdin 'data' must be a string")
    # The largest sequence number is still one; the exec got nothing refused.
    await wire.send({"event": "stdin", "data": "kept\n", "seq": MAX_SEQ})
    await wire.send({"action": "close_stdin"})
    result = await wire.collect()
    assert result.stdout == "kept\n"
    assert result.exit_code == 0

    # A frame whose integer is too long to read at all: malformed (S6), and still open.
    await wire.send(raw(event='"stdin"', data='"x"', seq="1" + "0" * 5000))
    await wire.expect(st("SANDBOX_ERROR"))
    assert (await wire.frame())["message"].startswith("Malformed message: ")
    assert (await wire.run("bash", "echo still here")).stdout == "still here\n"
    await wire.close()


@pytest.mark.parametrize("value", [HUGE, "NaN", "1.5"])
async def test_exec_code_as_a_number_is_the_unexpected_error_path(local: LocalServer, value: str) -> None:
    wire = await Wire.create(local.url, "extended")
    await wire.send(raw(language='"python"', code=value))
    await wire.expect(st("SANDBOX_ERROR"))
    assert (await wire.frame())["message"].startswith("'code' must be a string")  # 3.3: SANDBOX_ERROR + 4000
    await wire.expect_close(4000)
