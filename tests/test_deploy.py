"""deploy/: the systemd unit and the Kubernetes DaemonSet parse, run `procksm attach`, and
ask for no more privilege than the daemon needs, each capability justified."""

from __future__ import annotations

import configparser
import re
import shlex

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
NEEDED = {"SYS_PTRACE", "SYS_ADMIN", "DAC_READ_SEARCH", "DAC_OVERRIDE", "SYS_NICE",
          "SYS_RESOURCE", "KILL", "BPF", "PERFMON", "SYS_CHROOT"}  # fmt: skip


def test_systemd_unit_parses() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "procksm.service").read_text())
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/procksm") and argv[1] == "attach"
    assert "--metrics-port" in argv
    assert svc["KillSignal"] == "SIGTERM"
    caps = {c.removeprefix("CAP_") for c in svc["CapabilityBoundingSet"].split()}
    assert caps == NEEDED
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_daemonset_parses_and_drops_all_capabilities() -> None:
    text = (DEPLOY / "daemonset.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["kind"] == "DaemonSet" and doc["apiVersion"] == "apps/v1"
    pod = doc["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (c,) = pod["containers"]
    assert c["command"][:2] == ["procksm", "attach"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == NEEDED
    # every added capability has a comment right above it (or above its group)
    lines = text.splitlines()
    for cap in NEEDED:
        i = next(n for n, line in enumerate(lines) if re.fullmatch(rf"\s*- {cap}", line))
        j = i - 1
        while re.fullmatch(r"\s*- [A-Z_]+", lines[j]):
            j -= 1
        assert lines[j].strip().startswith("#"), cap
    ann = doc["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9477"
