"""attach: stopping a target's threads and running system calls in it, kill-safely.

The first stage of the data flow (docs/design.md §5), laid out like CRIU's compel: the
public faces are :class:`PtraceSession` (stop windows) and :class:`StoppedTarget` (one
window), in ``session``; the parts they delegate to each have one job:

* ``diagnose``: why attaching would fail, found before anything is touched
* ``locks``, ``leftovers``: one procksm per target; what a killed procksm left, removed
* ``inject``: raw ptrace(2), wait(2), process_vm_readv/writev(2), the gadget search
* ``target_program``: the target's memory file, its gadgets, exec detection
* ``thread_stop``, ``thread_resume``, ``tracees``: seize and stop every thread; restore,
  redeliver and detach them; the window's threads
* ``injected_call``, ``return_frames``: one injected call; the frames that lead each
  thread back to its own state whatever instant procksm dies at (docs/kill-safety.md)
* ``call_batch``: a window's calls run in the target in one go by procksm's call routine
* ``scratch``, ``scratch_layout``: the scratch area in the target and its layout
* ``seccomp_bpf``, ``seccomp_precheck``: what a target's seccomp filters would answer
* ``deferred_signals``, ``kill_steps``: signals deferred in a window; the kill-test switch
"""

from procksm.attach.session import PtraceSession, StoppedTarget

__all__ = ["PtraceSession", "StoppedTarget"]
