"""TEST ONLY: fault injection in the KV transport (off by default).

``--kv-fault-corrupt-rate P`` (``KVTransferConfig.fault_corrupt_rate``) corrupts the payload
of a transfer with probability P, among the sender's first ``--kv-fault-corrupt-first N``
transfers (0: every transfer), so a retry of the same request succeeds. The checksums the
sender sends are the source's; the bytes that reach the decode worker are not: gRPC (and
local) flips one byte of a packed payload after its checksum was taken; NIXL WRITEs one
block's K bytes from a flipped scratch copy instead of the cache. The receiver's verification
must catch it (``ChecksumError``, the reservation FAILED); the source cache is never touched.
"""

from __future__ import annotations

import logging
import random
import threading

import torch

from kv_transfer.base import KVTransferConfig

logger = logging.getLogger(__name__)


class FaultInjector:
    """Picks the transfers to corrupt; one per sender (its count of transfers is its own)."""

    def __init__(self, config: KVTransferConfig, rng: random.Random | None = None) -> None:
        self.rate = config.fault_corrupt_rate
        self.first = config.fault_corrupt_first
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._num_transfers = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def pick(self, request_id: str) -> bool:
        """Called once per transfer (``begin``): True when this one is to be corrupted."""
        if not self.enabled:
            return False
        with self._lock:
            self._num_transfers += 1
            if self.first and self._num_transfers > self.first:
                return False
            corrupt = self._rng.random() < self.rate
        if corrupt:
            logger.warning("fault injection: corrupting the KV payload of %s in flight", request_id)
        return corrupt


def corrupt_bytes(data: torch.Tensor) -> None:
    """Flip every bit of the middle byte of ``data`` (any dtype, contiguous), in place."""
    flat = data.view(-1).view(torch.uint8)
    flat[flat.numel() // 2] ^= 0xFF
