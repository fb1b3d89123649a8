"""``engine.malloc``: glibc honours the tunables (a step's large buffers stop faulting in
again), and an operator's own ``GLIBC_TUNABLES`` wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from engine.malloc import GLIBC_TUNABLES, worker_env_vars

# A step's pattern, in a thread as a worker's engine runs: buffers of 5-30 MB, two alive at
# a time, touched, freed, 20 times over. Prints the minor page faults it took.
STEPS = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
def steps():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        live = []
        for size in (5 << 20, 12 << 20, 24 << 20, 16 << 20, 30 << 20, 8 << 20):
            buffer = libc.malloc(size)
            libc.memset(buffer, 1, size)
            live.append(buffer)
            if len(live) > 2:
                libc.free(live.pop(0))
        for buffer in live:
            libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(faults[0])
"""


def _faults(tunables: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    result = subprocess.run(
        [sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tunables are glibc's")
def test_glibc_keeps_the_memory_a_step_frees_for_the_next():
    default, tuned = _faults(None), _faults(GLIBC_TUNABLES)
    one_pass = (5 + 12 + 24 + 16 + 30 + 8) * 256  # pages first touched in one pass
    assert default > 5 * one_pass  # glibc's defaults return memory and fault it in again
    assert tuned < 2 * one_pass, (default, tuned)


def test_an_operators_own_tunables_win(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert worker_env_vars() == {"GLIBC_TUNABLES": GLIBC_TUNABLES}
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    assert worker_env_vars() == {}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert worker_env_vars() == {}
