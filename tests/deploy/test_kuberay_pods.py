"""The chart's pods, run for real: what KubeRay would run in the head, prefill and decode pods.

Each pod is its own PID, mount and network namespace (``tests/deploy/namespace.py``), joined
by a bridge that lives inside the head pod's network namespace (10.213.0.0/24: nothing leaves
it). Each runs its container's command and arguments as rendered (CPU smoke values) as PID 1,
with ``KUBERAY_GEN_RAY_START_CMD`` built the way KubeRay builds it: ``ray start`` (``--head`` or
``--address`` of the head), the group's ``rayStartParams``, the pod IP, ``--block``, and the
group's ``resources`` as JSON in single quotes; a worker container that exits is started
again, as the kubelet does. Then: a chat completion whose prompt is
prefilled on the prefill pod and whose KV crosses the bridge to the decode pod over gRPC; the
rendered ``preStop`` returns once nothing is in flight; SIGTERM to the head's PID 1 (what the
kubelet sends) shuts the router down cleanly.

The chart's ``--kv-host 0.0.0.0`` as rendered: the decode worker binds every interface of
its pod and advertises its Ray node's address, which the prefill pod dials across the bridge.
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
from typing import Any

import pytest
import yaml

from tests.deploy import namespace
from tests.deploy.chart import CHART, render
from tests.deploy.commands import parse_pdserve, pdserve_argvs
from tests.deploy.conftest import REPO
from tests.deploy.namespace import Namespace, missing_tools

pytestmark = pytest.mark.skipif(
    bool(missing_tools()), reason=f"needs {missing_tools()} (make test installs them)"
)

IPS = {"head": "10.213.0.1", "prefill": "10.213.0.2", "decode": "10.213.0.3"}
PROMPT = " ".join(f"word{i}" for i in range(80))  # past any local-prefill threshold

CLIENT = """
import json, sys, time
import httpx, openai
base, prompt = f"http://127.0.0.1:{sys.argv[1]}", sys.argv[2]
deadline = time.monotonic() + 300
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
    model="pdserve-tiny", messages=[{"role": "user", "content": prompt}],
    max_tokens=6, extra_body={"ignore_eos": True},
)
metrics = {
    line.split()[0]: float(line.split()[-1])
    for line in httpx.get(f"{base}/metrics").text.splitlines()
    if line.startswith(("pdserve_prefill_decisions_total{", "pdserve_kv_transfer_bytes_count"))
}
print(json.dumps({"tokens": reply.usage.completion_tokens,
                  "finish": reply.choices[0].finish_reason, "metrics": metrics}))
"""


def _kuberay_start_command(pod: str, group: dict[str, Any]) -> str:
    """``ray start`` as KubeRay's pod.go (generateRayStartCommand) writes it for a group."""
    start = "ray start --head" if pod == "head" else f"ray start --address={IPS['head']}:6379"
    params = " ".join(f"--{k}={v}" for k, v in sorted(group["rayStartParams"].items()))
    resources = {k: int(v) for k, v in group.get("resources", {}).items()}
    command = f"{start} {params} --node-ip-address={IPS[pod]} --block --disable-usage-stats"
    return command + (f" --resources='{json.dumps(resources)}'" if resources else "")


def _ip(pod: Namespace, *args: str) -> None:
    subprocess.run([*pod.enter_net, "ip", *args], check=True, capture_output=True, timeout=10)


def _connect(pods: dict[str, Namespace]) -> None:
    """A bridge in the head's network namespace, a veth to each worker pod, a default route
    in each (so that Ray finds the pod's address as its own)."""
    head = pods["head"]
    _ip(head, "link", "add", "br0", "type", "bridge")
    _ip(head, "addr", "add", f"{IPS['head']}/24", "dev", "br0")
    _ip(head, "link", "set", "br0", "up")
    _ip(head, "route", "add", "default", "dev", "br0")
    for role in ("prefill", "decode"):
        peer = str(pods[role].unshare.pid)
        _ip(head, "link", "add", f"v{role}", "type", "veth", "peer", "name", "eth0", "netns", peer)
        _ip(head, "link", "set", f"v{role}", "master", "br0", "up")
        _ip(pods[role], "addr", "add", f"{IPS[role]}/24", "dev", "eth0")
        _ip(pods[role], "link", "set", "eth0", "up")
        _ip(pods[role], "route", "add", "default", "dev", "eth0")


def test_pods_serve_across_the_bridge_drain_and_stop_on_sigterm() -> None:
    values = yaml.safe_load((CHART / "ci" / "cpu-smoke-values.yaml").read_text())
    values["router"] = {
        "localPrefillThreshold": 0,
        "drain": {"endpointDelaySeconds": 0, "drainTimeoutSeconds": 20},
    }
    cluster = next(d for d in render(values) if d["kind"] == "RayCluster")["spec"]
    groups = {"head": cluster["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(IPS)
    containers = {pod: g["template"]["spec"]["containers"][0] for pod, g in groups.items()}
    (argv,) = pdserve_argvs(containers["head"]["args"][0])
    port = parse_pdserve(argv).port

    base_env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "HOME": "/root",
        "RAY_AUTH_MODE": "disabled",  # rayAuth.mode in these values
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # several Ray nodes on one kernel
    }
    roots = {pod: Path(tempfile.mkdtemp(prefix=f"pd{pod}-", dir="/tmp")) for pod in IPS}
    pods: dict[str, Namespace] = {}
    try:
        for pod, container in containers.items():
            assert container["command"] == ["/bin/bash", "-c", "--"]
            (script,) = container["args"]
            env = {
                **base_env,
                **{e["name"]: e["value"] for e in container["env"]},
                "KUBERAY_GEN_RAY_START_CMD": _kuberay_start_command(pod, groups[pod]),
            }
            # Like a pod's sandbox, the network is up before the container starts; worker
            # pods wait for the head's GCS, as KubeRay's injected init container does.
            wait = f"until ip -4 addr | grep -q 'inet {IPS[pod]}/'; do sleep 0.1; done; "
            if pod != "head":
                wait += (
                    f"until ray health-check --address {IPS['head']}:6379 > /dev/null 2>&1; "
                    "do sleep 1; done; "
                )
            run = shlex.join(["/bin/bash", *container["command"][1:], script])
            if pod != "head":
                # restartPolicy Always: when a worker container exits (under load `ray start`
                # can time out joining the GCS: Ray waits a fixed 30 s), the kubelet starts
                # it again in a clean container; here PID 1 kills what is left and reruns it.
                loop = f"while true; do {run}; kill -9 -1; sleep 2; done"
                run = f"bash -c {shlex.quote(loop)}"
            pods[pod] = namespace.start(
                roots[pod], f"bash -c {shlex.quote(wait + 'exec ' + run)}", env
            )
        _connect(pods)

        client = subprocess.run(
            [*pods["head"].enter_net, sys.executable, "-c", CLIENT, str(port), PROMPT],
            capture_output=True, text=True, timeout=360, env=base_env,
        )  # fmt: skip
        logs = "\n".join(f"--- {pod}\n{p.log()[-6000:]}" for pod, p in pods.items())
        assert client.returncode == 0, f"{client.stdout}\n{client.stderr}\n{logs}"
        answer = json.loads(client.stdout)
        assert (answer["tokens"], answer["finish"]) == (6, "length")
        remote = [v for k, v in answer["metrics"].items() if 'decision="remote"' in k]
        assert sum(remote) == 1, answer["metrics"]  # prefilled on the prefill pod
        assert answer["metrics"]["pdserve_kv_transfer_bytes_count"] == 1  # KV over the bridge
        for role, other in (("prefill", "decode"), ("decode", "prefill")):
            actor = f"{role.capitalize()}Worker"
            assert any(actor in c for c in pods[role].processes().values()), role
            assert not any(actor in c for c in pods[other].processes().values()), role
        head = pods["head"]
        assert "pdserve serve" in head.processes()[head.init_pid], "the router is not PID 1"

        # preStop as rendered: nothing in flight, so it returns at once.
        pre_stop = containers["head"]["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "python"
        hook = subprocess.run(
            [*head.enter_net, sys.executable, *pre_stop[1:]], capture_output=True, timeout=60
        )
        assert hook.returncode == 0, hook.stderr

        # The kubelet's SIGTERM to PID 1: the router stops its workers and exits 0; the
        # head pod (its namespace) dies with it.
        os.kill(head.init_pid, signal.SIGTERM)
        assert head.unshare.wait(timeout=120) == 0, head.log()[-4000:]
        assert head.processes() == {}
    finally:
        for pod in pods.values():
            pod.kill()
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
