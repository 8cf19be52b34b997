"""A Ray Serve request router that never picks a replica whose DP gang is not serving.

Each :class:`~vllm_elastic_ft.ray_serve.server.ElasticDPServer` replica reports
``{"elastic_ft": {"serving": ..., ...}}`` in its routing stats (polled by the
Serve controller every ``request_routing_stats_period_s``). While a gang is
fenced or rebuilding, every replica of it reports ``serving: False``; a replica
whose own rank was lost keeps reporting it. The router chooses among the others
with the power of two choices (Serve then sends to the shorter queue of the two).
With no serving replica at all it returns nothing, and Serve retries with
backoff: the request waits for a gang instead of failing.
"""

from __future__ import annotations

import random
from typing import Any, List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def replica_serves(routing_stats: dict[str, Any] | None) -> bool:
    """Whether a replica with these routing stats may take new requests (no stats yet: yes)."""
    return bool(((routing_stats or {}).get("elastic_ft") or {}).get("serving", True))


class GangAwareRequestRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        serving = [r for r in candidate_replicas if replica_serves(r.routing_stats)]
        if not serving:
            return []
        return [random.sample(serving, min(2, len(serving)))]
