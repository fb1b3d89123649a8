"""Two Ray nodes on one machine: ``--prefill-resources`` / ``--decode-resources`` place the
actors on the nodes whose custom resources they name, and a request works end to end.

The nodes are started with ``ray start`` (a head with ``prefill_node``, a second node with
``decode_node``) in a temporary folder of their own; the server attaches with ``--address``.
At the end, every process of those two nodes is stopped by pid (``ray stop`` would stop
every Ray on the machine) and the test checks that none is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.conftest import (
    Offline,
    Server,
    cmdline,
    complete,
    descendants,
    serve,
    shutdown_ray,
    terminate,
    words,
)

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
PREFILL_RESOURCES = {"prefill_node": 1}
DECODE_RESOURCES = {"decode_node": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_processes(temp_dir: str, gcs_address: str) -> set[int]:
    """The nodes' daemons and their children. A daemon names the nodes' folder or the GCS
    port (with the machine's address, not always the one given to ``ray start``)."""
    gcs_port = re.compile(rf"address=\S*:{gcs_address.rsplit(':', 1)[1]}\b")
    seeds = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            line = cmdline(int(entry))
            if temp_dir in line or gcs_port.search(line):
                seeds.add(int(entry))
    return seeds | descendants(seeds)


def _ray_start(args: list[str], temp_dir: str, resources: dict[str, int]) -> None:
    # "0" (what the tests' conftest sets for local Ray) forbids a second node: allow it here.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    ports = {
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    command = [
        RAY,
        "start",
        *args,
        "--num-cpus=1",
        f"--resources={json.dumps(resources)}",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def gcs_address() -> Iterator[str]:
    shutdown_ray()  # this process can attach to one Ray cluster at a time
    # Short: Ray's unix socket paths under it must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="pdt-", dir="/tmp")
    address = f"127.0.0.1:{_free_port()}"
    try:
        _ray_start(
            [
                "--head",
                f"--port={address.rsplit(':', 1)[1]}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
            ],
            temp_dir,
            PREFILL_RESOURCES,
        )
        _ray_start([f"--address={address}"], temp_dir, DECODE_RESOURCES)
        yield address
    finally:
        shutdown_ray()
        pids = _node_processes(temp_dir, address)
        terminate(pids, timeout_s=5.0)
        assert not _node_processes(temp_dir, address), "processes of the two nodes are left"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(gcs_address: str) -> Iterator[Server]:
    with serve(
        [
            "--address", gcs_address,
            "--prefill-resources", json.dumps(PREFILL_RESOURCES),
            "--decode-resources", json.dumps(DECODE_RESOURCES),
        ]
    ) as running:  # fmt: skip
        yield running


def test_actors_run_on_the_nodes_their_resources_name(server: Server, offline: Offline) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    node_of = {
        name: n["NodeID"] for n in nodes for name in n["Resources"] if name.endswith("_node")
    }
    assert set(node_of) == {"prefill_node", "decode_node"}
    infos = server.worker_infos
    assert infos["prefill-0"].node_id == node_of["prefill_node"]
    assert infos["decode-0"].node_id == node_of["decode_node"]
    # A request crosses the two nodes: prefill on one, KV over gRPC, decode on the other.
    prompt = words(4242, 40)
    ids = offline.completion_ids(prompt)
    decisions = server.decisions()
    complete(server.client(), prompt, 10, True).check(offline.greedy(ids, 10), len(ids))
    assert server.decisions()["remote"] == decisions["remote"] + 1
    server.wait_idle()
