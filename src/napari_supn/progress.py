"""Progress callbacks and cancellation shared by every long-running loop.

Long loops (training, scoring, segmentation of many fields) take two optional
hooks: ``progress(done, total)`` reports work finished so far, and
``cancel()`` returns True when the user requested a stop. A loop that receives a
cancel request raises :class:`Cancelled` after leaving its outputs in a
consistent state (for training: the last good checkpoint on disk).
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """Raised when a long-running operation stops because cancel() returned True."""


def check_cancel(cancel: Optional[CancelCheck], what: str = "operation") -> None:
    """Raise :class:`Cancelled` if ``cancel`` is given and returns True."""
    if cancel is not None and cancel():
        raise Cancelled(f"{what} cancelled by the user")


def report(progress: Optional[ProgressCallback], done: int, total: int) -> None:
    """Call ``progress(done, total)`` when a callback is given."""
    if progress is not None:
        progress(done, total)
