"""/elastic_ft/status, /health and the metrics, following a real store (FastAPI test client).

The engine client is a stand-in (this tests the routes, not the engine); the
store, the follower, the controller and the Prometheus registry are real.
"""

import json
from datetime import timedelta

import pytest
import torch.distributed as dist
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.vllm.endpoints import ElasticFTEndpoints, FrontEndGroup


class HealthyEngine:
    async def check_health(self):
        return None


@pytest.fixture
def setup():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=10))
    registry = CollectorRegistry()
    group = FrontEndGroup(store, 4, 8, ElasticFTConfig(), registry=registry)
    app = FastAPI()
    ElasticFTEndpoints().attach_router(app)
    app.state.elastic_ft = group
    app.state.engine_client = HealthyEngine()
    return store, group, TestClient(app), registry


def _metric(registry, name):
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_healthy_group_reports_its_placement(setup):
    store, group, client, registry = setup
    assert client.get("/health").status_code == 200
    status = client.get("/elastic_ft/status").json()
    assert status["state"] == "HEALTHY" and status["epoch"] == 0 and status["live_ranks"] == [0, 1, 2, 3]
    assert status["expert_placement"] == {"0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}
    assert _metric(registry, 'elastic_ft_group_state{group="dp",state="HEALTHY"}') == 1


def test_fault_report_fences_then_rebuild_readmits(setup):
    store, group, client, registry = setup
    report = {"group": "dp", "epoch": 0, "reporter": 0, "suspects": [2], "kind": "dead",
              "trigger": "liveness", "reason": "process gone", "detected_at": 0.0}
    store.set("eft/dp/e0/fault/0", json.dumps(report))
    group.follower.poll()
    health = client.get("/health")
    assert health.status_code == 503 and health.headers["X-Elastic-FT-State"] == "FENCED"
    status = client.get("/elastic_ft/status").json()
    assert status["state"] == "FENCED" and status["epoch"] == 1 and status["live_ranks"] == [0, 1, 3]
    assert status["last_report"]["suspects"] == [2]
    assert _metric(registry, 'elastic_ft_faults_total{group="dp",kind="dead"}') == 1
    assert _metric(registry, 'elastic_ft_group_epoch{group="dp"}') == 1
    # New inference requests are refused fast and retriably; other routes still answer.
    refused = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "elastic_ft_group_not_serving"
    assert client.get("/elastic_ft/status").status_code == 200
    # The ranks agree on epoch 1 without rank 2: the front end sees READY.
    store.set("eft/dp/epoch", "1")
    store.set("eft/dp/e1/members", json.dumps({"members": [0, 1, 3], "leader": 0, "placement": {
        "0": [0, 1, 4], "1": [2, 3, 5], "3": [6, 7]}}))
    group.follower.poll()
    assert client.get("/health").status_code == 200
    assert client.get("/elastic_ft/status").json()["state"] == "READY"
    assert client.post("/v1/completions", json={}).status_code == 404  # let through (no such route here)
    assert _metric(registry, 'elastic_ft_recoveries_total{group="dp"}') == 1
    assert _metric(registry, 'elastic_ft_live_ranks{group="dp"}') == 3
    status = client.get("/elastic_ft/status").json()
    assert status["expert_placement"] == {"0": [0, 1, 4], "1": [2, 3, 5], "3": [6, 7]}
    # The first step of epoch 1 ran on every member: serving again.
    store.set("eft/dp/e1/serving", "0")
    group.follower.poll()
    assert client.get("/elastic_ft/status").json()["state"] == "HEALTHY"


def test_no_group_means_status_disabled_and_stock_health():
    app = FastAPI()
    ElasticFTEndpoints().attach_router(app)
    client = TestClient(app)
    assert client.get("/elastic_ft/status").json()["state"] == "DISABLED"
    assert client.get("/health").status_code == 200
