"""The control plane under ``--api-key``, and ``POST /elastic_ft/replace``'s body check.

The real routes and middleware of ``ElasticFTEndpoints`` on a FastAPI app
(Starlette's test client); the key comes in through the plugin's real
``init_state`` from the server args, as vLLM hands them over. The recovery is a
stand-in that records what it was asked to replace: a refused request must
never reach it.
"""

from __future__ import annotations

import asyncio
import json
from argparse import Namespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.vllm import api_key
from vllm_elastic_ft.vllm.endpoints import ElasticFTEndpoints, FrontEndGroup

KEY = "s3cret"
OTHER_KEY = "second-key"
UNAUTHORIZED = {"error": "Unauthorized"}


class HealthyEngine:
    async def check_health(self):
        return None


class RecordingRecovery:
    """Stands in for ``FrontEndRecovery``: rank 2 is lost; ``replace`` records its calls."""

    def __init__(self):
        self.lost = {2}
        self.admitting = False
        self.calls: list[object] = []

    def exclude(self, ranks, reason):
        pass

    def status(self) -> dict:
        return {"lost_ranks": sorted(self.lost)}

    async def replace(self, rank, start_timeout_s, admit_timeout_s) -> dict:
        self.calls.append(rank)
        return {"replaced": rank}


def _app(args: Namespace | None, *, run_init_state: bool = True) -> tuple[FastAPI, RecordingRecovery]:
    app = FastAPI()
    plugin = ElasticFTEndpoints()
    plugin.attach_router(app)
    if run_init_state:
        # engine_client=None: init_state stores the key check, then stops (no engine to follow).
        asyncio.run(plugin.init_state(None, app.state, args))
    group = FrontEndGroup(None, 4, 8, ElasticFTConfig(), registry=CollectorRegistry())
    recovery = RecordingRecovery()
    group.attach_recovery(recovery)
    app.state.elastic_ft = group
    app.state.engine_client = HealthyEngine()
    return app, recovery


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)


@pytest.fixture
def keyed():
    app, recovery = _app(Namespace(api_key=[KEY, OTHER_KEY]))
    return TestClient(app), recovery


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ the API key


def test_without_key_status_and_replace_are_401(keyed):
    client, recovery = keyed
    status = client.get("/elastic_ft/status")
    assert status.status_code == 401 and status.json() == UNAUTHORIZED
    replace = client.post("/elastic_ft/replace", json={"rank": 2})
    assert replace.status_code == 401 and replace.json() == UNAUTHORIZED
    assert recovery.calls == []  # nothing was started


def test_wrong_key_or_scheme_is_401(keyed):
    client, recovery = keyed
    for headers in (_bearer("wrong"), _bearer(KEY + "x"), _bearer(KEY[:-1]), _bearer(""),
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY},
                    {"X-Api-Key": KEY}):
        assert client.get("/elastic_ft/status", headers=headers).status_code == 401, headers
        answer = client.post("/elastic_ft/replace", json={"rank": 2}, headers=headers)
        assert answer.status_code == 401 and answer.json() == UNAUTHORIZED, headers
    assert recovery.calls == []


def test_right_key_gets_the_normal_answers(keyed):
    client, recovery = keyed
    status = client.get("/elastic_ft/status", headers=_bearer(KEY))
    assert status.status_code == 200 and status.json()["state"] == "HEALTHY"
    # Any of several --api-key values, as vLLM accepts; the scheme is case-insensitive there too.
    other = client.get("/elastic_ft/status", headers={"Authorization": f"bearer {OTHER_KEY}"})
    assert other.status_code == 200 and other.json()["state"] == "HEALTHY"
    replace = client.post("/elastic_ft/replace", json={"rank": 2}, headers=_bearer(KEY))
    assert replace.status_code == 200 and replace.json() == {"replaced": 2}
    assert recovery.calls == [2]


def test_health_stays_open_with_a_key(keyed):
    client, _ = keyed
    assert client.get("/health").status_code == 200


def test_the_key_is_checked_before_the_body(keyed):
    client, recovery = keyed
    answer = client.post("/elastic_ft/replace", content=b"not json")
    assert answer.status_code == 401 and answer.json() == UNAUTHORIZED
    assert recovery.calls == []


def test_no_key_configured_leaves_the_routes_open():
    app, recovery = _app(Namespace(api_key=None))
    client = TestClient(app)
    assert client.get("/elastic_ft/status").json()["state"] == "HEALTHY"
    assert client.post("/elastic_ft/replace", json={"rank": 2}).status_code == 200
    assert recovery.calls == [2]


def test_vllm_api_key_env_is_the_key_without_api_key_flag(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    client = TestClient(_app(Namespace(api_key=None))[0])
    assert client.get("/elastic_ft/status").status_code == 401
    assert client.get("/elastic_ft/status", headers=_bearer("from-env")).status_code == 200


def test_api_key_flag_takes_precedence_over_the_env(monkeypatch):
    # vLLM: `args.api_key or [VLLM_API_KEY]`: with --api-key the env key is not accepted.
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    client = TestClient(_app(Namespace(api_key=[KEY]))[0])
    assert client.get("/elastic_ft/status", headers=_bearer("from-env")).status_code == 401
    assert client.get("/elastic_ft/status", headers=_bearer(KEY)).status_code == 200


def test_key_from_app_args_when_init_state_did_not_run():
    # vLLM's build_app puts the args on app.state before the plugin's init_state runs:
    # the routes are never open on a keyed server for want of the plugin's own state.
    app, recovery = _app(None, run_init_state=False)
    app.state.args = Namespace(api_key=[KEY])
    client = TestClient(app)
    assert client.post("/elastic_ft/replace", json={"rank": 2}).status_code == 401
    assert client.get("/elastic_ft/status", headers=_bearer(KEY)).status_code == 200
    assert recovery.calls == []


def test_same_answers_as_vllms_own_check_on_v1():
    """Whatever vLLM's AuthenticationMiddleware answers on /v1, ours answers on /elastic_ft."""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    app, _ = _app(Namespace(api_key=[KEY, OTHER_KEY]))

    @app.get("/v1/probe")
    async def probe() -> dict:
        return {"state": "HEALTHY"}

    # As vLLM's init_entrypoints_middleware adds it (after the plugin's routes and middleware).
    app.add_middleware(AuthenticationMiddleware, tokens=[KEY, OTHER_KEY])
    client = TestClient(app)
    cases = [{}, _bearer(KEY), _bearer(OTHER_KEY), {"Authorization": f"BEARER {KEY}"},
             _bearer("wrong"), _bearer(f" {KEY}"), {"Authorization": f"Bearer{KEY}"},
             {"Authorization": f"Basic {KEY}"}, {"Authorization": ""}]
    seen = set()
    for headers in cases:
        for method in ("GET", "OPTIONS"):
            theirs = client.request(method, "/v1/probe", headers=headers)
            ours = client.request(method, "/elastic_ft/status", headers=headers)
            assert ours.status_code == theirs.status_code, (method, headers)
            if theirs.status_code in (200, 401):
                assert ours.json().get("error") == theirs.json().get("error"), (method, headers)
            seen.add(theirs.status_code)
    assert {200, 401} <= seen  # both outcomes were compared


def test_api_tokens_is_vllms_expression(monkeypatch):
    assert api_key.api_tokens(Namespace(api_key=[KEY, "", OTHER_KEY])) == [KEY, OTHER_KEY]
    assert api_key.api_tokens(Namespace(api_key=None)) == []
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert api_key.api_tokens(Namespace(api_key=None)) == []
    assert api_key.check_for(Namespace(api_key=[])) is None


# --------------------------------------------------------- the replace body


BAD_BODIES = {
    "not JSON": b"rank=2",
    "empty": b"",
    "not UTF-8": b"\xff\xfe",
    "array": b"[2]",
    "number": b"2",
    "null": b"null",
    "string": b'"2"',
    "missing rank": b"{}",
    "rank true": b'{"rank": true}',
    "rank false": b'{"rank": false}',
    "rank float": b'{"rank": 2.0}',
    "rank string": b'{"rank": "2"}',
    "rank negative": b'{"rank": -1}',
    "rank null": b'{"rank": null}',
    "rank array": b'{"rank": [2]}',
    "rank object": b'{"rank": {"value": 2}}',
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_replace_body_is_400_naming_rank(keyed, name):
    client, recovery = keyed
    answer = client.post("/elastic_ft/replace", content=BAD_BODIES[name],
                         headers={**_bearer(KEY), "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "'rank'" in error and '{"rank": <int >= 0>}' in error, error
    assert recovery.calls == []  # bool True is not rank 1: nothing was started


def test_unknown_keys_are_400_naming_them(keyed):
    client, recovery = keyed
    answer = client.post("/elastic_ft/replace", json={"rank": 2, "force": True, "dry": 1},
                         headers=_bearer(KEY))
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "'dry'" in error and "'force'" in error and "'rank'" in error, error
    assert recovery.calls == []


def test_rank_zero_and_a_real_int_are_accepted(keyed):
    client, recovery = keyed
    recovery.lost = {0, 2}
    for rank in (0, 2):
        answer = client.post("/elastic_ft/replace", content=json.dumps({"rank": rank}),
                             headers=_bearer(KEY))
        assert answer.status_code == 200 and answer.json() == {"replaced": rank}
    assert recovery.calls == [0, 2] and all(type(r) is int for r in recovery.calls)
