"""``procksm attach``: the scanner daemon, KSM's ksmd in user space, in parts.

- :mod:`~procksm.daemon.core`: :class:`Daemon`, the loop that puts the parts together;
- :mod:`~procksm.daemon.settings`: the knobs (``procksm ctl set``) and options;
- :mod:`~procksm.daemon.registry`: targets, registered ranges, lifecycle, the cursor;
- :mod:`~procksm.daemon.scanpass`: a batch of windows through the index to the merger;
- :mod:`~procksm.daemon.window`: which pages a window covers, and reading them;
- :mod:`~procksm.daemon.smartscan`: the kernel's smart scan (skip pages that stay unique);
- :mod:`~procksm.daemon.merger`: one long-lived merge engine, a batch in, an outcome out;
- :mod:`~procksm.daemon.scheduler`: sleep, CPU cap, idle back-off;
- :mod:`~procksm.daemon.watch`: the copy-on-write observer's events;
- :mod:`~procksm.daemon.accounting`: counters and snapshots (pagemap truth);
- :mod:`~procksm.daemon.requests`: control requests run in the loop's thread.

Data flows one way: registry -> scanpass (window -> index -> merger) -> accounting;
the control socket (procksm.control) and the live view read snapshots.

The index itself (checksums, stable and unstable trees) is :mod:`procksm.index`, shared
with ``procksm merge``.
"""

from procksm.daemon.core import Daemon
from procksm.daemon.registry import Registration, parse_region
from procksm.daemon.scheduler import idle_sleep
from procksm.daemon.settings import SETTING_LIMITS, DaemonOptions, Settings, parse_settings

__all__ = [
    "SETTING_LIMITS",
    "Daemon",
    "DaemonOptions",
    "Registration",
    "Settings",
    "idle_sleep",
    "parse_region",
    "parse_settings",
]
