"""One engine that both prefills and decodes, in this process: the baseline and test backend."""

from __future__ import annotations

from engine.config import EngineConfig
from kv_transfer.base import KVTransferConfig
from router.backends.cluster import BackendConfig, ClusterBackend
from router.cluster import Cluster, ClusterConfig
from router.metrics import RouterMetrics


class ColocatedBackend(ClusterBackend):
    def __init__(
        self,
        engine_config: EngineConfig,
        config: BackendConfig | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        cluster_config = ClusterConfig(
            engine=engine_config,
            kv_transfer=KVTransferConfig(transport="local"),
            num_prefill=0,
            num_decode=1,
            colocated=True,
        )
        super().__init__(Cluster(cluster_config), config, metrics)
