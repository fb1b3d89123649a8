"""Deploy fixtures: pdserve's wheel, built once from the tracked files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(command: list[str], cwd: Path, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its stdout, or an assertion error with both streams."""
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, (
        f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: nothing of the repo on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="session")
def pdserve_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tracked files (the build leaves nothing here)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in map(os.fsdecode, filter(None, tracked)):
        if (REPO / name).is_file():  # deleted in the work tree, not yet in git: skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(root / "dist"), str(source)],
        root, 300, clean_env(),
    )  # fmt: skip
    (wheel,) = (root / "dist").glob("pdserve-*.whl")
    return wheel
