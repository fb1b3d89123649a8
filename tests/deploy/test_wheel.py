"""A built wheel installs non-editable into a fresh venv and runs from there.

The wheel is built from a copy of the tracked files (so the build leaves nothing in the repo),
installed with ``--no-deps`` into a new venv whose only link to the project venv is a ``.pth``
line naming its site-packages, for the third-party packages. ``pdserve`` then runs from a
temporary folder with no ``PYTHONPATH``: every first-party module must come from the fresh
venv, and the generated protobuf code (``kv_transfer/pb``) must not collide with proto-plus's
top-level ``proto`` package, which ``ray[default]`` installs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = (
    "engine",
    "kv_transfer",
    "kv_transfer.pb",
    "prefill_worker",
    "decode_worker",
    "router",
)


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, (
        f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = REPO / os.fsdecode(name)
        if path.is_file():  # a file deleted in the work tree but not yet in git is skipped
            (source / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / os.fsdecode(name))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(root / "dist"), str(source)],
        root, env, 300,
    )  # fmt: skip
    (wheel,) = (root / "dist").glob("pdserve-*.whl")

    target = root / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel)],
        root, env, 300,
    )  # fmt: skip
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        root, env, 60,
    ).strip()  # fmt: skip
    # Third-party packages only: a plain path line, so the project venv's own .pth files
    # (its editable install of pdserve) are not processed.
    (Path(purelib) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return target


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_first_party_modules_come_from_the_fresh_venv(fresh_venv: Path, tmp_path: Path) -> None:
    script = (
        "import importlib, json\n"
        f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {FIRST_PARTY!r}}}))\n"
        "import proto\n"  # proto-plus's package, which ray[default] pulls in
        "print(proto.__file__)\n"
        "from kv_transfer.pb import kv_transfer_pb2\n"
        "print(kv_transfer_pb2.DESCRIPTOR.name)\n"
    )
    out = _run(
        [
            str(
                fresh_venv / "bin" / "python",
            ),
            "-c",
            script,
        ],
        tmp_path,
        _clean_env(),
        120,
    )
    import json

    files, proto_file, descriptor = out.strip().splitlines()
    for module, path in json.loads(files).items():
        assert Path(path).resolve().is_relative_to(fresh_venv.resolve()), (module, path)
        assert not Path(path).resolve().is_relative_to(REPO), (module, path)
    assert "site-packages/proto/" in proto_file and not proto_file.startswith(str(REPO))
    assert descriptor.endswith(".proto")


def test_pdserve_help_and_generate_run_from_the_wheel(fresh_venv: Path, tmp_path: Path) -> None:
    pdserve = str(fresh_venv / "bin" / "pdserve")
    help_text = _run([pdserve, "--help"], tmp_path, _clean_env(), 60)
    for command in ("generate", "serve", "bench"):
        assert command in help_text
    out = _run(
        [pdserve, "generate", "--model", "pdserve-tiny", "--prompt", "Hello", "--max-tokens", "4",
         "--num-threads", "1"],
        tmp_path, _clean_env(), 180,
    )  # fmt: skip
    assert "prompt: 'Hello'" in out
    assert "(4 tokens, finish_reason=length)" in out
