"""The bookkeeping modules, the wire types and the router's request path never import torch.

What still brings torch into a router process: ``transformers`` (the tokenizer; it imports
torch when installed), ``kv_transfer/__init__`` (eager imports; ``KVTransferConfig`` is a
router flag) and the worker classes ``router.cluster`` hands to Ray or runs in-process.
"""

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
    "engine.outputs",
    "engine.detokenizer",
    "engine.malloc",
    # What the router needs to talk to workers: the wire types and the typed clients.
    "engine.wire",
    "engine.channel",
    "router.backends.clients",
    "router.backend",
    "router.generation",
    "router.serving",
    "router.policy",
    "router.planner",
    "router.planner_loop",
    "router.api",
]


def test_bookkeeping_and_router_path_do_not_import_torch() -> None:
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
