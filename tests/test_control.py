"""The daemon's control socket and metrics: bad input gets one clear error line and the
daemon is unaffected; only root may control it; Prometheus /metrics and the textfile."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from procksm.control import MAX_LINE
from procksm.daemon import parse_settings
from procksm.errors import UsageError
from tests.conftest import ROOT, build_c_target, require_privileges
from tests.daemon_helpers import FAST, DaemonProc, wait_for

NOBODY = 65534


def raw(path: str, data: bytes) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out.decode()


@pytest.fixture
def daemon(tmp_path: Path, spawn: Any) -> Any:
    require_privileges()
    exe = build_c_target("lifecycle")
    a = spawn([exe, "--pages", 128, "--zero", 8, "--seed", 9])
    b = spawn([exe, "--pages", 128, "--zero", 8, "--seed", 9])
    d = DaemonProc(tmp_path / "ctl.sock", [a.pid, b.pid], *FAST)
    d.targets = (a, b)
    yield d
    d.stop()


def healthy(d: Any) -> None:
    """The daemon answers and keeps scanning after a bad request."""
    s0 = d.stats()["full_scans"]
    wait_for(lambda: d.stats()["full_scans"] > s0, 20, "the daemon scanning on")
    assert d.proc.poll() is None


BAD_REQUESTS = [
    (b"frobnicate\n", "unknown command 'frobnicate'"),
    (b"set pages_to_scan=0\n", "outside"),
    (b"set run=3\n", "outside"),
    (b"set sleep_ms=abc\n", "not a number"),
    (b"set cpu_limit=nan\n", "outside"),
    (b"set bogus=1\n", "unknown setting 'bogus'"),
    (b"set pages_to_scan\n", "not NAME=VALUE"),
    (b"set\n", "nothing to set"),
    (b"register 1\n", "use 'register PID"),
    (b"register abc 0x1000-0x2000\n", "use 'register PID"),
    (b"register 999999999 all\n", "999999999"),
    (b"unregister 424242 all\n", "not a target"),
    (b"stats --yaml\n", "only option is --json"),
    (b"\n", "empty request"),
    (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    (b"set run=1\x07\n", "control characters"),
    (b"x" * (MAX_LINE + 10) + b"\n", f"longer than {MAX_LINE}"),
]


def test_bad_requests_get_one_error_line(daemon: Any) -> None:
    for data, want in BAD_REQUESTS:
        answer = raw(daemon.sock, data)
        assert answer.startswith("error: "), (data[:40], answer)
        assert answer.count("\n") == 1, answer
        assert want in answer, (data[:40], answer)
    # a register of a range that is not a range or name
    assert raw(daemon.sock, b"register 1 0x2000-0x1000\n").startswith("error: bad address range")
    # nothing was applied by the failed sets
    s = daemon.stats()
    assert s["run"] == 1 and s["sleep_ms"] == 5
    healthy(daemon)


def test_a_silent_client_is_cut_and_the_daemon_goes_on(daemon: Any) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(daemon.sock)
    s.sendall(b"set run=")  # no newline, then silence: the server gives up after 5 s
    assert s.recv(4096).decode().startswith("error: no complete request line")
    s.close()
    healthy(daemon)


def test_ctl_command_and_errors(daemon: Any) -> None:
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "procksm", "ctl", *args, "--control",
                               daemon.sock], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    ok = ctl("set", "pages_to_scan=77", "sleep_ms=6")
    assert ok.returncode == 0 and "pages_to_scan=77" in ok.stdout
    bad = ctl("set", "run=9")
    assert bad.returncode == 1 and "procksm: error: set: run=9 is outside 0..2" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "procksm", "stats", "--control",
                              "/nonexistent/x.sock"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 1 and "no procksm daemon at /nonexistent/x.sock" in missing.stderr
    assert daemon.fresh_stats()["pages_to_scan"] == 77


def test_socket_is_root_only(daemon: Any, tmp_path: Path) -> None:
    st = os.stat(daemon.sock)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    # a non-root client cannot even connect (0600): a clear error, no traceback
    as_nobody = subprocess.run(
        [sys.executable, "-m", "procksm", "ctl", "set", "run=0", "--control", daemon.sock],
        cwd="/", capture_output=True, text=True, timeout=60,
        user=NOBODY, group=NOBODY, extra_groups=[], env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert as_nobody.returncode == 1, as_nobody.stderr
    assert "root-only" in as_nobody.stderr or "permission denied" in as_nobody.stderr
    assert "Traceback" not in as_nobody.stderr
    # even when the socket's mode is opened up by mistake, SO_PEERCRED refuses the uid
    os.chmod(daemon.sock, 0o666)
    for p in Path(daemon.sock).parents:
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)
    probe = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "print(s.recv(4096).decode(), end='')"
    )
    peer = subprocess.run([sys.executable, "-c", probe, daemon.sock], capture_output=True,
                          text=True, timeout=60, user=NOBODY, group=NOBODY,
                          extra_groups=[])  # fmt: skip
    assert peer.stdout.startswith("error: permission denied: uid 65534"), peer
    assert daemon.stats()["run"] == 1  # not applied
    healthy(daemon)


def test_settings_parser() -> None:
    assert parse_settings(["pages_to_scan=10", "cpu_limit=2.5", "run=2"]) == {
        "pages_to_scan": 10,
        "cpu_limit": 2.5,
        "run": 2,
    }
    for bad in (["run=-1"], ["sleep_ms=1e3"], ["pages_to_scan=1=2"], ["x"], []):
        with pytest.raises(UsageError):
            parse_settings(bad)


def test_metrics_endpoint_and_textfile(tmp_path: Path, spawn: Any) -> None:
    require_privileges()
    from prometheus_client.parser import text_string_to_metric_families

    exe = build_c_target("lifecycle")
    a = spawn([exe, "--pages", 128, "--seed", 4])
    b = spawn([exe, "--pages", 128, "--seed", 4])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    textfile = tmp_path / "procksm.prom"
    d = DaemonProc(tmp_path / "m.sock", [a.pid, b.pid], *FAST, "--metrics-port", port,
                   "--metrics-addr", "127.0.0.1", "--metrics-textfile", textfile)  # fmt: skip
    try:
        wait_for(lambda: d.stats()["pages_sharing"] >= 128, 30, "merge")
        d.fresh_stats()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert fams["procksm_full_scans"].type == "counter"
        assert fams["procksm_full_scans"].samples[0].name == "procksm_full_scans_total"
        assert fams["procksm_pages_sharing"].samples[0].value >= 128
        assert fams["procksm_saved_bytes"].samples[0].value >= 128 * 4096
        assert "procksm_cow_breaks" in fams and "procksm_general_profit_bytes" in fams
        for f in fams.values():
            for sample in f.samples:
                assert "pid" not in sample.labels  # no high-cardinality labels by default
    finally:
        assert d.stop() == 0
    text = textfile.read_text()  # written at exit for node_exporter
    assert "procksm_pages_shared " in text and "procksm_full_scans_total " in text


def test_live_view_commands(daemon: Any) -> None:
    """pause, resume and unmerge PID: what procksm top sends (procksm.tui.source)."""
    from tests.daemon_helpers import merged_vmas

    a, b = daemon.targets
    wait_for(lambda: merged_vmas(a.pid) and merged_vmas(b.pid), 30, "merge")
    assert daemon.request("pause").startswith("ok run=0")
    assert daemon.fresh_stats()["run"] == 0
    assert daemon.request("resume").startswith("ok run=1")
    answer = daemon.request(f"unmerge {a.pid}")
    assert answer.startswith(f"ok pid {a.pid}: unmerged"), answer
    assert not merged_vmas(a.pid)
    assert a.command("check") == "OK pages=128"
    assert daemon.request("unmerge 1").startswith("error: pid 1 is not a target")
    assert daemon.request("pause now").startswith("error: unknown command")
    healthy(daemon)
