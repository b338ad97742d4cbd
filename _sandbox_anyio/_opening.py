"""What ``Sandbox.create``/``attach`` return, as far as both runtimes share it: the mistakes it catches."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NoReturn

__all__ = ["OpeningBase"]


class OpeningBase:
    """The part of an unopened ``Sandbox.create(...)``/``attach(...)`` that explains misuse.

    A forgotten ``await``/``async with`` or a plain ``with`` is reported where the
    mistake is, rather than later as an ``AttributeError`` about a class the user
    never named. A runtime subclass says how it is opened (:meth:`_how_to_open`)
    and sets ``_used`` once it is.
    """

    #: The word for "opened" in the never-opened warning ("awaited" on asyncio).
    _opened_word = "opened"

    def __init__(self, call: str) -> None:
        self._call = call
        self._used = False

    def _how_to_open(self) -> str:
        raise NotImplementedError

    if not TYPE_CHECKING:
        # At run time only: for mypy, ``Sandbox.create(url).exec`` and a plain ``with`` stay errors.
        def __getattr__(self, name: str) -> NoReturn:
            # Reached only for names this class lacks: a sandbox's (exec, kill, ...) asked of the
            # unopened call. Private and dunder lookups (copy, pickle, inspect) are not a user's
            # mistake and keep their AttributeError.
            if name.startswith("_"):
                raise AttributeError(name)
            self._used = True
            raise TypeError(f"{self._how_to_open()} (`.{name}` was used on the unopened call)")

        def __enter__(self) -> NoReturn:
            self._used = True
            call = f"Sandbox.{self._call}"
            raise TypeError(
                f"{call}() is asynchronous: write `async with {call}(...) as sb:` in async code, "
                "or use sandbox_sync.Sandbox for blocking code"
            )

        def __exit__(self, *exc_info: object) -> None:
            """Never reached (``__enter__`` raises): ``with`` needs both to call ``__enter__`` at all."""

    def __del__(self) -> None:
        # As Python's "coroutine ... was never awaited": a bare ``Sandbox.create(url)`` line
        # otherwise does nothing, silently.
        if not self._used:
            warnings.warn(f"Sandbox.{self._call}() was never {self._opened_word}", RuntimeWarning, stacklevel=1)
