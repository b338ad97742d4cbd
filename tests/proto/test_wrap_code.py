"""``wrap_code``: the env=/cwd= prologue, checked without a sandbox (the conformance suite runs it for real)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_proto import RunResult, SandboxException, SandboxProcessError, check_exec_arguments, wrap_code

#: Any text an environment can hold: everything but NUL and lone surrogates.
values = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


def test_no_env_and_no_cwd_leaves_the_code_alone() -> None:
    assert wrap_code("ruby", "puts 1") == "puts 1"
    assert wrap_code("python", "x", env={}) == "x"


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "A\n", "É", "A\x00"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid environment variable name"):
        wrap_code("bash", "true", env={name: "x"})


def test_bad_values_and_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        wrap_code("bash", "true", env={"A": "\x00"})
    with pytest.raises(ValueError, match="NUL"):
        wrap_code("python", "pass", cwd="/a\x00b")
    with pytest.raises(ValueError, match="surrogate"):
        wrap_code("python", "pass", env={"A": "\ud800"})
    with pytest.raises(ValueError, match="empty"):
        wrap_code("python", "pass", cwd="")
    with pytest.raises(TypeError):
        wrap_code("bash", "true", env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        wrap_code("bash", "true", env=[("A", "b")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bash and python"):
        wrap_code("ruby", "puts 1", cwd="/tmp")


def test_type_errors_before_sending() -> None:
    with pytest.raises(TypeError, match="code must be a str, not list"):
        check_exec_arguments("bash", ["echo"])
    with pytest.raises(TypeError, match="language must be a str"):
        check_exec_arguments(b"bash", "echo")
    check_exec_arguments("bash", "echo")


def test_process_error_carries_the_result() -> None:
    result = RunResult("out", "err", 2)
    error = SandboxProcessError("failed", result=result)
    assert isinstance(error, SandboxException) and error.result is result
    assert "characters" in repr(RunResult("x" * 1000, "", 0))  # large outputs are shortened in repr


@pytest.mark.parametrize(
    "code",
    [
        "x = 1\ny = 2",
        "",
        "# comment\n\nx = 1",
        '"""Doc."""\nx = 1',
        '"""Doc."""  # c\nfrom __future__ import annotations\nfrom __future__ import division  # d\nx = 1',
        "from __future__ import (\n    annotations,\n)\nx = 1",
        "\n\ndef f():\n    pass",
        "x = 'é'; y = 1\r\nz = 2\rw = 3",
    ],
)
def test_python_lines_do_not_move(code: str) -> None:
    wrapped = wrap_code("python", code, env={"A": "x\ny"}, cwd="/tmp")
    before, after = ast.parse(code), ast.parse(wrapped)

    def lines(tree: ast.Module) -> list[tuple[str, int]]:
        # The user's names keep their lines (the prologue's own are __import__).
        return sorted((n.id, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id != "__import__")

    assert lines(before) == lines(after)
    assert len(wrapped.splitlines()) == len(code.splitlines()) or (not code and len(wrapped.splitlines()) == 1)
    compile(wrapped, "main.py", "exec")  # __future__ imports still first


def test_python_compound_first_line_moves_by_one() -> None:
    wrapped = wrap_code("python", "def f():\n    pass", cwd="/tmp")
    assert wrapped.splitlines()[1:] == ["def f():", "    pass"]


@given(env=st.dictionaries(names, values, max_size=4), cwd=values.filter(bool))
def test_python_prologue_sets_exactly_the_values(env: dict[str, str], cwd: str) -> None:
    wrapped = wrap_code("python", "RESULT = 1", env=env, cwd=cwd)
    calls: dict[str, object] = {}

    class FakeOs:
        class environ:
            @staticmethod
            def update(mapping: dict[str, str]) -> None:
                calls["env"] = mapping

        @staticmethod
        def chdir(path: str) -> None:
            calls["cwd"] = path

    namespace: dict[str, object] = {"__builtins__": {"__import__": lambda name: FakeOs}}
    exec(compile(wrapped, "main.py", "exec"), namespace)
    assert calls == ({"cwd": cwd, "env": env} if env else {"cwd": cwd})
    assert namespace["RESULT"] == 1
    assert "\n" not in wrapped


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
@given(env=st.dictionaries(names.filter(lambda n: n.upper() not in _BASH_SPECIAL), values, min_size=1, max_size=4))
def test_bash_prologue_exports_exactly_the_values(env: dict[str, str]) -> None:
    code = "printf '%s\\0' " + " ".join(f'"${name}"' for name in env) + "\necho $LINENO"
    wrapped = wrap_code("bash", code, env=env)
    assert wrapped.count("\n") == code.count("\n")
    result = subprocess.run(
        ["bash", "-c", wrapped], capture_output=True, timeout=30, check=False, env={"PATH": os.environ["PATH"]}
    )
    assert result.returncode == 0, result.stderr
    *exported, last = result.stdout.decode().split("\0")
    assert exported == list(env.values())
    assert last == "2\n"  # the user's second line is still line 2


#: Names bash gives a meaning of its own (readonly, or changing the shell): not a quoting matter.
_BASH_SPECIAL = {
    "BASHOPTS", "SHELLOPTS", "EUID", "UID", "PPID", "BASH_VERSINFO", "IFS", "PATH", "POSIXLY_CORRECT",
    "LINENO", "RANDOM", "SECONDS", "BASH_ARGV0", "HISTCMD", "SRANDOM", "EPOCHSECONDS", "EPOCHREALTIME",
    "BASH_XTRACEFD", "GROUPS", "FUNCNAME", "BASH_SOURCE", "BASH_LINENO", "DIRSTACK", "PS4", "BASH_ENV", "ENV",
    "BASH_COMPAT", "LANG", "LC_ALL", "LC_CTYPE", "BASH_ARGC", "BASH_ARGV", "BASH_CMDS", "BASH_ALIASES",
    "BASH_SUBSHELL", "BASHPID", "COMP_WORDBREAKS", "OPTIND", "OPTERR", "HOSTNAME", "HOSTTYPE", "MACHTYPE",
    "OSTYPE", "PWD", "OLDPWD", "SHLVL", "BASH", "BASH_VERSION", "PIPESTATUS", "REPLY", "CDPATH", "HOME", "_",
}  # fmt: skip
