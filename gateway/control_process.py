"""The entry of the control process of `gateway serve --workers N` (`gateway.workers`):
`gateway serve`, made to die with the parent that started it.

The control process runs in a session of its own, so a Ctrl-C to the terminal's process
group does not stop it before the front doors have drained; the price is that a signal to
the group no longer reaches it at all. Linux's `PR_SET_PDEATHSIG` closes that gap: when
the parent dies, even by SIGKILL, the control process gets SIGTERM and stops its engines
as on any stop. Elsewhere the parent's own stop still stops it. Owns nothing else.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["die_with_parent"]


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies; exit now if it already has (this
    process was handed to init before the request took effect)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() == 1:
        sys.exit(0)


if __name__ == "__main__":
    die_with_parent()
    from gateway.cli import main

    sys.exit(main())
