"""The live view's input side without a terminal: key parsing, what each key does to the
view state and the actions (LiveView.on_key), the source failing, plain lines, and the
control-socket client against a stand-in server."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from procksm.errors import ProcksmError
from procksm.snapshot import Snapshot
from procksm.tui import live
from procksm.tui.keys import parse_keys
from procksm.tui.sample import demo_like_snapshot
from procksm.tui.source import SocketActions, request, socket_source


@pytest.mark.parametrize(
    ("data", "keys"),
    [
        ("q", ["q"]),
        ("\x1b", ["esc"]),
        ("\x1b[A\x1b[B", ["up", "down"]),
        ("\x1bOA\x1bOB", ["up", "down"]),  # application cursor mode
        ("\r \n", ["enter", "space", "enter"]),
        ("\x1b[5~\x1b[6~\x1b[H\x1b[F", ["pgup", "pgdn", "home", "end"]),
        ("\x1b[15~s", ["s"]),  # F5: unknown, dropped whole, never read as letters
        ("\x1b[1;5Cr", ["r"]),  # Ctrl-Right
        ("?u", ["?", "u"]),
    ],
)
def test_parse_keys(data: str, keys: list[str]) -> None:
    assert parse_keys(data) == keys


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail = False

    def pause(self) -> str:
        self.calls.append("pause")
        return "paused"

    def resume(self) -> str:
        self.calls.append("resume")
        return "resumed"

    def unmerge(self, pid: int) -> str:
        self.calls.append(f"unmerge {pid}")
        if self.fail:
            raise ProcksmError(f"pid {pid} is gone")
        return f"unmerged {pid}"


@pytest.fixture
def view() -> tuple[live.LiveView, Recorder]:
    rec = Recorder()
    snaps = iter(demo_like_snapshot(i) for i in range(1, 1000))
    v = live.LiveView(lambda: next(snaps), rec, interval=1.0)
    v.poll()
    return v, rec


def test_first_poll_selects_the_first_row(view: tuple[live.LiveView, Recorder]) -> None:
    v, _ = view
    assert v.state.selected == 4242


def test_quit_keys(view: tuple[live.LiveView, Recorder]) -> None:
    v, _ = view
    assert v.on_key("q") and v.on_key("Q") and v.on_key("esc")
    assert not v.on_key("?")
    assert v.state.help
    assert not v.on_key("esc")  # Esc closes the help first
    assert not v.state.help
    assert v.on_key("esc")


def test_sort_select_expand(view: tuple[live.LiveView, Recorder]) -> None:
    v, _ = view
    v.on_key("p")
    assert v.state.sort == "pid" and not v.state.reverse
    v.on_key("p")
    assert v.state.reverse
    assert v.state.selected == 4242  # the selection follows its pid (now the last row)
    v.on_key("down")
    assert v.state.selected == 4242  # clamped
    v.on_key("home")
    assert v.state.selected == 4251
    v.on_key("down")
    v.on_key("j")
    assert v.state.selected == 4245  # pid descending: 4251, 4248, 4245
    v.on_key("enter")
    assert v.state.expanded == {4245}
    v.on_key("k")
    assert v.state.selected == 4248
    v.on_key("end")
    assert v.state.selected == 4242


def test_space_pauses_when_running_and_resumes_when_stopped(
    view: tuple[live.LiveView, Recorder],
) -> None:
    v, rec = view
    v.on_key("space")
    assert rec.calls == ["pause"] and v.state.message == "paused" and v.poll_now
    v.snap = demo_like_snapshot(3, run=0)
    v.on_key("space")
    assert rec.calls == ["pause", "resume"]


def test_unmerge_asks_first(view: tuple[live.LiveView, Recorder]) -> None:
    v, rec = view
    v.on_key("down")
    v.on_key("u")
    assert v.state.confirm_unmerge == 4245 and rec.calls == []
    v.on_key("n")
    assert v.state.confirm_unmerge is None and "cancelled" in v.state.message
    v.on_key("u")
    assert not v.on_key("q")  # q answers the question (no), it does not quit
    assert rec.calls == []
    v.on_key("u")
    v.on_key("y")
    assert rec.calls == ["unmerge 4245"] and v.state.message == "unmerged 4245"
    rec.fail = True
    v.on_key("u")
    v.on_key("y")
    assert v.state.error and "gone" in v.state.message


def test_read_only_actions_say_so(view: tuple[live.LiveView, Recorder]) -> None:
    v, _ = view
    v.actions = live.ReadOnlyActions()
    v.on_key("space")
    assert v.state.error and "read-only" in v.state.message


def test_source_failure_keeps_the_last_snapshot() -> None:
    calls = iter([demo_like_snapshot(1), ProcksmError("daemon went away"), demo_like_snapshot(2)])

    def source() -> Snapshot:
        x = next(calls)
        if isinstance(x, Exception):
            raise x
        return x

    v = live.LiveView(source, live.ReadOnlyActions())
    v.poll()
    first = v.snap
    v.poll()
    assert v.snap is first and v.state.error and "daemon went away" in v.state.message
    v.poll()
    assert v.snap is not first and v.state.message == ""


def test_run_plain_lines_and_json_lines() -> None:
    snaps = iter(demo_like_snapshot(i) for i in range(1, 10))
    out = io.StringIO()
    assert live.run_plain(lambda: next(snaps), interval=0.0, count=3, out=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("TIME")
    out = io.StringIO()
    live.run_plain(lambda: next(snaps), interval=0.0, count=2, json_lines=True, out=out)
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["full_scans"] for d in docs] == [1, 1]  # steps 4 and 5
    assert Snapshot.from_json(docs[0]) == demo_like_snapshot(4)


# -- the control socket client -----------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, list[str], dict[str, bytes]]]:
    """A stand-in for the daemon: records request lines, answers from ``replies``."""
    path = str(tmp_path / "control.sock")
    seen: list[str] = []
    replies: dict[str, bytes] = {}
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    srv.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                line = conn.makefile("rb").readline().decode().strip()
                seen.append(line)
                conn.sendall(replies.get(line.split()[0], b"error: unknown command"))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, seen, replies
    stop.set()
    t.join(timeout=5)
    srv.close()


def test_socket_source_reads_a_snapshot(server: tuple[str, list[str], dict[str, bytes]]) -> None:
    path, seen, replies = server
    snap = demo_like_snapshot(20)
    replies["stats"] = json.dumps(snap.as_json()).encode()
    assert socket_source(path)() == snap
    assert seen == ["stats --json"]


def test_socket_actions(server: tuple[str, list[str], dict[str, bytes]]) -> None:
    path, seen, replies = server
    replies["pause"] = b"scanning paused\n"
    replies["unmerge"] = b"error: pid 7 is not a target\n"
    acts = SocketActions(path)
    assert acts.pause() == "scanning paused"
    with pytest.raises(ProcksmError, match="pid 7 is not a target"):
        acts.unmerge(7)
    assert seen == ["pause", "unmerge 7"]


def test_socket_source_garbage_reply(server: tuple[str, list[str], dict[str, bytes]]) -> None:
    path, _, replies = server
    replies["stats"] = b"usage: stats [--json]\n"
    with pytest.raises(ProcksmError, match=r"sent no snapshot.*usage: stats"):
        socket_source(path)()


def test_no_daemon_is_one_actionable_line(tmp_path: Path) -> None:
    with pytest.raises(ProcksmError, match=r"no procksm daemon listening on .*--control"):
        request(str(tmp_path / "nothing.sock"), "stats --json")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    with pytest.raises(ProcksmError, match="no procksm daemon"):
        request(str(stale), "stats --json")
    assert os.path.exists(stale)


# -- the view next to a daemon in one process ----------------------------------------------


class FakeDaemon:
    """run_forever/snapshot/handle/stopping/wake/log, like procksm.daemon.Daemon."""

    def __init__(self, stop_after: int | None = None, fail: bool = False) -> None:
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.logged: list[str] = []
        self.log = self.logged.append
        self.step = 0
        self.stop_after = stop_after
        self.fail = fail
        self.thread: threading.Thread | None = None
        self.handled: list[str] = []

    def run_forever(self) -> None:
        self.thread = threading.current_thread()
        while not self.stopping.is_set():
            self.step += 1
            self.log(f"batch {self.step}")
            if self.fail and self.step == 3:
                raise ProcksmError("scan loop broke")
            if self.stop_after is not None and self.step >= self.stop_after:
                self.stopping.set()
            self.wake.wait(0.02)

    def snapshot(self) -> Snapshot:
        return demo_like_snapshot(self.step)

    def handle(self, line: str) -> str:
        self.handled.append(line)
        return f"ok {line} done\n"


def test_run_with_daemon_plain_until_the_daemon_stops(capsys: pytest.CaptureFixture[str]) -> None:
    from procksm.tui.inprocess import run_with_daemon

    d = FakeDaemon(stop_after=20)
    assert run_with_daemon(d, interval=0.05) == 0
    assert d.thread is not None and not d.thread.is_alive()
    assert d.thread is not threading.main_thread()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TIME") and len(out) >= 2
    assert d.logged[:2] == ["batch 1", "batch 2"]  # not a terminal: the log is untouched


def test_run_with_daemon_reraises_the_loop_failure() -> None:
    from procksm.tui.inprocess import run_with_daemon

    d = FakeDaemon(fail=True)
    with pytest.raises(ProcksmError, match="scan loop broke"):
        run_with_daemon(d, interval=0.05)


def test_handler_actions_strip_ok() -> None:
    from procksm.tui.inprocess import HandlerActions

    d = FakeDaemon()
    acts = HandlerActions(d)
    assert acts.pause() == "pause done"
    assert acts.unmerge(12) == "unmerge 12 done"
    assert d.handled == ["pause", "unmerge 12"]


def test_notes_show_the_latest_log_line(view: tuple[live.LiveView, Recorder]) -> None:
    v, _ = view
    notes = [["attached to pid 1", "target 2 exited"], []]
    v.notes = lambda: notes.pop(0)
    v.poll()
    assert v.state.message == "target 2 exited" and not v.state.error
