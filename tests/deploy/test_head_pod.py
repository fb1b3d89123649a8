"""The chart's head container, run for real: what KubeRay would run in the head pod.

The container's command and arguments come from the rendered RayCluster (CPU smoke values);
``KUBERAY_GEN_RAY_START_CMD`` is built the way KubeRay builds it (``ray start --head``, the
rendered ``rayStartParams``, ``--block``, resources JSON in single quotes). It runs as PID 1 of
its own PID, mount and network namespaces, like a container. One node stands in for the
three pods: the head also offers the worker groups' resources. Then: the router answers a
chat completion, the rendered ``preStop`` hook returns once nothing is in flight, and SIGTERM
to PID 1 (what the kubelet sends) shuts the router down cleanly, taking everything with it.

Deviation from the chart: ``--kv-host 127.0.0.1`` (appended through ``router.extraArgs``;
pdserve's parser keeps the last value): with the chart's ``0.0.0.0`` the decode worker
fails at start until the router passes ``kv_advertise_host`` (see the README's Deploy
section).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.deploy import namespace
from tests.deploy.chart import CHART, render
from tests.deploy.commands import parse_pdserve, pdserve_argvs
from tests.deploy.conftest import REPO
from tests.deploy.namespace import missing_tools

pytestmark = pytest.mark.skipif(
    bool(missing_tools()), reason=f"needs {missing_tools()} (make test installs them)"
)

CLIENT = """
import json, sys, time
import httpx, openai
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 240
while True:
    try:
        if httpx.get(f"{base}/health", timeout=5).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("router not healthy in time")
    time.sleep(1)
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
reply = client.chat.completions.create(
    model="pdserve-tiny", messages=[{"role": "user", "content": "Hello, head pod"}],
    max_tokens=6, extra_body={"ignore_eos": True},
)
print(json.dumps({"tokens": reply.usage.completion_tokens,
                  "finish": reply.choices[0].finish_reason}))
"""


def _kuberay_start_command(ray_start_params: dict[str, str], resources: dict[str, int]) -> str:
    """KubeRay's ``ray start`` for the head, as pod.go's generateRayStartCommand writes it."""
    params = " ".join(f"--{k}={v}" for k, v in sorted(ray_start_params.items()))
    return (
        f"ray start --head {params} --block --disable-usage-stats --include-dashboard=false "
        f"--resources='{json.dumps(resources)}'"
    )


def test_head_container_serves_drains_and_stops_on_sigterm() -> None:
    values = yaml.safe_load((CHART / "ci" / "cpu-smoke-values.yaml").read_text())
    values["router"] = {
        "extraArgs": ["--kv-host", "127.0.0.1"],
        "drain": {"endpointDelaySeconds": 0, "drainTimeoutSeconds": 20},
    }
    cluster = next(d for d in render(values) if d["kind"] == "RayCluster")["spec"]
    head = cluster["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/bash", "-c", "--"]
    (script,) = container["args"]
    (argv,) = pdserve_argvs(script)
    port = parse_pdserve(argv).port
    offered = {role: 1 for g in cluster["workerGroupSpecs"] for role in g["resources"]}

    root = Path(tempfile.mkdtemp(prefix="pdhead-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        **{e["name"]: e["value"] for e in container["env"]},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "HOME": "/root",
        "RAY_AUTH_MODE": "disabled",  # rayAuth.mode in these values
        "KUBERAY_GEN_RAY_START_CMD": _kuberay_start_command(head["rayStartParams"], offered),
    }
    pod = namespace.start(root, shlex.join(["/bin/bash", *container["command"][1:], script]), env)
    try:
        client = subprocess.run(
            [*pod.enter_net, sys.executable, "-c", CLIENT, str(port)],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert client.returncode == 0, f"{client.stdout}\n{client.stderr}\n{pod.log()[-4000:]}"
        assert json.loads(client.stdout) == {"tokens": 6, "finish": "length"}
        assert "pdserve serve" in pod.processes()[pod.init_pid], "the router is not PID 1"

        # preStop as rendered: nothing in flight, so it returns at once.
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "python"
        hook = subprocess.run(
            [*pod.enter_net, sys.executable, *pre_stop[1:]], capture_output=True, timeout=60
        )
        assert hook.returncode == 0, hook.stderr

        # The kubelet's SIGTERM to PID 1: the router stops its workers and exits 0; the
        # namespace (the container) dies with it.
        os.kill(pod.init_pid, signal.SIGTERM)
        assert pod.unshare.wait(timeout=120) == 0, pod.log()[-4000:]
        assert pod.processes() == {}
    finally:
        if pod.unshare.poll() is None or pod.processes():
            pod.kill()
        shutil.rmtree(root, ignore_errors=True)
