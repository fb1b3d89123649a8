"""The ``ray up`` YAMLs in deploy/ray: Ray's own validation, pdserve's parser, and roles.

Each YAML must pass ``validate_config(prepare_config(...))`` (what ``ray up`` runs first), its
``pdserve`` command lines must parse with pdserve's parser, and the Ray custom resources the
router's ``--prefill-resources`` / ``--decode-resources`` select must be offered by some node
type, in enough units for ``--num-prefill`` / ``--num-decode`` workers.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from router.cluster import parse_resources
from tests.deploy.commands import CommandLineError, parse_pdserve, pdserve_argvs

RAY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ray"
YAMLS = sorted(RAY_DIR.glob("*.yaml"))
COMMAND_KEYS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _commands(config: dict[str, Any], keys: tuple[str, ...] = COMMAND_KEYS) -> list[str]:
    return [command for key in keys for command in config.get(key, [])]


def _serve_args(config: dict[str, Any]) -> Any:
    argvs = [argv for c in _commands(config) for argv in pdserve_argvs(c)]
    assert len(argvs) == 1, f"expected one router command, found {argvs}"
    return parse_pdserve(argvs[0])


def test_there_is_a_yaml_per_provider() -> None:
    assert [p.name for p in YAMLS] == ["aws.yaml", "gcp.yaml", "local.yaml"]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_ray_validates_the_cluster_config(path: Path) -> None:
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_the_head_starts_the_router_with_a_command_pdserve_parses(path: Path) -> None:
    args = _serve_args(_load(path))
    assert args.command == "serve"
    assert args.address == "auto" and args.host == "0.0.0.0" and args.kv_host == "0.0.0.0"
    assert args.device == "cuda"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_command_is_in_a_login_shell_setup_ray_can_stop(path: Path) -> None:
    config = _load(path)
    starts = _commands(config, ("head_start_ray_commands", "worker_start_ray_commands"))
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        # Environment variables do not travel over SSH: the auth mode is in the command.
        assert "RAY_AUTH_MODE=token ray start" in command
        assert "--disable-usage-stats" in command
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("~/.profile" in c for c in config["setup_commands"]), "ray must be on login PATH"


def _role_resources(path: Path, config: dict[str, Any], role: str) -> dict[str, float]:
    """The custom resources one node of ``role`` offers, in units."""
    if config["provider"]["type"] != "local":
        (node_type,) = (t for name, t in config["available_node_types"].items() if name == role)
        return node_type["resources"]
    # On-premise: one node type; the worker start command picks the role from the node's IP.
    (script,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    prefill_ips = re.search(r'PREFILL_IPS="([^"]*)"', script).group(1).split()
    ip = (
        prefill_ips[0]
        if role == "prefill"
        else next(ip for ip in config["provider"]["worker_ips"] if ip not in prefill_ips)
    )
    # Run the role selection for real, with this node's address and 2 GPUs.
    stub = (
        f"hostname() {{ echo {ip} 127.0.0.1; }}; nvidia-smi() {{ printf 'GPU 0\\nGPU 1\\n'; }}; "
        "ray() { printf '%s\\n' \"$@\"; }; ulimit() { :; }; RAY_HEAD_IP=10.0.0.10; "
    )
    out = subprocess.run(
        ["bash", "-c", stub + script], capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()
    (flag,) = [line for line in out if line.startswith("--resources=")]
    return {k: v / 2 for k, v in json.loads(flag.removeprefix("--resources=")).items()}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_node_types_offer_the_resources_the_router_selects(path: Path) -> None:
    config = _load(path)
    args = _serve_args(config)
    for role, wanted_text, count in (
        ("prefill", args.prefill_resources, args.num_prefill),
        ("decode", args.decode_resources, args.num_decode),
    ):
        wanted = parse_resources(wanted_text)
        assert wanted, f"{path.name}: --{role}-resources is not set"
        offered = _role_resources(path, config, role)
        assert set(wanted) <= set(offered), (role, wanted, offered)
        if config["provider"]["type"] == "local":
            continue  # units per node come from nvidia-smi on the node
        max_nodes = config["available_node_types"][role]["max_workers"]
        for name, amount in wanted.items():
            assert count * amount <= offered[name] * max_nodes, (role, name, count)
        other = "decode" if role == "prefill" else "prefill"
        assert not set(wanted) & set(_role_resources(path, config, other)), "roles overlap"


def test_a_bad_flag_in_a_command_line_is_caught() -> None:
    (argv,) = pdserve_argvs("nohup pdserve serve --prefill-count 2 > log 2>&1 &")
    assert argv == ["serve", "--prefill-count", "2"]
    with pytest.raises(CommandLineError, match="unrecognized arguments"):
        parse_pdserve(argv)
    (argv,) = pdserve_argvs(shlex.join(["pdserve", "serve", "--block-size", "0"]) + "; true")
    with pytest.raises(CommandLineError, match="block_size"):
        parse_pdserve(argv)
