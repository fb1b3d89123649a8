"""A decode worker's KV receiver in a child process, driven over a pipe (for the NIXL tests).

The NIXL path is only real between two processes (two agents, UCX over loopback), so the
decode side runs in a spawned child with its own cache and answers commands:
``expect``/``info``/``status``/``wait``/``cancel``/``blocks``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import torch

from kv_transfer import KVLayout, KVTransferConfig, TransferTarget, get_transport
from kv_transfer.base import ReceiverInfo
from kv_transfer.layout import cache_layer_shape, gather_blocks

REPLY_TIMEOUT_S = 60.0


def _child_main(
    conn: Connection, layout: dict[str, Any], num_blocks: int, address: str, secret: bytes
) -> None:
    torch.set_num_threads(1)
    layout_ = KVLayout(**layout)
    caches = [
        torch.zeros(cache_layer_shape(layout_, num_blocks), dtype=layout_.torch_dtype)
        for _ in range(layout_.num_layers)
    ]
    receiver = get_transport("nixl").create_receiver(
        caches, KVTransferConfig(transport="nixl", secret=secret), address=address
    )
    conn.send(("ready", receiver.info()))
    while True:
        op, args = conn.recv()
        try:
            if op == "close":
                break
            if op == "expect":
                reply = receiver.expect(
                    args["request_id"], args["block_ids"], lease_s=args["lease_s"]
                )
            elif op == "status":
                reply = receiver.status(args["request_id"])
            elif op == "wait":
                reply = receiver.wait_complete(args["request_id"], timeout=args["timeout"])
            elif op == "cancel":
                reply = receiver.cancel(args["request_id"])
            elif op == "blocks":  # [num_layers, n, 2, block_size, H, D] of the given blocks
                ids = torch.tensor(args["block_ids"])
                reply = torch.stack([gather_blocks(layer, ids) for layer in caches])
            else:
                raise ValueError(f"unknown op {op!r}")
            conn.send(("ok", reply))
        except Exception as error:  # sent back to be raised in the test
            conn.send(("error", error))
    receiver.close()
    conn.send(("ok", None))


class DecodePeer:
    """The child process and its receiver; every call returns the child's answer or raises."""

    def __init__(
        self, layout: KVLayout, num_blocks: int, address: str = "", secret: bytes = b""
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_child_main,
            args=(child, asdict(layout), num_blocks, address, secret),
            daemon=True,
        )
        self.process.start()
        if not self._conn.poll(REPLY_TIMEOUT_S):
            self.kill()
            raise TimeoutError("the decode peer did not start")
        _, self.info = self._conn.recv()
        assert isinstance(self.info, ReceiverInfo)

    def _call(self, op: str, **args: Any) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(REPLY_TIMEOUT_S):
            raise TimeoutError(f"the decode peer did not answer {op!r}")
        kind, reply = self._conn.recv()
        if kind == "error":
            raise reply
        return reply

    def expect(
        self, request_id: str, block_ids: list[int], lease_s: float = 60.0
    ) -> TransferTarget:
        return self._call("expect", request_id=request_id, block_ids=block_ids, lease_s=lease_s)

    def status(self, request_id: str) -> Any:
        return self._call("status", request_id=request_id)

    def wait(self, request_id: str, timeout: float = 30.0) -> bool:
        return self._call("wait", request_id=request_id, timeout=timeout)

    def cancel(self, request_id: str) -> bool:
        return self._call("cancel", request_id=request_id)

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self._call("blocks", block_ids=block_ids)

    def kill(self) -> None:
        """SIGKILL: the decode worker dies without closing anything."""
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(TimeoutError, OSError, EOFError):
                self._call("close")
        self.kill()
