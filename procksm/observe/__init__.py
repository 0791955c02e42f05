"""Watch copy-on-write breaks of merged pages and the lifecycle of targets (issue 6).

A merged page is a MAP_PRIVATE mapping of one of procksm's sealed memfds; the first
write to it copies the page ("breaks" the merge). Two sources find those breaks:

* **eBPF** (``mode == "bpf"``): ``procksm/bpf/cow.bpf.c``, compiled and loaded by a
  short-lived child with bcc (this process never imports bcc or LLVM: docs/design.md
  §11, "The observer's program") and attached from here, runs on the raw tracepoints
  ``page_fault_user`` / ``page_fault_kernel`` and keeps, per target, a map (tgid, 2 MiB
  region) -> 512-bit bitmap of armed pages, behind a Bloom filter of the 64 KiB chunks
  that hold armed pages and a bit per target tgid. The first write
  fault on an armed page clears its bit in the kernel and sends one event, so each page
  counts once and fork COWs of pages that were never merged are filtered out in the
  kernel. It also reports fork/exec/exit; every event wakes ``poll`` at once. It does
  not watch the target's memory calls (munmap, mremap, madvise, brk): a syscalls:*
  tracepoint makes every system call of every process on the machine slower (+34 % per
  getppid, docs/design.md §11).
* **pagemap** (always, and alone when BPF is unavailable or ``use_bpf=False``): a page
  of a merged VMA that still maps the memfd is a file page (pagemap bit 61); one that
  was copied is anonymous (present or swapped, bit 61 clear). ``reconcile(pid)`` reads
  that truth and counts what no fault showed: writes through get_user_pages
  (process_vm_writev, /proc/PID/mem, O_DIRECT) COW without any fault event
  (docs/design.md §3.9), and events a full ring buffer dropped.

API (use from one thread)::

    with CowObserver(use_bpf=None) as obs:      # None: BPF if it works, else pagemap
        obs.mode, obs.fallback_reason           # "bpf" | "pagemap", why not BPF
        obs.set_ranges(pid, [(v.start, v.end) for v in merged_ranges(pid)])
        for ev in obs.poll(0.5):                # CowBreak | Lifecycle, in kernel order
            ...
        obs.counters(pid)                       # CowCounters: cow_breaks, per range
        obs.reconcile(pid)                      # breaks found in pagemap only -> int
        obs.remove_target(pid)
        obs.kernel_totals()                     # the BPF side's per-CPU counters
        obs.detach_probes(); obs.attach_probes()  # pause (no cost) / resume + reconcile

``set_ranges`` replaces the pid's watched ranges (page-aligned [start, end), normally
the merged ranges after a merge) and checks them in pagemap at once. ``poll`` returns
the new breaks (:class:`CowBreak`) and lifecycle events (:class:`Lifecycle`) and runs
``reconcile`` on every target each ``reconcile_interval_s`` (BPF) or on every poll
(pagemap). Each reconcile re-reads the target's layout and drops watched pages that are
no longer in a procksm mapping (munmap, mmap over a range, brk shrinking the heap,
mremap moving it: moved pages are watched again from the next ``set_ranges``), and
re-arms copied pages that read the memfd again (MADV_DONTNEED; a write to one before
that reconcile is not counted). A fault event is counted only if its page is still in a
procksm mapping and pagemap shows it copied: fresh memory mapped where merged pages were
unmapped faults on their still-armed bits, and is no break (the layout is re-read at
once); a page not copied yet is left to the reconcile. Exec drops all, exit ends the
target (its counters stay until ``remove_target``). With
``follow_children=True`` a forked child of a target becomes a target with its parent's
ranges. Counters are exact after ``reconcile``: a page is counted once per break, by
whichever source saw it first.

Without BPF (bcc missing, no kernel headers, no CAP_BPF, a kernel without BPF ring
buffers, the program does not load) a one-line warning names the cause and the fix, and
the same counters come from pagemap polling. :func:`bpf_source` is the program as loaded
(``python -m procksm.observe --ebpf`` prints it, like bcc tools' hidden ``--ebpf``); the
daemon's ``--ebpf`` / ``--no-bpf`` flags map to it and to ``use_bpf=False``.

Measured cost (benchmarks/bpf_overhead.py, 2-vCPU VM with retpolines, a fault ~1.5 us):
~70 ns per fault in any process while the probes are attached, most of it the
tracepoint's own dispatch to BPF; nothing per system call (no syscall tracepoint).
Known limits: a write fault the kernel answers with SIGSEGV (a merged range made
read-only) is counted, then re-armed by the next reconcile but not subtracted; events
of a target whose tgid is reused within milliseconds of its exit could be attributed to
the old target until the exit event is read.

In parts (the pure ones are tested without privileges):

- :mod:`~procksm.observe.observer`: :class:`CowObserver`, the targets and the events
  that change them, and when to reconcile;
- :mod:`~procksm.observe.ledger`: :class:`CowLedger`, one target's watched pages, armed
  or counted, and its counters (pure);
- :mod:`~procksm.observe.target`: one target's pagemap and the reconcile against it;
- :mod:`~procksm.observe.events`: :class:`CowBreak`, :class:`Lifecycle` and
  :func:`parse_event` (pure);
- :mod:`~procksm.observe.bitmaps`: the BPF maps' region bitmaps and Bloom bits (pure);
- :mod:`~procksm.observe.cow_header`: what ``procksm/bpf/cow.h`` defines, mirrored;
- :mod:`~procksm.observe.bpf_program`: why the program cannot be loaded, and the loaded
  program: its probes, counters, events and maps;
- :mod:`~procksm.observe.bcc_loader`: the child that compiles and loads it with bcc;
  :mod:`~procksm.observe.handoff`, taking its fds; :mod:`~procksm.observe.manifest`, what
  comes with them (pure);
- :mod:`~procksm.observe.bpf_syscall`, :mod:`~procksm.observe.bpf_maps`,
  :mod:`~procksm.observe.probes`, :mod:`~procksm.observe.ring_buffer`: bpf(2), the maps,
  attaching, the ring buffer, from Python; :mod:`~procksm.observe.event_buffer`, what it
  reports; :mod:`~procksm.observe.armed_maps`, which pages it watches.
"""

from procksm.observe.bpf_program import bpf_source
from procksm.observe.events import CowBreak, Event, Lifecycle, LifecycleKind, parse_event
from procksm.observe.ledger import CowCounters, CowLedger, RangeCounters
from procksm.observe.observer import CowObserver

__all__ = [
    "CowBreak",
    "CowCounters",
    "CowLedger",
    "CowObserver",
    "Event",
    "Lifecycle",
    "LifecycleKind",
    "RangeCounters",
    "bpf_source",
    "parse_event",
]
