"""sage_nn's warnings, said once each and in the command line's words by ``sage``.

A Python user gets real warnings (``warnings.warn``): filterable, catchable, with the
Python-level advice (``min_count=``, ``attributes=[...]``). The same warning repeats once
per site or stage a run visits, which on the command line is noise, and its advice names
Python parameters a ``sage`` user cannot set. So each :class:`SageWarning` carries a
second wording, ``cli`` (what to do with the command's flags), and a ``key`` that tells
distinct facts apart; :func:`cli_warnings` shows each key once as a plain line and keeps
other libraries' warnings out of the command's output.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

__all__ = ["SageWarning", "cli_warnings"]


class SageWarning(UserWarning):
    """A sage_nn warning. ``cli``: the same in the command line's words, with what to do
    from it; ``key``: repeats of one fact share it (the CLI says each key once)."""

    def __init__(self, message: str, cli: str | None = None, key: str = ""):
        super().__init__(message)
        self.cli = cli or message
        self.key = key


def _from_sage_nn(message: Warning, category: type) -> bool:
    """sage_nn's own warnings: a :class:`SageWarning`, or a plain ``warnings.warn(text)``
    (a UserWarning) called by sage_nn code. A library's warning is never one, even when
    its stack level points into sage_nn (matplotlib's layout notices, numpy's
    RuntimeWarnings, transformers' FutureWarnings)."""
    if isinstance(message, SageWarning):
        return True
    frame = sys._getframe(2)  # past show() to the warnings module, then its caller
    while frame is not None and frame.f_globals.get("__name__") == "warnings":
        frame = frame.f_back
    caller = frame.f_globals.get("__name__", "") if frame is not None else ""
    return category is UserWarning and caller.split(".")[0] == "sage_nn"


@contextlib.contextmanager
def cli_warnings(prefix: str, stream=None) -> Iterator[set]:
    """Inside the block, each of sage_nn's warnings is printed once, as
    ``{prefix}: warning: {its cli wording}``, and every other warning is dropped. Yields
    the set of keys said. ``python -W ...`` (``sys.warnoptions``) keeps Python's own
    handling: whoever asks for warnings by flag sees them as Python prints them."""
    said: set = set()
    if sys.warnoptions:
        yield said
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if not _from_sage_nn(message, category):
            return
        key = (category.__name__, getattr(message, "key", "") or str(message))
        if key in said:
            return
        said.add(key)
        text = " ".join(str(getattr(message, "cli", message)).split())
        print(f"{prefix}: warning: {text}", file=stream or sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every repeat reaches show(), which says it once
        warnings.showwarning = show
        yield said
