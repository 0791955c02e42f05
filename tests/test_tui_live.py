"""The live view as a person meets it: the real program in a real terminal (a tmux pane).

Each test starts a private tmux server (``tmux -L``) running an interactive bash, types a
command line that runs the live loop on a scripted source (tests/tui_scripted.py: savings
grow each interval; its actions record what they are asked) followed by
``echo rc=$?; stty -a > FILE``, drives it with send-keys and reads the screen with
capture-pane. After every exit path it checks that the terminal is restored: the
alternate screen is left and the cursor shown (tmux's ``alternate_on``/``cursor_flag``),
and ``stty -a`` in the pane shows ``icanon`` and ``echo`` (bash adopts the modes a
normally exiting job leaves, so a broken restore would show ``-icanon -echo`` here).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Target, build_c_target, require_privileges, skip_or_fail

SCRIPT = ROOT / "tests" / "tui_scripted.py"


class Tmux:
    """One private tmux server with one pane running ``bash --norc -i``."""

    def __init__(self, tmp: Path, width: int = 120, height: int = 40) -> None:
        if shutil.which("tmux") is None:
            skip_or_fail("tmux is not installed (scripts/setup.sh installs it)")
        self.tmp = tmp
        self.sock = f"procksm-test-{os.getpid()}-{id(self):x}"
        self._tmux(
            "new-session", "-d", "-x", str(width), "-y", str(height), "-s", "t",
            "env PS1='$ ' PROMPT_COMMAND= bash --norc --noprofile -i",
        )  # fmt: skip
        self._tmux("set-option", "-g", "status", "off")
        self.wait_for(lambda s: "$" in s, what="the shell prompt")

    def _tmux(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-L", self.sock, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {r.stderr.strip()}")
        return r.stdout

    def keys(self, *keys: str) -> None:
        """tmux key names: "q", "Up", "Enter", "C-c", "C-z", "Space", "Escape"."""
        self._tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)
        self.keys("Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def fmt(self, f: str) -> str:
        return self._tmux("display-message", "-p", "-t", "t", f).strip()

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))

    def wait_for(self, pred: Callable[[str], bool], *, what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{s}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.close()


class Run:
    """The scripted live view started in the pane; files for its log and stty."""

    def __init__(self, tm: Tmux, *args: str) -> None:
        self.tm = tm
        self.log = tm.tmp / "actions.log"
        self.stty = tm.tmp / "stty.txt"
        for f in (self.log, self.stty):
            f.unlink(missing_ok=True)
        tm.type(
            f"{sys.executable} {SCRIPT} {self.log} {' '.join(args)}; "
            f'echo "rc=$?"; stty -a > {self.stty}'
        )
        self.tm.wait_for(lambda s: "saved" in s and "pid" in s, what="the live view")

    def actions(self) -> list[str]:
        return self.log.read_text().splitlines()[1:] if self.log.exists() else []

    @property
    def pid(self) -> int:
        return int(self.log.read_text().splitlines()[0].split()[1])

    def wait_action(self, line: str) -> None:
        deadline = time.monotonic() + 10
        while line not in self.actions():
            if time.monotonic() > deadline:
                raise AssertionError(f"action {line!r} not recorded: {self.actions()}")
            time.sleep(0.05)

    def exit_code(self) -> int:
        s = self.tm.wait_for(lambda s: bool(re.search(r"rc=\d", s)), what="the program to exit")
        return int(re.findall(r"rc=(\d+)", s)[-1])

    def assert_terminal_restored(self) -> None:
        assert self.tm.fmt("#{alternate_on}") == "0", "still in the alternate screen"
        assert self.tm.fmt("#{cursor_flag}") == "1", "cursor left hidden"
        deadline = time.monotonic() + 10
        while not (self.stty.exists() and self.stty.read_text().strip()):
            assert time.monotonic() < deadline, "stty -a did not run"
            time.sleep(0.05)
        modes = set(self.stty.read_text().split())
        assert "icanon" in modes and "-icanon" not in modes, self.stty.read_text()
        assert "echo" in modes and "-echo" not in modes, self.stty.read_text()


def saved_mib(screen: str) -> float:
    m = re.search(r"saved ([\d.]+) (B|KiB|MiB|GiB)", screen)
    assert m, screen
    return float(m.group(1)) * {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[m.group(2)]


def test_starts_shows_savings_growing_and_quits_on_q(tmux: Tmux) -> None:
    run = Run(tmux)
    assert tmux.fmt("#{alternate_on}") == "1"
    assert tmux.fmt("#{cursor_flag}") == "0"
    first = saved_mib(tmux.screen())
    tmux.wait_for(lambda s: saved_mib(s) > first, what="savings to grow")
    s = tmux.screen()
    for text in ("pages_sharing", "running", "BPF", "merged", "COW/s", "4242", "q quit"):
        assert text in s, text
    tmux.keys("q")
    assert run.exit_code() == 0
    run.assert_terminal_restored()


def test_keys_sort_help_expand_pause_unmerge(tmux: Tmux) -> None:
    run = Run(tmux)

    def rows(s: str) -> list[int]:
        return [int(m) for m in re.findall(r"^\s*(\d{4})\s+[▸▾]", s, re.M)]

    tmux.keys("p")
    s = tmux.wait_for(lambda s: "pid▲" in s, what="sort by pid")
    assert rows(s) == [4242, 4245, 4248, 4251]
    tmux.keys("p")  # again: reversed
    s = tmux.wait_for(lambda s: "pid▼" in s, what="reverse sort by pid")
    assert rows(s) == [4251, 4248, 4245, 4242]
    tmux.keys("r")
    tmux.wait_for(lambda s: "RSS▼" in s, what="sort by RSS")

    tmux.keys("?")
    tmux.wait_for(lambda s: "procksm top — keys" in s, what="the help panel")
    tmux.keys("Escape")  # closes the help, does not quit
    tmux.wait_for(lambda s: "keys" not in s and "RSS▼" in s, what="help closed")

    tmux.keys("p", "Down", "Enter")  # select the second pid and expand it
    s = tmux.wait_for(lambda s: "[anon] model" in s, what="the mappings of 4245")
    assert "▾" in s and s.index("4245") < s.index("[anon] model") < s.index("4248")

    tmux.keys("Space")
    run.wait_action("pause")
    tmux.wait_for(lambda s: "stopped" in s, what="the run state to show stopped")
    tmux.keys("Space")
    run.wait_action("resume")
    tmux.wait_for(lambda s: "running" in s, what="running again")

    tmux.keys("u")
    tmux.wait_for(lambda s: "Unmerge pid 4245" in s and "y/n" in s, what="the confirmation")
    tmux.keys("n")
    tmux.wait_for(lambda s: "cancelled" in s, what="cancelled")
    assert "unmerge 4245" not in run.actions()
    tmux.keys("u")
    tmux.wait_for(lambda s: "y/n" in s, what="the confirmation")
    tmux.keys("y")
    run.wait_action("unmerge 4245")
    tmux.wait_for(lambda s: "unmerged pid 4245" in s, what="the action's message")

    tmux.keys("q")
    assert run.exit_code() == 0
    run.assert_terminal_restored()
    assert run.actions() == ["pause", "resume", "unmerge 4245"]


def test_ctrl_c_restores_terminal(tmux: Tmux) -> None:
    run = Run(tmux)
    tmux.keys("C-c")
    assert run.exit_code() == 130
    run.assert_terminal_restored()
    assert "Traceback" not in tmux.screen()


def test_sigterm_restores_terminal(tmux: Tmux) -> None:
    run = Run(tmux)
    os.kill(run.pid, signal.SIGTERM)
    assert run.exit_code() == 143
    run.assert_terminal_restored()


def test_exception_restores_terminal_and_shows_traceback(tmux: Tmux) -> None:
    run = Run(tmux, "--raise-after", "4")
    assert run.exit_code() == 1
    run.assert_terminal_restored()
    assert "RuntimeError: scripted source failure" in tmux.screen()


def test_ctrl_z_then_fg_restores_then_redraws(tmux: Tmux) -> None:
    run = Run(tmux)
    tmux.keys("C-z")
    # stopped (by the SIGSTOP the view sends itself once the terminal is restored): the
    # shell has the terminal back as it was
    assert run.exit_code() == 128 + signal.SIGSTOP
    tmux.wait_for(lambda s: "Stopped" in s, what="the job to stop")
    run.assert_terminal_restored()

    run.stty.unlink()
    tmux.type(f'fg; echo "rc=fg$?"; stty -a > {run.stty}')
    tmux.wait_for(lambda s: "saved" in s and "q quit" in s, what="the view to be redrawn")
    assert tmux.fmt("#{alternate_on}") == "1"
    first = saved_mib(tmux.screen())
    tmux.wait_for(lambda s: saved_mib(s) > first, what="updates after fg")
    tmux.keys("?")  # keys still read in cbreak mode
    tmux.wait_for(lambda s: "procksm top — keys" in s, what="the help panel after fg")
    tmux.keys("q")
    tmux.wait_for(lambda s: "rc=fg0" in s, what="exit after fg")
    run.assert_terminal_restored()


def test_sigwinch_redraws_at_the_new_size(tmux: Tmux) -> None:
    run = Run(tmux)
    tmux.wait_for(lambda s: "PSS" in s and "memory" in s, what="the wide table")
    tmux.resize(60, 30)
    s = tmux.wait_for(lambda s: "PSS" not in s and "merged" in s, what="the narrow table")
    assert max(len(line.rstrip()) for line in s.splitlines()) <= 60
    tmux.keys("q")
    assert run.exit_code() == 0
    run.assert_terminal_restored()


def test_not_a_terminal_prints_one_line_per_interval(tmp_path: Path) -> None:
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path / "log"), "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout is not None
    lines = [p.stdout.readline() for _ in range(4)]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 143, err
    assert lines[0].split()[:3] == ["TIME", "SAVED", "%RSS"]
    saved = [saved_mib("saved " + line.split()[1].replace("MiB", " MiB")) for line in lines[1:]]
    assert saved == sorted(saved) and saved[-1] > saved[0], lines
    assert "\x1b" not in "".join(lines) + out  # no escape codes in a pipe


# -- procksm top against a real daemon with real targets ---------------------------------


@pytest.fixture
def planted(spawn: Callable[..., Target]) -> list[Target]:
    """Three planted targets with 16 MiB of identical pages and 4 MiB of zeros each."""
    require_privileges()
    exe = build_c_target("planted")
    return [
        spawn([exe, "--identical", "4096", "--zero", "1024", "--unique", "256", "--seed", "9"])
        for _ in range(3)
    ]


@pytest.fixture
def daemon(tmp_path: Path, planted: list[Target]) -> Iterator[tuple[str, list[Target]]]:
    """The planted targets kept merged by a real ``procksm attach`` (slow enough that the
    savings grow over several refreshes)."""
    targets = planted
    sock = str(tmp_path / "control.sock")
    log = open(tmp_path / "attach.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "procksm", "attach", "--control", sock, "--no-bpf",
         "--pages-to-scan", "512", "--sleep-ms", "100", *(str(t.pid) for t in targets)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, (tmp_path / "attach.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not create its socket"
            time.sleep(0.1)
        yield sock, targets
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for t in targets:
            assert t.command("check").startswith("OK"), t.pid


def test_top_against_a_real_daemon(tmux: Tmux, daemon: tuple[str, list[Target]]) -> None:
    sock, targets = daemon
    stty = tmux.tmp / "stty.txt"
    tmux.type(
        f"{sys.executable} -m procksm top --control {sock} --interval 0.5; "
        f'echo "rc=$?"; stty -a > {stty}'
    )
    tmux.wait_for(lambda s: "procksm" in s and "pid" in s, what="procksm top")
    for t in targets:
        tmux.wait_for(lambda s, t=t: str(t.pid) in s, what=f"target {t.pid}")
    # savings grow: some first, then more (the daemon merges batch by batch)
    first = tmux.wait_for(lambda s: saved_mib(s) > 0, what="first savings", timeout=60)
    if saved_mib(first) < 32:  # the daemon may have converged before the first frame
        tmux.wait_for(lambda s: saved_mib(s) > saved_mib(first), what="savings to grow", timeout=60)
    tmux.wait_for(lambda s: saved_mib(s) >= 32, what="most pages merged", timeout=90)

    tmux.keys("Space")  # pause: the daemon's run state goes to 0
    tmux.wait_for(lambda s: "stopped" in s, what="the daemon paused")
    tmux.keys("Space")
    tmux.wait_for(lambda s: "running" in s, what="the daemon running again")

    tmux.keys("p", "Home", "u")  # unmerge the lowest pid
    victim = min(t.pid for t in targets)
    tmux.wait_for(lambda s: f"Unmerge pid {victim}" in s, what="the confirmation")
    tmux.keys("y")

    def victim_merged(s: str) -> str:
        row = next(line for line in s.splitlines() if line.lstrip().startswith(str(victim)))
        # sizes in order: RSS, PSS, merged, zero
        return re.findall(r"[\d.]+ (?:B|KiB|MiB|GiB)", row)[2]

    tmux.wait_for(lambda s: f"pid {victim}: unmerged" in s, what="the daemon's answer")
    tmux.wait_for(lambda s: victim_merged(s) == "0 B", what="the victim's merged pages gone")
    assert targets[0].command("check").startswith("OK")
    tmux.keys("q")
    s = tmux.wait_for(lambda s: bool(re.search(r"rc=\d", s)), what="top to exit")
    assert re.findall(r"rc=(\d+)", s)[-1] == "0"
    assert tmux.fmt("#{alternate_on}") == "0" and tmux.fmt("#{cursor_flag}") == "1"
    deadline = time.monotonic() + 10
    while not (stty.exists() and stty.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    modes = set(stty.read_text().split())
    assert {"icanon", "echo"} <= modes


def test_attach_live_shows_the_view_and_detaches_on_q(tmux: Tmux, planted: list[Target]) -> None:
    stty = tmux.tmp / "stty.txt"
    sock = tmux.tmp / "control.sock"
    pids = " ".join(str(t.pid) for t in planted)
    tmux.type(
        f"{sys.executable} -m procksm attach --live --no-bpf --control {sock} "
        f'--pages-to-scan 512 --sleep-ms 100 {pids}; echo "rc=$?"; stty -a > {stty}'
    )
    first = tmux.wait_for(lambda s: "procksm" in s and "q quit" in s, what="the live view")
    assert all(str(t.pid) in first for t in planted)
    tmux.wait_for(lambda s: saved_mib(s) > 0, what="first savings", timeout=60)
    s = tmux.wait_for(lambda s: saved_mib(s) >= 32, what="most pages merged", timeout=90)
    # the control socket serves procksm top meanwhile: the same daemon
    r = subprocess.run(
        [sys.executable, "-m", "procksm", "top", "--control", str(sock), "--count", "1"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "running" in r.stdout
    tmux.keys("q")
    s = tmux.wait_for(lambda s: bool(re.search(r"rc=\d", s)), what="attach to exit", timeout=60)
    assert re.findall(r"rc=(\d+)", s)[-1] == "0"
    assert "detached:" in s  # the daemon's log, printed once the view is gone
    assert tmux.fmt("#{alternate_on}") == "0" and tmux.fmt("#{cursor_flag}") == "1"
    deadline = time.monotonic() + 10
    while not (stty.exists() and stty.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {"icanon", "echo"} <= set(stty.read_text().split())
    for t in planted:
        assert t.command("check").startswith("OK")


def test_demo_ends_in_the_live_view_on_a_terminal(tmux: Tmux) -> None:
    require_privileges()
    stty = tmux.tmp / "stty.txt"
    tmux.type(
        f"{sys.executable} -m procksm demo --workers 2 --shared-mib 16 --zero-mib 4 "
        f'--unique-mib 4 --volatile-mib 1; echo "rc=$?"; stty -a > {stty}'
    )
    s = tmux.wait_for(
        lambda s: tmux.fmt("#{alternate_on}") == "1" and "q quit" in s and "saved" in s,
        what="the demo's live view",
        timeout=120,
    )
    assert saved_mib(s) > 0
    tmux.keys("q")
    s = tmux.wait_for(lambda s: bool(re.search(r"rc=\d", s)), what="the demo to end", timeout=60)
    assert re.findall(r"rc=(\d+)", s)[-1] == "0"
    assert "self-checks: OK, OK" in s
    assert tmux.fmt("#{alternate_on}") == "0" and tmux.fmt("#{cursor_flag}") == "1"
    deadline = time.monotonic() + 10
    while not (stty.exists() and stty.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {"icanon", "echo"} <= set(stty.read_text().split())
