"""A real ``ray up`` of deploy/ray/local.yaml, a chat completion from it, and ``ray down``.

The "remote" machine is this one, behind an sshd in its own PID, mount and network
namespaces (``unshare``): ``ray down`` runs ``ray stop`` on the head, which kills every Ray
process it can see by name, so the head must not see the Ray clusters of other tests on this
machine (a sentinel process named ``raylet`` outside the namespace proves it); its own network
namespace gives Ray its default ports; ``/root`` and ``/tmp/ray`` are bind-mounted from this
test's folder, so the head's ``~/.profile``, ``~/.ray/auth_token`` and Ray session files are
its own. SSH reaches the namespace through ``auth.ssh_proxy_command`` (``nsenter`` + ``nc``:
Ray has no SSH port setting).

The cluster config is local.yaml with only what must differ here replaced: the head's address
(127.0.0.1, no workers), SSH auth, the files mounted (this test's wheel and token), the install
step (the wheel ``--no-deps`` plus this venv's third-party packages, instead of a download), the
head's resources (one node holds both roles) and the router's model and device (pdserve-tiny on
CPU, 1P1D). Everything else, the Ray start commands and the PATH line ``ray down`` needs, runs
as shipped. Bounded: every command has a timeout; every process is checked by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.deploy import namespace
from tests.deploy.commands import parse_pdserve, pdserve_argvs
from tests.deploy.conftest import REPO
from tests.deploy.namespace import Namespace, missing_tools
from tests.serving.conftest import is_alive, terminate

LOCAL_YAML = REPO / "deploy" / "ray" / "local.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
TOOLS = ("sshd", "ssh", "ssh-keygen", "rsync", "nc")
ROUTER_PORT = 8000  # inside the namespace, as local.yaml has it
HEAD_RESOURCES = {"prefill_node": 1, "decode_node": 1}
TEST_ROUTER_FLAGS = {
    "--model": "pdserve-tiny", "--dtype": "float32", "--device": "cpu",
    "--num-prefill": "1", "--num-decode": "1",
    # One node: loopback. (Across nodes local.yaml says 0.0.0.0: the decode worker then
    # advertises its Ray node's address; test_kuberay_pods runs that.)
    "--kv-host": "127.0.0.1",
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    bool(missing_tools(*TOOLS)), reason=f"needs {missing_tools(*TOOLS)} (make test installs them)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Remote:
    """The namespace whose init is sshd, and the key that logs in as root."""

    namespace: Namespace
    key: Path

    @property
    def root(self) -> Path:
        return self.namespace.root

    @property
    def proxy_command(self) -> str:
        return shlex.join([*self.namespace.enter_net, "nc", "127.0.0.1", "22"])

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.key), "-o", f"ProxyCommand={self.proxy_command}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
        ]  # fmt: skip

    def processes(self) -> dict[int, str]:
        return self.namespace.processes()


def _sshd_namespace(root: Path) -> Remote:
    (root / "home" / ".ssh").mkdir(parents=True)
    key = root / "id_ed25519"
    for path in (key, root / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    shutil.copy(f"{key}.pub", root / "home" / ".ssh" / "authorized_keys")
    config = root / "sshd_config"
    config.write_text(
        f"Port 22\nListenAddress 127.0.0.1\nHostKey {root}/host_key\nPidFile {root}/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
        "AllowTcpForwarding yes\nStrictModes no\nSubsystem sftp internal-sftp\n"
    )
    # sshd wants its privilege separation directory, which Debian's service unit creates at
    # boot; on a fresh machine where make just installed openssh-server, nothing has.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    remote = Remote(namespace.start(root, f"/usr/sbin/sshd -D -e -f {config}"), key)
    deadline = time.monotonic() + 20
    while True:
        probe = subprocess.run(
            ["ssh", *remote.ssh_options(), "root@127.0.0.1", "true"], capture_output=True,
            timeout=20,
        )  # fmt: skip
        if probe.returncode == 0:
            return remote
        if remote.namespace.unshare.poll() is not None or time.monotonic() > deadline:
            log = remote.namespace.log()
            remote.namespace.kill()
            raise AssertionError(f"sshd in the namespace does not answer:\n{log}")
        time.sleep(0.2)


def _cluster_config(remote: Remote, wheel: Path, name: str) -> dict[str, Any]:
    config = yaml.safe_load(LOCAL_YAML.read_text())
    root = remote.root
    dist = root / "dist"
    dist.mkdir()
    shutil.copy(wheel, dist)
    token = root / "auth_token"
    token.write_text(uuid.uuid4().hex)
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config.update(min_workers=0, max_workers=0)
    config["auth"] = {
        "ssh_user": "root",
        "ssh_private_key": str(remote.key),
        "ssh_proxy_command": remote.proxy_command,
    }
    assert set(config["file_mounts"]) == {"~/pdserve-dist", "~/.ray/auth_token"}
    config["file_mounts"] = {"~/pdserve-dist": str(dist), "~/.ray/auth_token": str(token)}

    # The install: the shipped venv + pip lines become the wheel without its dependencies,
    # which come from this venv (no download), and a `ray` command in the new venv.
    install, path_line = config["setup_commands"][:2], config["setup_commands"][2:]
    assert "pip install" in install[1] and len(path_line) == 1 and "~/.profile" in path_line[0]
    venv = "$HOME/pdserve-venv"
    config["setup_commands"] = [
        f"test -x {venv}/bin/python || {sys.executable} -m venv --without-pip {venv}",
        f"{sys.executable} -m pip --python {venv}/bin/python install -q --no-deps "
        "~/pdserve-dist/pdserve-*.whl",
        f"echo {sysconfig.get_paths()['purelib']} > "
        f"$({venv}/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
        "/project_deps.pth",
        f"printf '#!/bin/sh\\nexec {venv}/bin/python -c \"import sys; from ray.scripts.scripts "
        f'import main; sys.exit(main())" "$@"\\n\' > {venv}/bin/ray && chmod +x {venv}/bin/ray',
        *path_line,
    ]

    head = config["head_start_ray_commands"]
    (start,) = [i for i, c in enumerate(head) if "ray start --head" in c]
    assert "--num-gpus=0" in head[start]
    head[start] = head[start].replace(
        "--num-gpus=0",
        f"--num-gpus=0 --num-cpus=2 --include-dashboard=false "
        f"--resources={shlex.quote(json.dumps(HEAD_RESOURCES))}",
    )
    (router,) = [i for i, c in enumerate(head) if pdserve_argvs(c)]
    (argv,) = pdserve_argvs(head[router])
    shipped = shlex.join(["pdserve", *argv])
    assert shipped in head[router], "the router command is not in shlex.join form"
    for flag, value in TEST_ROUTER_FLAGS.items():
        argv[argv.index(flag) + 1] = value
    assert parse_pdserve(argv).port == ROUTER_PORT
    head[router] = head[router].replace(shipped, shlex.join(["pdserve", *argv]))
    return config


def _ray(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )  # fmt: skip


@pytest.fixture
def remote() -> Iterator[Remote]:
    root = Path(tempfile.mkdtemp(prefix="pdup-", dir="/tmp"))
    remote = _sshd_namespace(root)
    try:
        yield remote
    finally:
        remote.namespace.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_up_serves_a_chat_completion_and_ray_down_leaves_nothing(
    remote: Remote, pdserve_wheel: Path
) -> None:
    name = f"pdserve-test-{uuid.uuid4().hex[:8]}"
    config_path = remote.root / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(_cluster_config(remote, pdserve_wheel, name)))
    # A process that `ray stop` would kill by name if it could see it.
    sentinel_exe = remote.root / "raylet"
    shutil.copy("/bin/sleep", sentinel_exe)
    sentinel = subprocess.Popen([str(sentinel_exe), "600"], start_new_session=True)
    tunnel = None
    try:
        up = _ray(["up", "-y", "--disable-usage-stats", "--no-config-cache", str(config_path)], 300)
        assert up.returncode == 0, f"ray up failed:\n{up.stdout}\n{up.stderr}"

        # The router was started by the head's start commands; reach it through SSH.
        local_port = _free_port()
        tunnel = subprocess.Popen(
            ["ssh", *remote.ssh_options(), "-N", "-o", "ExitOnForwardFailure=yes",
             "-L", f"{local_port}:127.0.0.1:{ROUTER_PORT}", "root@127.0.0.1"],
            start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{local_port}"
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200:
                    break
            router_alive = any("pdserve serve" in c for c in remote.processes().values())
            if not router_alive or time.monotonic() > deadline:
                log = _ray(["exec", str(config_path), "tail -n 40 ~/pdserve-router.log"], 60)
                raise AssertionError(f"router not healthy (alive: {router_alive}):\n{log.stdout}")
            time.sleep(1)

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model="pdserve-tiny",
            messages=[{"role": "user", "content": "Hello from ray up"}],
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage.completion_tokens == 8
        assert reply.choices[0].finish_reason == "length"
        assert reply.choices[0].message.content
        # Workers are Ray actors in the namespace, running pdserve from the wheel's venv.
        workers = [
            c for c in remote.processes().values() if "PrefillWorker" in c or "DecodeWorker" in c
        ]
        assert len(workers) == 2, remote.processes()

        # Stop the router (as local.yaml documents), then ray down.
        stop = _ray(
            ["exec", str(config_path), 'kill "$(cat ~/pdserve-router.pid)" && echo stopped'], 120
        )
        assert "stopped" in stop.stdout, f"{stop.stdout}\n{stop.stderr}"
        down = _ray(["down", "-y", str(config_path)], 180)
        assert down.returncode == 0, f"ray down failed:\n{down.stdout}\n{down.stderr}"
        deadline = time.monotonic() + 30
        while left := {p: c for p, c in remote.processes().items() if "sshd" not in c}:
            assert time.monotonic() < deadline, f"left on the head after ray down: {left}"
            time.sleep(0.5)
        assert is_alive(sentinel.pid), "ray down killed a Ray process outside its namespace"
    finally:
        for process in (tunnel, sentinel):
            if process is not None:
                terminate({process.pid}, timeout_s=5)
                process.wait(timeout=5)
        for suffix in ("state", "lock"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"/tmp/ray/cluster-{name}.{suffix}")
