"""``benchmarks._servers``' thread-by-thread CPU split, on a real process: a named thread
that spins and a main thread that sleeps; and pinning a front process's threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks._servers import (
    MAIN_THREAD,
    REPO_ROOT,
    cpu_by_thread,
    pin_threads,
    split_cpus,
    thread_cpu,
)

_CHILD = """
import ctypes, sys, threading, time

def spin():
    ctypes.CDLL(None).prctl(15, b"spinner", 0, 0, 0)  # PR_SET_NAME: the thread's comm
    ready.set()
    while True:
        pass

ready = threading.Event()
threading.Thread(target=spin, daemon=True).start()
ready.wait()
print("ready", flush=True)
time.sleep(60)
"""


def test_cpu_by_thread_puts_the_cpu_on_the_thread_that_used_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        before = thread_cpu(child.pid)
        assert {name for name, _, _ in before.values()} >= {"spinner"}
        time.sleep(1.0)
        split = cpu_by_thread(child.pid, before, thread_cpu(child.pid), 1.0)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert next(iter(split)) == "spinner", split  # the busiest first
    assert split["spinner"]["threads"] == 1
    # On a shared 2-core machine the spinner gets most of a core; the sleeper nearly none.
    assert split["spinner"]["cpu_ms_per_s"] > 200, split
    assert split[MAIN_THREAD]["threads"] == 1
    assert split[MAIN_THREAD]["cpu_ms_per_s"] < 50, split
    assert split[MAIN_THREAD]["scheduled_per_s"] < 20, split


def _allowed(pid: int) -> set[str]:
    """Each thread's allowed CPUs, as the kernel lists them."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split(":", 1)[1].strip())
    return lists


def test_pin_threads_moves_every_thread_of_a_process() -> None:
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert len(list(Path(f"/proc/{child.pid}/task").iterdir())) >= 2
        pin_threads(child.pid, {cpu})
        assert _allowed(child.pid) == {str(cpu)}
    finally:
        child.kill()
        child.wait(timeout=10)


_SPLIT = """
import os, sys, threading
from benchmarks._servers import split_cpus
threading.Thread(target=lambda: None).start()  # a second thread existed before the split
rest = split_cpus(int(sys.argv[1]))
child = os.fork()
if child == 0:  # a server started after the split
    print(sorted(os.sched_getaffinity(0)), flush=True)
    os._exit(0)
os.waitpid(child, 0)
print(sorted(rest), sorted(os.sched_getaffinity(0)), flush=True)
"""


def test_split_cpus_leaves_the_front_cpu_to_the_front_process() -> None:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        with pytest.raises(ValueError, match="needs another CPU"):
            split_cpus(usable[0])
        return
    front, rest = usable[0], usable[1:]
    out = subprocess.run(
        [sys.executable, "-c", _SPLIT, str(front)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out == [str(rest), f"{rest} {rest}"]


def test_split_cpus_refuses_a_cpu_this_process_may_not_use() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="needs another CPU"):
        split_cpus(max(before) + 1000)
    assert os.sched_getaffinity(0) == before  # nothing moved
