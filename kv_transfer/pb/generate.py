"""Regenerate the committed Python code for the ``.proto`` files in the repo's ``proto/`` folder.

    .venv/bin/python -m kv_transfer.pb.generate

Runs ``grpc_tools.protoc`` (grpcio-tools, pinned in constraints.txt) and rewrites the
generated ``*_pb2_grpc.py`` import to a relative one, so ``kv_transfer.pb.kv_transfer_pb2``
and ``kv_transfer.pb.kv_transfer_pb2_grpc`` import from the repo root and when installed.
``tests/kv_transfer/test_generated_fresh.py`` regenerates into a temporary folder and fails
when the committed files differ.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import subprocess
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
# The schema stays in the repo's language-neutral proto/ folder (a source checkout only).
PROTO_DIR = OUT_DIR.parents[1] / "proto"
PROTO_FILES = ("kv_transfer.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

logger = logging.getLogger(__name__)

# protoc writes `import kv_transfer_pb2 as kv__transfer__pb2`, which only works with the folder on
# sys.path; the package-relative form works wherever the package is importable.
_ABSOLUTE_PB2_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", flags=re.MULTILINE)


def generated_paths(out_dir: Path) -> list[Path]:
    """The files ``generate`` writes into ``out_dir``, in a stable order."""
    return [
        out_dir / (Path(name).stem + suffix)
        for name in PROTO_FILES
        for suffix in GENERATED_SUFFIXES
    ]


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Compile every proto in ``PROTO_FILES`` into ``out_dir``; returns the written files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    # A child process: protoc in-process crashes once a library that bundles its own
    # protobuf/abseil (nixl's) is loaded, as it is in a test run that also tests NIXL.
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{done.stderr}")
    paths = generated_paths(out_dir)
    for path in paths:
        if path.name.endswith("_pb2_grpc.py"):
            text = path.read_text()
            path.write_text(_ABSOLUTE_PB2_IMPORT.sub(r"from . import \1 as \2", text))
    return paths


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate():
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
