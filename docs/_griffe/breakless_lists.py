"""A griffe extension for the API reference: lists in docstrings need no blank line before them.

reftkit's docstrings are prose in which a list often follows its introducing line directly ("Decisions:" and
then "- ..." lines). Markdown reads such a list as part of the paragraph, so this extension inserts the blank
line that Markdown needs before the first item of each list, outside fenced code. Only the rendered docs see the
change; the source is untouched.
"""

from __future__ import annotations

import re

import griffe

_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+\S")
_FENCE = re.compile(r"^\s*(```|~~~)")


def separate_lists(text: str) -> str:
    out: list[str] = []
    in_fence = in_list = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            if not line.strip():
                in_list = False
            elif _ITEM.match(line):
                if out and out[-1].strip() and not in_list:
                    out.append("")
                in_list = True
        out.append(line)
    return "\n".join(out)


class BreaklessLists(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = separate_lists(obj.docstring.value)
