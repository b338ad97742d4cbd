"""A griffe extension for the API reference: show Sphinx roles in docstrings as code.

The docstrings say ``:meth:`close``` and the like; mkdocstrings would print the
role literally, so it is reduced to a code span.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|exc|data|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)


class CommentDocs(griffe.Extension):
    """Attributes documented by ``#:`` comments above them (Sphinx style) get those as docstrings.

    ``self.returncode = None`` under ``#: The exit status ...`` is then documented
    in the reference like a property with a docstring.
    """

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or not attr.lineno:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except (KeyError, TypeError):
            return
        comment: list[str] = []
        index = attr.lineno - 2  # the line above the assignment (lineno counts from 1)
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        if comment:
            attr.docstring = griffe.Docstring(_ROLE.sub(r"`\1`", "\n".join(comment)), lineno=index + 2, parent=attr)
