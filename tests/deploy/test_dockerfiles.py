"""The Dockerfiles in deploy/docker, read instruction by instruction.

No image can be built here (no base images, no registry), so this checks what review would:
multi-stage, pinned base images, the dependencies installed from the pinned constraints, a
non-root user, a HEALTHCHECK whose Python compiles, the tools KubeRay's pods need, every
COPY source present and not excluded by the Dockerfile's .dockerignore, and a CMD that
pdserve's own parser accepts.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

from tests.deploy.commands import parse_pdserve
from tests.deploy.conftest import REPO

DOCKERFILES = sorted(
    p for p in (REPO / "deploy" / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore"
)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name}: a continuation line ends the file"
    return out


def _final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def _included(path: str, ignore: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here: last match wins."""
    included = True
    for pattern in ignore:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/"):
            included = negate
    return included


def test_a_cpu_and_a_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path: Path) -> None:
    steps = instructions(path)
    args = {m[0]: m[1] for k, v in steps if k == "ARG" for m in [v.split("=", 1)] if len(m) == 2}
    bases = [v.split()[0] for k, v in steps if k == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        tag = image.partition(":")[2]
        assert re.search(r"\d+\.\d+", tag) and tag != "latest", f"unpinned base {image}"

    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "-r requirements.txt -c constraints.txt" in runs
    assert "pip wheel --no-deps" in runs and "/wheels/pdserve-*.whl" in runs

    final = _final_stage(steps)
    (user,) = [v for k, v in final if k == "USER"]
    assert user not in ("0", "root")
    final_runs = " ".join(v for k, v in final if k == "RUN")
    for tool in ("bash", "wget"):  # KubeRay's start command and injected probes
        assert f" {tool} " in final_runs, tool
    (health,) = [v for k, v in final if k == "HEALTHCHECK"]
    command = json.loads(health[health.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")

    (cmd,) = [v for k, v in final if k == "CMD"]
    argv = json.loads(cmd)
    assert argv[0] == "pdserve"
    parsed = parse_pdserve(argv[1:])
    assert parsed.host == "0.0.0.0"

    ignore = [
        line.strip()
        for line in Path(f"{path}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, value in steps:
        if keyword == "COPY" and not value.startswith("--from"):
            *sources, _ = value.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repo"
                assert _included(source, ignore), f"COPY {source}: excluded by .dockerignore"


def test_the_dockerignore_check_works() -> None:
    ignore = ["*", "!router", "**/__pycache__"]
    assert _included("router", ignore)
    assert not _included("tests", ignore)
