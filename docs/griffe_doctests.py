"""A griffe extension that lets mkdocstrings render this package's docstrings as written.

The docstrings are Google style with two habits Markdown does not read: bare ``>>>`` examples
(Markdown takes ``>`` for a quote) and Sphinx roles such as ``:class:`Residual```. This
extension fences every run of doctest lines as a ``pycon`` block and turns roles into code
spans, before griffe parses the sections. Loaded by ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):`~?([^`]+)`")


def fence_doctests(text: str) -> str:
    """Wrap each run of top-level ``>>>`` lines (with its output, up to a blank line) in a fence.

    >>> fence_doctests("Text.\\n\\n>>> 1 + 1\\n2\\n\\nMore.").splitlines()
    ['Text.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
    """
    out: list[str] = []
    in_doctest = in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_doctest and line.startswith(">>>"):
            out.append("```pycon")
            in_doctest = True
        elif in_doctest and not line.strip():
            out.append("```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


class Doctests(griffe.Extension):
    """Fence doctests and drop Sphinx roles in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not getattr(obj.docstring, "_fenced", False):
            obj.docstring.value = ROLE.sub(r"`\1`", fence_doctests(obj.docstring.value))
            obj.docstring._fenced = True  # type: ignore[attr-defined]
