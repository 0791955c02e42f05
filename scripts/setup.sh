#!/usr/bin/env bash
# One-time (idempotent) machine and project set-up for procksm, as root on Debian/Ubuntu.
#   - distro packages: bcc (python3-bpfcc; the PyPI "bcc" is an unrelated project),
#     kernel headers for bcc, gcc for the C test targets, tmux for TUI tests,
#     gdb (gcore) and redis for the fidelity tests, a JDK and node for the runtime tests
#   - /lib/modules/$(uname -r)/build -> distro headers when the running kernel's are not
#     packaged (docs/design.md §4: the 6.1 headers compile tracepoint programs for this kernel)
#   - tracefs mounted
#   - .venv from the distro python with --system-site-packages (so it sees bcc), project installed
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (installs distro packages, mounts tracefs); try: sudo make setup"
    exit 1
fi

PKGS="python3 python3-venv python3-bpfcc bpfcc-tools bpftool gcc make libc6-dev tmux gdb redis-server redis-tools"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# The runtimes of the real-program tests and benchmarks/runtimes.py: a JDK (the tests run
# `java Worker.java`, which needs the jdk.compiler module, not only a JRE) and node; each
# installed only when missing, so that a JDK or node installed otherwise is kept.
if ! java --list-modules 2>/dev/null | grep -q '^jdk.compiler@'; then
    if apt-cache policy openjdk-17-jdk-headless 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        missing="$missing openjdk-17-jdk-headless"
    else
        missing="$missing default-jdk-headless"
    fi
fi
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
KVER="$(uname -r)"
if [ ! -e "/lib/modules/$KVER/build" ]; then
    if apt-cache policy "linux-headers-$KVER" 2>/dev/null | grep -q Candidate: \
        && ! apt-cache policy "linux-headers-$KVER" | grep -q 'Candidate: (none)'; then
        missing="$missing linux-headers-$KVER"
    else
        dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing linux-headers-amd64"
    fi
fi
if [ -n "$missing" ]; then
    log "installing distro packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >/dev/null
fi

# Kernel headers for bcc: link the distro's headers when the running kernel has none.
if [ ! -e "/lib/modules/$KVER/build" ]; then
    hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
    if [ -n "$hdr" ]; then
        mkdir -p "/lib/modules/$KVER"
        ln -sfn "$hdr" "/lib/modules/$KVER/build"
        ln -sfn "$hdr" "/lib/modules/$KVER/source"
        log "linked kernel headers $hdr -> /lib/modules/$KVER/build (running kernel's are not packaged)"
    else
        log "warning: no kernel headers found; eBPF features will fall back to pagemap polling"
    fi
fi
# Debian splits headers into -amd64 (generated, config) and -common (include/linux/...):
# bcc needs `source` to be the -common half (as Debian's own /lib/modules/*/source is),
# else it fails with "'./include/linux/kconfig.h' file not found".
src="$(readlink -f "/lib/modules/$KVER/source" 2>/dev/null || true)"
if [ -n "$src" ] && [ ! -e "$src/include/linux/kconfig.h" ] && [ -d "${src%-amd64}-common" ]; then
    ln -sfn "${src%-amd64}-common" "/lib/modules/$KVER/source"
    log "linked kernel header sources ${src%-amd64}-common -> /lib/modules/$KVER/source"
fi

# tracefs for tracepoints.
if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "warning: could not mount tracefs"
fi

# The venv: distro python (bcc is built for it) + system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0)' 2>/dev/null; then
    log "creating .venv (distro python, --system-site-packages for bcc)"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.procksm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing procksm and test dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
# procksm's bytecode, as an installed package has it: an editable install leaves it to the
# first import, and with PYTHONDONTWRITEBYTECODE set (as on this project's VMs) every
# procksm process compiled its modules again at start: 60-80 ms of a ~0.25 s import
# (python -X importtime). compileall skips what is up to date, and ignores that variable.
.venv/bin/python -m compileall -q procksm
