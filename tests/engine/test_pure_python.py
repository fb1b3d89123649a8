"""The bookkeeping modules never import torch: the router imports them on CPU-only hosts."""

import subprocess
import sys

PURE_MODULES = [
    "engine.block_hash",
    "engine.block_pool",
    "engine.kv_cache_manager",
    "engine.scheduler",
    "engine.request_queue",
    "engine.request",
    "engine.sampling_params",
    "engine.scheduler_output",
]


def test_bookkeeping_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {PURE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'triton') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
