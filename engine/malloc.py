"""glibc's malloc for an engine process: keep the activations' memory between steps.

A CPU prefill step allocates activations of 5-32 MB per projection and frees them a moment
later. Under glibc's defaults a worker's engine thread gets a thread arena (heaps of at most
64 MB), chunks that big are mmapped, and freed memory goes back to the OS, so every step
faults the same memory in again, page by page. These tunables keep one arena (the main heap,
which grows without that limit), serve chunks below 32 MB (glibc's ceiling for the
threshold) from it, and keep up to 1 GiB of freed memory instead of trimming it: the memory
a step frees is the memory the next step reuses (``benchmarks/prefill_cpu.py`` measures the
faults and the time; the figures are in ``benchmarks/RESULTS.md``).

glibc reads ``GLIBC_TUNABLES`` once, when a process starts, so the cluster hands it to each
Ray worker in the actor's ``runtime_env``; a process that is already running (the router's,
with ``--in-process`` workers) keeps what it started with. An operator who sets
``GLIBC_TUNABLES`` (even to nothing) keeps theirs. Other C libraries ignore the variable.
"""

from __future__ import annotations

import os

GLIBC_TUNABLES = ":".join(
    (
        "glibc.malloc.arena_max=1",
        f"glibc.malloc.mmap_threshold={32 << 20}",
        f"glibc.malloc.trim_threshold={1 << 30}",
    )
)


def worker_env_vars() -> dict[str, str]:
    """The environment variables an engine worker process starts with (a Ray actor's
    ``runtime_env["env_vars"]``): the tunables, unless this environment sets its own."""
    if "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": GLIBC_TUNABLES}
