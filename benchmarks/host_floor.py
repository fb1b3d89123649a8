"""What this host charges a front process for a token that comes alone: two floors under
the router's paced CPU figure that no router code goes below, measured with no server.

- ``send``: the CPU one SSE-sized write (``SEND_BYTES``) to a loopback TCP connection
  costs the writing thread, once every ``GAP_S`` (a lone stream's inter-token gap on the
  ~100M model) and back to back: the kernel delivers to the reader and wakes it inside the
  writer's system call.
- ``wake``: the CPU the same small piece of Python (unpickle a worker-sized frame, format
  an SSE event) costs when the thread slept ``GAP_S`` before it (``after_sleep``: the CPU
  may go idle, and on a virtual machine the vCPU halts and the host runs something else),
  when it spun for as long instead (``after_spin``: awake the whole gap, nothing else ran on
  its CPU in between) and back to back. ``after_sleep`` over ``after_spin`` is what waking
  costs on this host apart from the work: ~1 on a quiet bare-metal core; on the 2-vCPU
  microVMs these results come from it was ~10 (a paced token pays it at every wake-up).

``benchmarks/router_cpu.py`` and ``compare_vllm.py`` record both with their runs
(``host_floor`` in their JSON), since the same command on these hosts has moved 2x:

    .venv/bin/python -m benchmarks.host_floor [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._servers import machine_info

SEND_BYTES = 200  # about one SSE text event
GAP_S = 0.03  # a lone stream's inter-token gap on the ~100M model
SEND_COUNT = 300
WAKE_COUNT = 100
_DRAIN = (
    "import socket, sys\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "while s.recv(65536): pass\n"
)
# A decode worker's outputs frame for one stream's step, in plain types (what is measured
# is the host, so the work must not change with pdserve's own wire types).
_FRAME = pickle.dumps(
    [{"request_id": "cmpl-0123456789abcdef", "token_ids": [1234], "finished": False}] * 2
)


def _median_mean(costs: list[float]) -> tuple[float, float]:
    return statistics.median(costs), statistics.fmean(costs)


def send_us() -> dict[str, float]:
    """CPU microseconds (this thread's) of one ``SEND_BYTES`` write to a loopback TCP
    connection whose reader is another process: median and mean, every ``GAP_S`` and
    back to back."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        reader = subprocess.Popen([sys.executable, "-c", _DRAIN, str(port)])
        try:
            server.settimeout(30)
            connection, _ = server.accept()
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                message = b"x" * SEND_BYTES
                figures = {}
                for name, gap_s in (("paced", GAP_S), ("back_to_back", 0.0)):
                    costs = []
                    for _ in range(SEND_COUNT):
                        if gap_s:
                            time.sleep(gap_s)
                        start = time.thread_time_ns()
                        connection.sendall(message)
                        costs.append((time.thread_time_ns() - start) / 1e3)
                    figures[f"{name}_median"], figures[f"{name}_mean"] = _median_mean(costs)
        finally:
            reader.wait(timeout=30)  # it ends when the connection closes
    return figures


def _token_work(frame: bytes) -> bytes:
    """A stand-in for a token's work in a front process: read a frame, write an event."""
    outputs = pickle.loads(frame)
    chunk = {"id": outputs[0]["request_id"], "choices": [{"delta": {"content": " the"}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def wake_us() -> dict[str, float]:
    """CPU microseconds (this thread's) of ``_token_work`` after a ``GAP_S`` sleep, after
    a ``GAP_S`` spin and back to back: median and mean of ``WAKE_COUNT`` calls each, and
    ``sleep_over_spin``, the medians' ratio."""
    figures: dict[str, float] = {}
    waits = (("after_sleep", time.sleep), ("after_spin", _spin), ("back_to_back", None))
    for name, wait in waits:
        costs = []
        for _ in range(WAKE_COUNT):
            if wait is not None:
                wait(GAP_S)
            start = time.thread_time_ns()
            _token_work(_FRAME)
            costs.append((time.thread_time_ns() - start) / 1e3)
        figures[f"{name}_median"], figures[f"{name}_mean"] = _median_mean(costs)
    figures["sleep_over_spin"] = figures["after_sleep_median"] / figures["after_spin_median"]
    return figures


def measure() -> dict[str, dict[str, float]]:
    return {"send_us": send_us(), "wake_us": wake_us()}


def describe(floor: dict[str, dict[str, float]]) -> str:
    send, wake = floor["send_us"], floor["wake_us"]
    gap_ms = GAP_S * 1e3
    return (
        f"host floor: one {SEND_BYTES}-byte loopback write costs the writer "
        f"{send['paced_median']:.1f} us median / {send['paced_mean']:.1f} us mean of CPU once "
        f"every {gap_ms:.0f} ms, {send['back_to_back_median']:.1f} / "
        f"{send['back_to_back_mean']:.1f} us back to back; a token's Python "
        f"{wake['after_sleep_median']:.1f} us after a {gap_ms:.0f} ms sleep, "
        f"{wake['after_spin_median']:.1f} after as long a spin, "
        f"{wake['back_to_back_median']:.1f} back to back (medians; waking costs "
        f"{wake['sleep_over_spin']:.1f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    floor = measure()
    print(describe(floor))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine_info(), "gap_s": GAP_S, **floor}
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
