"""A throwaway "machine" for deployment tests: a process tree in its own PID, mount and
network namespaces (``unshare``), as root.

Its own PID namespace keeps ``ray stop`` (which kills Ray processes by name) from seeing any
other Ray cluster on this machine; its own network namespace gives Ray and the router their
default ports; ``/root`` and ``/tmp/ray`` are bind-mounted from the test's folder, so
``~/.profile``, ``~/.ray`` and Ray's session files are its own. The test reaches it with
``nsenter --net`` (SSH's proxy command, or a client run inside).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.serving.conftest import cmdline, is_alive, wait_gone

TOOLS = ("unshare", "nsenter", "ip")


def missing_tools(*extra: str) -> list[str]:
    """The tools (of ``TOOLS`` and ``extra``) not installed; root is needed as well."""
    path = os.defpath + ":/usr/sbin:" + os.environ.get("PATH", "")
    missing = [t for t in (*TOOLS, *extra) if shutil.which(t, path=path) is None]
    return missing if os.geteuid() == 0 else ["root", *missing]


def namespace_pids(init_pid: int) -> set[int]:
    """Host PIDs of every live process in the PID namespace whose init is ``init_pid``."""
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return set()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == target and is_alive(int(entry)):
                    found.add(int(entry))
    return found


@dataclass
class Namespace:
    """``unshare`` (a host process) and its child, the namespace's init (PID 1 inside)."""

    unshare: subprocess.Popen
    init_pid: int
    root: Path

    @property
    def enter_net(self) -> list[str]:
        """Prefix for a command that runs in the namespace's network."""
        return ["nsenter", f"--net=/proc/{self.unshare.pid}/ns/net"]

    def processes(self) -> dict[int, str]:
        return {pid: cmdline(pid) for pid in namespace_pids(self.init_pid)}

    def log(self) -> str:
        return (self.root / "namespace.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL everything inside (it dies with its init) and wait until it is gone."""
        pids = namespace_pids(self.init_pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.unshare.pid, signal.SIGKILL)
        self.unshare.wait(timeout=10)
        wait_gone(pids, 10, "the namespace's processes")


def start(root: Path, command: str, env: dict[str, str] | None = None) -> Namespace:
    """Run ``command`` (bash) as the init of a new namespace; ``root``/home becomes /root."""
    home, raytmp = root / "home", root / "ray"
    home.mkdir(mode=0o700, exist_ok=True)
    raytmp.mkdir(exist_ok=True)
    # This Python may live under /root (pyenv): keep it visible in the new home.
    python_home = Path(sys.base_prefix).resolve()
    keep = ""
    if python_home.is_relative_to("/root"):
        inside = home / python_home.relative_to("/root")
        inside.mkdir(parents=True, exist_ok=True)
        keep = f"mount --bind {python_home} {inside}; "
    script = (
        f"set -e; ip link set lo up; {keep}mount --rbind {home} /root; "
        f"mkdir -p /tmp/ray; mount --bind {raytmp} /tmp/ray; set +e; exec {command}"
    )
    with open(root / "namespace.log", "wb") as log:
        unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--net", "bash", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError):
            children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text()
            return Namespace(unshare, int(children.split()[0]), root)
        if unshare.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(unshare.pid, signal.SIGKILL)
            unshare.wait(timeout=10)
            raise AssertionError(
                f"the namespace did not start:\n{(root / 'namespace.log').read_text()}"
            )
        time.sleep(0.05)
