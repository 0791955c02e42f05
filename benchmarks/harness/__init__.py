"""The benchmarks' harness, shared by the scripts in benchmarks/ (their CLIs are their own).

- ``common``: paths, units, the JSON type, interrupt handling.
- ``targets``: the processes a run measures: planted (tests/targets/planted.c), numpy
  workers, redis-server; started fresh for each run, checked and killed afterwards.
- ``workloads``: ``Planted`` (a planted shape with its ideal saving), ``Workload`` (what a
  run starts and how its saving is judged), the suite's W1-W5 and their ``Sizes``.
- ``truth``: where the numbers come from: pagemap (``census``, ``content_ideal``),
  /proc/meminfo, RssAnon, procksm's memfd pages, CPU time of a process tree.
- ``ksm``: the kernel's KSM (/sys/kernel/mm/ksm and ksmd), the one way to talk to it.
- ``runners``: one ``procksm merge``, ksmd until the ideal, ``procksm attach`` until the
  ideal; ``ksm_guarded``, which restores KSM and stops everything on any exit.
- ``suite_runs``, ``goals``, ``report``, ``svg``: suite.py's runs, goals, tables and plot.

The scripts put the repository root first on sys.path before importing this package, so
that the procksm beside them is the one measured.
"""
