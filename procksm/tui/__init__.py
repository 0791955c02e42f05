"""The live view (``procksm top``): rich renderables of :class:`~procksm.snapshot.Snapshot`
records, a termios key reader and the refresh loop.

* :mod:`procksm.tui.render` — pure functions, Snapshot + view state -> rich renderables;
* :mod:`procksm.tui.keys` — keyboard input (cbreak mode), restored on every exit path;
* :mod:`procksm.tui.live` — the loop: polls a ``source`` callable, draws, reacts to keys
  and signals, calls an ``actions`` object for pause/resume/unmerge;
* :mod:`procksm.tui.source` — where snapshots come from (the daemon's control socket).

The view only renders snapshots handed to it; it never touches a process (docs/design.md §5).
"""

from __future__ import annotations
