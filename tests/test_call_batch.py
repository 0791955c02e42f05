"""procksm's call routine (procksm.attach.call_batch, procksm/arch/x86_64_batch.S): its
bytes are the source's, and in real targets its tables do what they say (results,
EXPECT, ALWAYS, arguments from earlier results, fstat checks) while the threads see
nothing (tests/targets/blockers.c counts every anomaly)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procksm import PAGE_SIZE
from procksm.arch import x86_64_batch
from procksm.arch.x86_64 import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    SYS_close,
    SYS_getpid,
    SYS_madvise,
    SYS_mmap,
    SYS_munmap,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
)
from procksm.arch.x86_64_batch import NOT_RUN, Entry, encode_table
from procksm.attach import PtraceSession, call_batch
from procksm.attach.call_batch import CallBatch
from procksm.errors import PtraceError, PtraceTimeout
from procksm.slots import FileIdentity
from procksm.unmerge import unmerge
from tests.conftest import ROOT, Target, build_c_target
from tests.test_attach import assert_no_errors, assert_running_untraced, tid_named, wait_blocked

SOURCE = ROOT / "procksm" / "arch" / "x86_64_batch.S"


def test_the_routines_bytes_are_its_source_assembled(tmp_path: Path) -> None:
    assembler, objcopy = shutil.which("as"), shutil.which("objcopy")
    assert assembler and objcopy, "binutils (as, objcopy) assemble the routine's source"
    subprocess.run([assembler, "-o", tmp_path / "b.o", SOURCE], check=True)
    subprocess.run(
        [objcopy, "-O", "binary", "-j", ".text", tmp_path / "b.o", tmp_path / "b.bin"],
        check=True,
    )
    code = (tmp_path / "b.bin").read_bytes()
    assert code == x86_64_batch.ROUTINE
    assert code[x86_64_batch.CALL_INSN : x86_64_batch.CALL_INSN + 2] == b"\x0f\x05"
    assert code[x86_64_batch.WAKE_INSN - 5 : x86_64_batch.WAKE_INSN + 2] == (
        b"\xb8" + (202).to_bytes(4, "little") + b"\x0f\x05"  # mov eax, SYS_futex; syscall
    )
    assert code[x86_64_batch.PARK_INSN : x86_64_batch.PARK_INSN + 3] == b"\x0f\x05\xc3"


def test_a_table_refers_only_to_earlier_results() -> None:
    with pytest.raises(ValueError, match="not before it"):
        encode_table([Entry(1, (0,), x86_64_batch.ARG_FROM, source=0, slot=0)])
    batch = CallBatch()
    first = batch.call(SYS_getpid)
    batch.call(SYS_close, first, always=True)
    table = encode_table(batch.entries)
    assert len(table) == 2 * x86_64_batch.ENTRY_SIZE
    flags = int.from_bytes(table[x86_64_batch.ENTRY_SIZE :][:8], "little")
    assert flags == x86_64_batch.ALWAYS | x86_64_batch.ARG_FROM | (0 << 4) | (0 << 8)
    with pytest.raises(ValueError, match="at most one"):
        batch.call(SYS_munmap, first, first)


def test_results_are_read_from_a_whole_table() -> None:
    """Each entry's result (preset NOT_RUN when encoded); a table read back short is an
    error, never fewer results."""
    batch = CallBatch()
    batch.call(SYS_getpid)
    batch.call(SYS_getpid, expect=1)
    table = bytearray(encode_table(batch.entries))
    assert x86_64_batch.decode_results(table, 2) == [NOT_RUN, NOT_RUN]
    table[x86_64_batch.RESULT : x86_64_batch.RESULT + 8] = (-9).to_bytes(8, "little", signed=True)
    assert x86_64_batch.decode_results(bytes(table), 2) == [-9, NOT_RUN]
    with pytest.raises(ValueError, match="short"):
        x86_64_batch.decode_results(table[:-8], 2)


@pytest.fixture(scope="module")
def blockers_exe() -> Path:
    return build_c_target("blockers")


def test_a_batch_runs_its_table_in_one_go(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    memfd = os.memfd_create("procksm-test")
    try:
        with PtraceSession(pid) as session, session.stopped() as st:
            st.hold_others()
            batch = CallBatch()
            me = batch.call(SYS_getpid, expect=pid)
            anon = batch.call(
                SYS_mmap, 0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
            )  # fmt: skip
            unmapped = batch.call(SYS_munmap, anon, 2 * PAGE_SIZE)
            pidfd = batch.call(SYS_pidfd_open, os.getpid(), 0)
            fd = batch.call(SYS_pidfd_getfd, pidfd, memfd, 0)
            ours = FileIdentity.of_fd(memfd)
            good = batch.check_stat(fd, ours, st.stat_buffer())
            wrong = batch.check_stat(fd, (ours.dev, ours.ino + 1), st.stat_buffer())
            skipped = batch.call(SYS_getpid)  # after a failed check: not run
            always = batch.call(SYS_getpid, always=True)
            batch.call(SYS_close, fd, always=True)
            batch.call(SYS_close, pidfd, always=True)
            failed = batch.call(SYS_munmap, 1, PAGE_SIZE, always=True)
            after_failed = batch.call(SYS_close, failed, always=True)  # its source failed
            started = time.perf_counter()
            results = st.run_batch(batch)
            took = time.perf_counter() - started
            assert results[me] == pid
            assert results[anon] > 0 and results[unmapped] == 0
            assert results.ok(pidfd) and results.ok(fd)
            assert [results[r] for r, _ in good] == [want for _, want in good]
            assert results[wrong[1][0]] == ours.ino  # the mismatch that skips what follows
            assert results[skipped] == NOT_RUN and not results.ran(skipped)
            assert results[always] == pid
            assert results[failed] == -errno.EINVAL
            assert results[after_failed] == NOT_RUN
            # the thread sits in the routine's park until the window ends (or, stopped
            # before it, right after its wake-up of procksm)
            regs = st.registers()
            after = (x86_64_batch.PARK_INSN + 2, x86_64_batch.WAKE_INSN + 2)
            assert regs.rip - session._scratch.routine in after
            assert st.registers(tid_named(pid, "b-sleep")) != st.saved_registers(
                tid_named(pid, "b-sleep")
            )  # gated
        fds = os.listdir(f"/proc/{pid}/fd")
        assert not any("procksm" in os.readlink(f"/proc/{pid}/fd/{n}") for n in fds)
        print(f"\n{len(batch)} calls in one batch: {took * 1e6:.0f} us")
    finally:
        os.close(memfd)
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)
    assert target.command("poke") == "OK reads=1"


def test_the_end_of_a_batch_wakes_procksm(
    privileged: None,
    spawn: Callable[..., Target],
    blockers_exe: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """procksm sleeps on the table's done word in its own MAP_SHARED view of the table's
    page, and the routine's FUTEX_WAKE ends that sleep: with the sleep's bound set to 20 s,
    each batch still ends within milliseconds (before, procksm polled the target's
    memory, ~170 us of its CPU a window). The results are read from the same view."""
    monkeypatch.setattr(call_batch, "WAKE_WAIT_S", 20.0)
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    with PtraceSession(pid) as session:
        for _ in range(3):
            with session.stopped() as st:
                st.hold_others()
                batch = CallBatch()
                me = batch.call(SYS_getpid)
                # long enough (a 64 MiB populate: ~10 ms) that procksm sleeps before the end
                size, prot = 64 << 20, PROT_READ | PROT_WRITE
                anon = batch.call(SYS_mmap, 0, size, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                filled = batch.call(SYS_madvise, anon, size, 23)  # MADV_POPULATE_WRITE
                batch.call(SYS_munmap, anon, size, always=True)
                started = time.perf_counter()
                results = st.run_batch(batch)
                assert time.perf_counter() - started < 5.0, "the routine did not wake procksm"
                assert results[me] == pid and results[filled] == 0
        shared = session._scratch.shared
        assert shared is not None
        assert shared.word(PAGE_SIZE) == 1  # the done word, seen through procksm's view
    assert session._scratch.shared is None  # procksm's view goes with the area
    assert "procksm" not in Path(f"/proc/{pid}/maps").read_text()
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)


def test_the_routine_compares_the_targets_bytes(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """EQUAL and ZERO compare bytes in the target (a merge window's comparison, made by
    the routine): equal ranges give their length, which a later call takes as an
    argument (EQUAL: the value it was given, ZERO: the length); a range that differs in
    its last byte gives UNEQUAL and the call that depends on it is skipped."""
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    size = 4 * PAGE_SIZE
    with PtraceSession(pid) as session, session.stopped() as st:
        prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
        base = st.syscall_checked(SYS_mmap, 0, 4 * size, prot, flags, -1, 0, name="mmap")
        a, b, c, zeros = base, base + size, base + 2 * size, base + 3 * size
        pattern = os.urandom(size)
        st.write_memory(a, pattern)
        st.write_memory(b, pattern)
        st.write_memory(c, pattern[:-1] + bytes([pattern[-1] ^ 1]))
        st.hold_others()
        batch = CallBatch()
        same = batch.equal(a, b, size, size)
        last = batch.equal(a, c, size, size)
        first = batch.equal(c + PAGE_SIZE, b + PAGE_SIZE, PAGE_SIZE, 7)  # equal pages
        empty = batch.zero(zeros, size)
        not_empty = batch.zero(a, size)
        kept = batch.call(SYS_madvise, a, same, 0)  # MADV_NORMAL, length from `same`
        skipped = batch.call(SYS_madvise, a, last, 0)
        results = st.run_batch(batch)
        assert results[same] == size and results[first] == 7
        assert results[last] == x86_64_batch.UNEQUAL
        assert results[empty] == size and results[not_empty] == x86_64_batch.UNEQUAL
        assert results[kept] == 0 and results[skipped] == NOT_RUN
        st.syscall_checked(SYS_munmap, base, 4 * size, name="munmap")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        CallBatch().equal(a, b, 40, 0)
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)


def test_the_park_keeps_a_sleepers_restart_block(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """The batch runs in a thread that sleeps in nanosleep (restarted through its restart
    block after its first stop): its sleep goes on, neither short nor EINTR (b-nap
    counts restart codes, b-sleep short sleeps). An rt_sigreturn or a timed futex wait
    on the way would have replaced the restart block."""
    target = spawn([blockers_exe, "--bare", "--sleepers", "1"])
    pid = target.pid
    wait_blocked(pid, {"b-nap"})
    nap = tid_named(pid, "b-nap")
    with PtraceSession(pid) as session:
        for _ in range(5):
            with session.stopped() as st:
                st._threads._injector_tid = nap  # the sleeper runs the batch
                st.hold_others()
                batch = CallBatch()
                me = batch.call(SYS_getpid)
                assert st.run_batch(batch)[me] == pid
            time.sleep(0.02)
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)


def test_a_batch_that_outlives_the_timeout_is_left_to_finish(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """A batch still running after the timeout (a 1 GiB populate): the window ends as
    procksm's death would end it, nothing more is injected, and the thread finishes the
    batch (its ALWAYS calls included) and goes back by itself; the next window takes it
    over. The threads notice nothing."""
    madv_populate_write, size = 23, 1 << 30  # ~0.3 s of zeroing: far over 2 x 20 ms
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    with PtraceSession(pid) as session:
        with pytest.raises(PtraceTimeout, match="did not complete"), session.stopped() as st:
            prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
            addr = st.syscall_checked(SYS_mmap, 0, size, prot, flags, -1, 0, name="mmap")
            st.hold_others()
            session.timeout = 0.02
            batch = CallBatch()
            batch.call(SYS_madvise, addr, size, madv_populate_write)
            batch.call(SYS_munmap, addr, size, always=True)
            st.run_batch(batch)
        assert st.abandoned is not None
        session.timeout = 10
        deadline = time.monotonic() + 10
        while True:  # the orphan, once back from the populate, the munmap and the park
            try:
                with session.stopped():
                    break
            except PtraceError as e:
                # it still runs the routine: no window may inject, nor unmap its code
                assert "still runs the calls" in str(e)
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert mapping_size(pid, addr) == 0  # the ALWAYS munmap ran without procksm
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)


def test_a_thread_that_leaves_its_park_ends_the_window(
    privileged: None,
    spawn: Callable[..., Target],
    blockers_exe: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """procksm not scheduled for longer than the park's timeout: the thread goes back to
    its own state by itself (through the gate's wake-up); procksm then finds it outside
    the routine and ends the window as its death would. The results are kept."""
    monkeypatch.setattr(call_batch, "PARK_NS", 20_000_000)
    waited = call_batch.BatchRunner._wait_done

    def late(self: call_batch.BatchRunner, tracee: Any, shared: Any) -> None:
        waited(self, tracee, shared)
        time.sleep(0.2)  # ten parks' worth

    monkeypatch.setattr(call_batch.BatchRunner, "_wait_done", late)
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    with PtraceSession(pid) as session:
        with session.stopped() as st:
            st.hold_others()
            batch = CallBatch()
            me = batch.call(SYS_getpid)
            assert st.run_batch(batch)[me] == pid
            assert st.abandoned is not None and "left its park" in st.abandoned
            with pytest.raises(PtraceTimeout):
                st.run_batch(batch)
        with session.stopped():  # the next window is an ordinary one
            pass
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)
    assert target.command("poke") == "OK reads=1"


def mapping_size(pid: int, addr: int) -> int:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= addr < end:
            return end - start
    return 0


def test_a_new_procksm_leaves_a_dead_ones_routine_until_its_thread_is_out(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """procksm SIGKILLed right after it let a long batch run (a 1 GiB populate), and at
    once a new procksm in the target (unmerge removes what a dead procksm left): the
    dead one's scratch area holds the code and table the thread is still running, so it
    is removed only once the thread has left it (before, the thread returned into an
    unmapped routine: SIGSEGV); the unmerge waits for that."""
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    child = os.fork()
    if child == 0:  # pragma: no cover - the procksm that dies
        try:
            from procksm.attach import kill_steps

            kill_steps.arm("batch:0#1+0")
            with PtraceSession(pid) as session, session.stopped() as st:
                prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
                addr = st.syscall_checked(SYS_mmap, 0, 1 << 30, prot, flags, -1, 0)
                st.hold_others()
                batch = CallBatch()
                batch.call(SYS_madvise, addr, 1 << 30, 23)  # MADV_POPULATE_WRITE
                batch.call(SYS_munmap, addr, 1 << 30, always=True)
                st.run_batch(batch)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status), "the switch did not kill the child after the batch"
    # At once: the thread is still in the populate. The unmerge leaves the area while the
    # thread is inside, and comes back for it (procksm.attach.leftovers.IN_USE_WAIT_S).
    if unmerge(pid).leftovers_in_use:
        time.sleep(1.0)  # a populate slower than that wait, on a loaded machine
        assert unmerge(pid).leftovers_in_use == 0
    assert "procksm" not in Path(f"/proc/{pid}/maps").read_text()
    time.sleep(0.05)
    assert_running_untraced(pid)
    assert_no_errors(target)
    assert target.command("poke") == "OK reads=1"


def test_a_fault_in_the_routine_gives_the_thread_back_its_own_state(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """A load from an unmapped address faults in the routine (SIGSEGV in the injecting
    thread: procksm's own error). The window ends at once with an error, the signal
    dropped: held and resumed it would fault again until the timeout, and once let go
    the target would die of it (a CI run of the kill-group test lost a target after
    `the calls ... did not complete within 2 s`). The calls before the fault were made,
    those after were not, and the target runs on untouched."""
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    with PtraceSession(pid) as session:
        started = time.monotonic()
        with pytest.raises(PtraceError, match="call routine faulted"), session.stopped() as st:
            st.hold_others()
            batch = CallBatch()
            me = batch.call(SYS_getpid)
            batch.entries.append(Entry(0, (8, 0), x86_64_batch.LOAD, 0))  # reads address 8
            batch.call(SYS_getpid)
            st.run_batch(batch)
        assert time.monotonic() - started < 1.0  # not the 2 s timeout
        assert me.index == 0
        with session.stopped():  # the next window is an ordinary one
            pass
    time.sleep(0.05)
    assert target.alive()
    assert_running_untraced(pid)
    assert_no_errors(target)
    assert target.command("poke") == "OK reads=1"
