"""``run``'s result, and ``env=``/``cwd=`` for an exec, done on the client.

The protocol has no field for a process's environment or working directory
(section 9.1: every exec starts in ``/`` with the container's environment), so
the client puts a prologue in front of the code that sets them. It then works
against the upstream service too. Every name, value and path reaches the
prologue as a quoted literal (never spliced in as code), and the prologue
shares the first line with the user's code wherever the language allows, so
line numbers in error messages and tracebacks stay those of the user's code.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

#: The languages ``env=``/``cwd=`` know how to set up (those of the upstream service).
PROLOGUE_LANGUAGES = ("bash", "python")

#: What both bash and POSIX accept as an environment variable name.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Python's own line ends (not those of ``str.splitlines``, which also splits at \x0c, \u2028...).
_PYTHON_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")

#: Statements that cannot follow ``prologue;`` on the same line.
_COMPOUND: tuple[type[ast.stmt], ...] = tuple(
    node
    for name in (
        "FunctionDef",
        "AsyncFunctionDef",
        "ClassDef",
        "If",
        "For",
        "AsyncFor",
        "While",
        "With",
        "AsyncWith",
        "Try",
        "TryStar",
        "Match",
    )
    if isinstance(node := getattr(ast, name, None), type)
)

#: Characters that need $'...' quoting in bash: a raw newline inside '...' would move every later line.
_BASH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BASH_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True, slots=True)
class RunResult:
    """What ``Sandbox.run`` returns: the whole output and the exit code of one process.

    ``exit_code`` is ``None`` when the server cannot tell (the protocol has no exit
    status; only servers with the ``exit_code`` extension report it).
    """

    stdout: str
    stderr: str
    exit_code: int | None

    def __repr__(self) -> str:
        # Outputs can be megabytes: a repr in a log or a failed assertion shows their start.
        return f"RunResult(stdout={_short(self.stdout)}, stderr={_short(self.stderr)}, exit_code={self.exit_code!r})"


def _short(text: str, limit: int = 200) -> str:
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_exec_arguments(language: object, code: object) -> None:
    """Refuse, before anything is sent, what the server would answer by ending the session."""
    if not isinstance(language, str):
        raise TypeError(f"language must be a str such as 'python' or 'bash', not {type(language).__name__}")
    if not isinstance(code, str):
        hint = " (decode it first)" if isinstance(code, bytes | bytearray) else ""
        raise TypeError(f"code must be a str, not {type(code).__name__}{hint}")


def wrap_code(language: str, code: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """``code`` with a prologue that sets ``env`` and changes to ``cwd`` first (unchanged if neither).

    Raises :class:`TypeError` or :class:`ValueError` for a name, value or path
    that cannot be passed on verbatim: names must match ``[A-Za-z_][A-Za-z0-9_]*``,
    and no value or path may contain NUL (no environment or path can hold one).
    """
    items = _check_env(env)
    if cwd is not None:
        _check_text("cwd", cwd)
        if not cwd:
            raise ValueError("cwd must not be empty")
    if not items and cwd is None:
        return code
    if language == "bash":
        return _bash_prologue(items, cwd) + code
    if language == "python":
        return _wrap_python(code, _python_prologue(items, cwd))
    raise ValueError(f"env= and cwd= work for {' and '.join(PROLOGUE_LANGUAGES)}, not {language!r}")


def _check_text(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character, which no environment or path can hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid text (a lone surrogate?)") from None


def _check_env(env: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if env is None:
        return []
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    items = list(env.items())
    for name, value in items:
        if not isinstance(name, str):
            raise TypeError(f"env names must be str, not {type(name).__name__}")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(
                f"invalid environment variable name {name!r}: use letters, digits and _, not first a digit"
            )
        _check_text(f"env[{name!r}]", value)
    return items


def _bash_quote(text: str) -> str:
    """A bash word that is exactly ``text``, on one line (so later line numbers do not move)."""
    if not _BASH_CONTROL.search(text):
        return shlex.quote(text)
    # ANSI-C quoting: no expansion of any kind happens inside $'...', only these escapes.
    escaped = "".join(
        _BASH_ESCAPES.get(char, f"\\x{ord(char):02x}" if _BASH_CONTROL.match(char) else char) for char in text
    )
    return f"$'{escaped}'"


def _bash_prologue(items: list[tuple[str, str]], cwd: str | None) -> str:
    # Ends in "; " and goes on the user's first line: bash accepts any command, comment or
    # blank after it, and the user's line 1 stays line 1.
    parts = []
    if cwd is not None:
        # cd first, with CDPATH cleared, so a CDPATH in env= cannot redirect it or make it print.
        parts.append(f"CDPATH= cd -- {_bash_quote(cwd)} || exit; ")
    if items:
        # `|| exit`: a name bash refuses (readonly UID, SHELLOPTS...) stops the run with bash's message.
        exports = " ".join(f"{name}={_bash_quote(value)}" for name, value in items)
        parts.append(f"export {exports} || exit; ")
    return "".join(parts)


def _python_prologue(items: list[tuple[str, str]], cwd: str | None) -> str:
    # repr() of a str is always one complete literal on one line (newlines and quotes escaped).
    parts = []
    if cwd is not None:
        parts.append(f"__import__('os').chdir({cwd!r})")
    if items:
        mapping = ", ".join(f"{name!r}: {value!r}" for name, value in items)
        parts.append(f"__import__('os').environ.update({{{mapping}}})")
    return "; ".join(parts)


def _wrap_python(code: str, prologue: str) -> str:
    """Insert ``prologue`` so that it runs first and no line of ``code`` moves.

    A module docstring and ``from __future__`` imports must stay first: the
    prologue follows them on the line where they end. Otherwise it opens line
    1, before the first statement (a simple statement, a comment or a blank).
    Only when line 1 opens a compound statement (``def``, ``if``, a decorator...),
    or the code does not parse here (the sandbox reports the error), does it
    take a line of its own, moving every line of the code down by one.
    """
    try:
        body = ast.parse(code).body
    except Exception:  # SyntaxError, or syntax newer than this interpreter: the sandbox judges
        return f"{prologue}\n{code}"
    anchor: ast.stmt | None = None
    for statement in body:
        is_docstring = (
            anchor is None
            and statement is body[0]
            and isinstance(statement, ast.Expr)
            and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str)
        )
        if is_docstring or (isinstance(statement, ast.ImportFrom) and statement.module == "__future__"):
            anchor = statement
        else:
            break
    lines = _PYTHON_LINE.findall(code)
    if anchor is not None and anchor.end_lineno is not None and anchor.end_col_offset is not None:
        index = anchor.end_lineno - 1
        raw = lines[index].encode()
        # ast's columns count UTF-8 bytes.
        head, tail = raw[: anchor.end_col_offset].decode(), raw[anchor.end_col_offset :].decode()
        lines[index] = f"{head}; {prologue}{tail}"
        return "".join(lines)
    if body:
        first = body[0]
        first_line = min([first.lineno, *(node.lineno for node in getattr(first, "decorator_list", ()))])
        if first_line == 1 and isinstance(first, _COMPOUND):
            return f"{prologue}\n{code}"
    # Line 1 holds a simple statement, a comment, or nothing: "prologue; " goes in front of it.
    return f"{prologue}; {code}"
