"""``benchmarks._servers``' thread-by-thread CPU split, on a real process: a named thread
that spins and a main thread that sleeps."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks._servers import MAIN_THREAD, cpu_by_thread, thread_cpu

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
