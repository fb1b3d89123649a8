"""A built wheel installs non-editable into a fresh venv and runs from there.

The wheel is built from a copy of the tracked files (so the build leaves nothing in the repo),
installed with ``--no-deps`` into a new venv whose only link to the project venv is a ``.pth``
line naming its site-packages, for the third-party packages. ``pdserve`` then runs from a
temporary folder with no ``PYTHONPATH``: every first-party module must come from the fresh
venv, and the generated protobuf code (``kv_transfer/pb``) must not collide with proto-plus's
top-level ``proto`` package, which ``ray[default]`` installs.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO, clean_env, run

FIRST_PARTY = (
    "engine", "kv_transfer", "kv_transfer.pb", "prefill_worker", "decode_worker", "router",
)  # fmt: skip


@pytest.fixture(scope="module")
def fresh_venv(pdserve_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    target = root / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(pdserve_wheel)],
        root, 300, clean_env(),
    )  # fmt: skip
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        root, 60, clean_env(),
    ).strip()  # fmt: skip
    # Third-party packages only: a plain path line, so the project venv's own .pth files
    # (its editable install of pdserve) are not processed.
    (Path(purelib) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return target


def test_first_party_modules_come_from_the_fresh_venv(fresh_venv: Path, tmp_path: Path) -> None:
    script = (
        "import importlib, json\n"
        f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {FIRST_PARTY!r}}}))\n"
        "import proto\n"  # proto-plus's package, which ray[default] pulls in
        "print(proto.__file__)\n"
        "from kv_transfer.pb import kv_transfer_pb2\n"
        "print(kv_transfer_pb2.DESCRIPTOR.name)\n"
    )
    out = run([str(fresh_venv / "bin" / "python"), "-c", script], tmp_path, 120, clean_env())
    files, proto_file, descriptor = out.strip().splitlines()
    for module, path in json.loads(files).items():
        assert Path(path).resolve().is_relative_to(fresh_venv.resolve()), (module, path)
        assert not Path(path).resolve().is_relative_to(REPO), (module, path)
    # proto-plus's, from site-packages (the project venv may sit inside the repo: CI's does),
    # never the repo's own proto/ folder, which holds only the schema.
    assert "site-packages/proto/" in proto_file
    assert not Path(proto_file).resolve().is_relative_to(REPO / "proto")
    assert descriptor.endswith(".proto")


def test_pdserve_help_and_generate_run_from_the_wheel(fresh_venv: Path, tmp_path: Path) -> None:
    pdserve = str(fresh_venv / "bin" / "pdserve")
    help_text = run([pdserve, "--help"], tmp_path, 60, clean_env())
    for command in ("generate", "serve", "bench"):
        assert command in help_text
    out = run(
        [pdserve, "generate", "--model", "pdserve-tiny", "--prompt", "Hello", "--max-tokens", "4",
         "--num-threads", "1"],
        tmp_path, 180, clean_env(),
    )  # fmt: skip
    assert "prompt: 'Hello'" in out
    assert "(4 tokens, finish_reason=length)" in out
