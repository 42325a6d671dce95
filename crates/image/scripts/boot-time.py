#!/usr/bin/env python3
"""Boot-to-agent-ready of a guest image under TCG: launch QEMU the way the
daemon does (q35, virtio-serial agent port, a virtio-net NIC), poll the serial
log for `forkvm-agent: ready`, kill QEMU; repeat and print the samples.

Host wall clock is noisy on a shared machine, so the guest's own figures are
printed too, from the agent's log: kernel uptime when the agent started and
when it served, and the time it spent loading modules.

usage: boot-time.py VMLINUX INITRD [RUNS]
"""
import os
import re
import subprocess
import sys
import tempfile
import time


def boot_once(vmlinux, initrd, tmp):
    console = os.path.join(tmp, "console.log")
    sock = os.path.join(tmp, "agent.sock")
    for p in (console, sock):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg,thread=multi",
        "-cpu", "max", "-m", "256", "-smp", "1", "-nodefaults",
        "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", vmlinux, "-initrd", initrd,
        "-append", "console=ttyS0 loglevel=4 panic=-1",
        "-serial", "file:" + console,
        "-device", "virtio-serial-pci",
        "-chardev", "socket,id=agent,path=%s,server=on,wait=off" % sock,
        "-device", "virtserialport,chardev=agent,name=forkvm.agent",
        # A NIC with no peer: the guest loads virtio_net and probes it.
        "-netdev", "dgram,id=n0,remote.type=inet,remote.host=127.0.0.1,"
        "remote.port=9,local.type=inet,local.host=127.0.0.1,local.port=0",
        "-device", "virtio-net-pci,netdev=n0",
    ]
    t0 = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        while time.monotonic() - t0 < 60:
            try:
                with open(console, "rb") as f:
                    log = f.read()
                if b"forkvm-agent: ready" in log:
                    wall = time.monotonic() - t0
                    # The "serving" line follows "ready" at once.
                    while b"serving" not in log and time.monotonic() - t0 < 60:
                        time.sleep(0.002)
                        with open(console, "rb") as f:
                            log = f.read()
                    return wall, guest_figures(log.decode(errors="replace"))
            except FileNotFoundError:
                pass
            if qemu.poll() is not None:
                raise SystemExit("qemu exited")
            time.sleep(0.002)
        raise SystemExit("no `forkvm-agent: ready` within 60 s")
    finally:
        qemu.kill()
        qemu.wait()


def guest_figures(log):
    """(uptime at agent start, module load time, uptime at serving), ms."""
    def field(line_re, name):
        for line in log.splitlines():
            if re.search(line_re, line):
                m = re.search(name + r"=([0-9.]+)", line)
                if m:
                    return float(m.group(1))
        return float("nan")
    return (field(r"starting", "kernel_uptime_ms"),
            field(r"modules loaded", "elapsed_ms"),
            field(r"serving", "kernel_uptime_ms"))


def summary(name, xs):
    xs = sorted(xs)
    return "%s median %.0f, min %.0f, max %.0f" % (name, xs[len(xs) // 2], xs[0], xs[-1])


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    vmlinux, initrd = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    with tempfile.TemporaryDirectory(prefix="fvt-boot-") as tmp:
        samples = [boot_once(vmlinux, initrd, tmp) for _ in range(runs)]
    print("n=%d, ms: %s; guest: %s; %s; %s" % (
        runs,
        summary("host launch->ready", [w * 1e3 for w, _ in samples]),
        summary("uptime at agent start", [g[0] for _, g in samples]),
        summary("module loading", [g[1] for _, g in samples]),
        summary("uptime at serving", [g[2] for _, g in samples])))


if __name__ == "__main__":
    main()
