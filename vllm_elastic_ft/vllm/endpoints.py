"""What a load balancer and an operator read: ``/elastic_ft/status``, ``/health``, ``/metrics``.

A ``vllm.endpoint_plugins`` entry point (vLLM 0.32's own hook for plugin
routes; it loads when ``VLLM_PLUGINS`` names ``elastic_ft``). In the API
server it follows the DP group through the watchdog store
(``group/store_follower.py``) and:

* ``GET /elastic_ft/status``: state, epoch, live ranks, expert placement
  summary, last FaultReport, settings;
* ``GET /health``: 503 while the group is not serving (FENCED, REBUILDING,
  FAILED), otherwise vLLM's own check (200, or 503 on a dead engine) — stock
  ``/health`` says 200 for a group that is fenced;
* ``/metrics``: ``elastic_ft_*`` gauges, counters and histograms beside vLLM's;
* new inference requests get a retriable 503 (``Retry-After``) while the group
  is not serving.

On a server started with ``--api-key`` (or ``VLLM_API_KEY``) every
``/elastic_ft/...`` route needs the key, as ``/v1/...`` does
(``Authorization: Bearer <key>``; 401 ``{"error": "Unauthorized"}`` without it;
``vllm/api_key.py``): vLLM guards only its own prefixes, and
``POST /elastic_ft/replace`` starts processes. ``/health`` stays open for load
balancers, as in vLLM.
"""

from __future__ import annotations

import json
from argparse import Namespace
from typing import Any

# Module level: FastAPI resolves the (postponed) annotations of route handlers
# in this module's globals.
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.hooks import LoggingHook
from vllm_elastic_ft.group.state_machine import GroupState, GroupView
from vllm_elastic_ft.group.store_follower import StoreFollower
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.placement.solver import contiguous
from vllm_elastic_ft.vllm import api_key

logger = get_logger(__name__)

GROUP_NAME = "dp"

#: How long a replacement engine may take to load and warm up (a large model: minutes).
REPLACEMENT_START_TIMEOUT_S = 900.0

#: Paths of requests that would run on the group (refused while it is fenced).
INFERENCE_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/responses",
                      "/v1/embeddings", "/inference/")


class GroupMetrics:
    """Prometheus series of one group, fed by controller transitions (a hook)."""

    def __init__(self, registry=None):
        import prometheus_client as prom

        kw = {"registry": registry} if registry is not None else {}
        self.state = prom.Gauge("elastic_ft_group_state", "1 for the group's current state",
                                ["group", "state"], **kw)
        self.epoch = prom.Gauge("elastic_ft_group_epoch", "The group's epoch (fencing token)",
                                ["group"], **kw)
        self.live = prom.Gauge("elastic_ft_live_ranks", "Live ranks of the group", ["group"], **kw)
        self.faults = prom.Counter("elastic_ft_faults", "Faults that fenced the group",
                                   ["group", "kind"], **kw)
        self.recoveries = prom.Counter("elastic_ft_recoveries", "In-engine rebuilds completed",
                                       ["group"], **kw)
        self.detection = prom.Histogram("elastic_ft_detection_seconds",
                                        "FaultReport to fence, as seen by the front end",
                                        ["group"], **kw)
        self.recovery = prom.Histogram("elastic_ft_recovery_seconds", "Fence to READY",
                                       ["group"], **kw)

    def show(self, view: GroupView) -> None:
        for state in GroupState:
            self.state.labels(view.group, state.value).set(1 if view.state is state else 0)
        self.epoch.labels(view.group).set(view.epoch)
        self.live.labels(view.group).set(len(view.live_ranks))


class MetricsHook(LoggingHook):
    """The orchestration hook of the front end: log, and count."""

    def __init__(self, metrics: GroupMetrics):
        self.metrics = metrics
        self._fenced_at: float | None = None
        #: Called with the view whenever a new epoch's members are known (READY).
        self.on_members = None

    def on_fenced(self, view: GroupView, report: dict | None) -> None:
        super().on_fenced(view, report)
        self.metrics.show(view)
        self.metrics.faults.labels(view.group, report["kind"] if report else "peer").inc()
        if report and "detected_at" in report:
            self.metrics.detection.labels(view.group).observe(max(0.0, view.since - report["detected_at"]))
        self._fenced_at = view.since

    def on_ready(self, view: GroupView) -> None:
        super().on_ready(view)
        if self.on_members is not None:
            self.on_members(view)
        self.metrics.show(view)
        self.metrics.recoveries.labels(view.group).inc()
        if self._fenced_at is not None:
            self.metrics.recovery.labels(view.group).observe(view.since - self._fenced_at)

    def on_failed(self, view: GroupView, reason: str) -> None:
        super().on_failed(view, reason)
        self.metrics.show(view)


class FrontEndGroup:
    """The front end's view of its DP group: controller, follower, metrics."""

    def __init__(self, store, world_size: int, num_experts: int | None, config: ElasticFTConfig,
                 registry=None, poll_s: float = 0.05):
        self.config = config
        self.num_experts = num_experts
        self.metrics = GroupMetrics(registry)
        self.metrics_hook = MetricsHook(self.metrics)
        self.controller = GroupController(GROUP_NAME, world_size, config.controller_options(),
                                          hook=self.metrics_hook)
        self.metrics.show(self.controller.view)
        self.follower = StoreFollower(store, self.controller, poll_s) if store is not None else None

        self.recovery = None
        #: Multi-node head only: marks this node's exited ranks for the other nodes.
        self.head_liveness = None
        self.store_address: str | None = None

    def attach_recovery(self, recovery) -> None:
        """Let the in-engine recovery hear which ranks each new epoch leaves out."""
        self.recovery = recovery
        recovery.group_view = lambda: self.controller.view
        self.metrics_hook.on_members = lambda view: recovery.exclude(
            [r for r in range(view.world_size) if r not in view.live_ranks],
            f"not a member of epoch {view.epoch}")

    def out_of_service(self) -> bool:
        """Whether the group turns traffic away: fenced, rebuilding or failed — not while a
        replacement rank is being admitted (a planned pause: vLLM queues the requests)."""
        admitting = self.recovery is not None and self.recovery.admitting
        return not self.controller.view.serving and not admitting

    def _placement(self) -> dict[str, list[int]] | None:
        view = self.controller.view
        if view.epoch == 0:
            if not self.num_experts:
                return None
            placement = contiguous(self.num_experts, list(view.live_ranks))
        else:
            members = epochs.published(self.follower.store, GROUP_NAME, view.epoch) \
                if self.follower else None
            if members is None:
                return None
            placement = members.placement
        return {str(r): list(e) for r, e in placement.items()}

    def status(self) -> dict[str, Any]:
        status = self.controller.status()
        status["expert_placement"] = self._placement()
        if self.recovery is not None:
            status["recovery"] = self.recovery.status()
        # Never the store's locator: its secret is what keeps outsiders out of the
        # group's state (comm/store.py), and its address is of no use to a client.
        status["watchdog"] = {"deadline_s": self.config.deadline_s,
                              "heartbeat_interval_s": self.config.heartbeat_interval_s}
        status["events"] = self.controller.events[-20:]
        return status


#: What ``POST /elastic_ft/replace`` accepts, for its 400 answers.
REPLACE_BODY = 'a JSON object {"rank": <int >= 0>}, the lost DP rank to replace'


def parse_replace_body(raw: bytes) -> int | str:
    """The rank of a ``POST /elastic_ft/replace`` body, or the 400 message saying what is wrong.

    Strict, because the route starts processes: ``true`` is not rank 1 (bool is an int
    in Python), ``1.0`` and ``"1"`` are not ranks, and an unknown key is an error
    rather than ignored (a typo such as ``{"rank": 1, "force": true}`` must not pass
    silently as something it is not).
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        return f"field 'rank': the body is not JSON ({err}); expected {REPLACE_BODY}"
    if not isinstance(body, dict):
        return f"field 'rank': the body is a JSON {_json_type(body)}; expected {REPLACE_BODY}"
    extra = sorted(set(body) - {"rank"})
    if extra:
        return (f"unknown field(s) {', '.join(repr(k) for k in extra)}: "
                f"field 'rank' only; expected {REPLACE_BODY}")
    if "rank" not in body:
        return f"field 'rank' is missing; expected {REPLACE_BODY}"
    rank = body["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int):
        shown = json.dumps(rank)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return (f"field 'rank': {shown} is a JSON {_json_type(rank)}, "
                f"not an integer; expected {REPLACE_BODY}")
    if rank < 0:
        return f"field 'rank': {rank} is negative; expected {REPLACE_BODY}"
    return rank


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (for messages a client reads)."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}[type(value)]


class ElasticFTEndpoints:
    """The ``vllm.endpoint_plugins`` factory (instantiated once per API server)."""

    name = "elastic_ft"
    required_tasks = None

    def attach_router(self, app) -> None:
        router = APIRouter()

        @router.get("/elastic_ft/status")
        async def elastic_ft_status(request: Request) -> JSONResponse:
            group: FrontEndGroup | None = getattr(request.app.state, "elastic_ft", None)
            if group is None:
                return JSONResponse({"state": "DISABLED", "reason": "no DP group to follow"})
            return JSONResponse(group.status())

        @router.get("/health", response_class=Response)
        async def health(request: Request) -> Response:
            group: FrontEndGroup | None = getattr(request.app.state, "elastic_ft", None)
            if group is not None and group.out_of_service():
                return Response(status_code=503, headers={"X-Elastic-FT-State":
                                                          group.controller.view.state.value})
            client = getattr(request.app.state, "engine_client", None)
            if client is None:
                return Response(status_code=200)
            from vllm.v1.engine.exceptions import EngineDeadError

            try:
                await client.check_health()
            except EngineDeadError:
                return Response(status_code=503)
            return Response(status_code=200)

        @router.post("/elastic_ft/replace")
        async def elastic_ft_replace(request: Request) -> JSONResponse:
            group: FrontEndGroup | None = getattr(request.app.state, "elastic_ft", None)
            recovery = group.recovery if group is not None else None
            if recovery is None:
                return JSONResponse({"error": "in-engine rebuild is not on in this server"},
                                    status_code=400)
            rank = parse_replace_body(await request.body())
            if isinstance(rank, str):
                return JSONResponse({"error": f"{rank} (lost: {sorted(recovery.lost)})"},
                                    status_code=400)
            try:
                result = await recovery.replace(rank, REPLACEMENT_START_TIMEOUT_S,
                                                group.config.rebuild_budget_s)
            except ValueError as err:
                return JSONResponse({"error": str(err)}, status_code=409)
            except Exception as err:  # the group goes on without the replacement
                logger.exception("vllm-elastic-ft: replacing DP rank %d failed", rank)
                return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)
            return JSONResponse(result)

        app.include_router(router)
        # vLLM's --api-key guards only /v1, /v2, /inference, /cohere: the same check on
        # /elastic_ft (the key is known in init_state, after this; read per request).
        app.add_middleware(api_key.ElasticFTAuthMiddleware, state=app.state)

        @app.middleware("http")
        async def refuse_while_fenced(request: Request, call_next):
            # No half-alive group ever serves: while fenced or rebuilding, new
            # inference requests get a fast, retriable 503 (an ingress or a load
            # balancer retries them on another group). Requests already
            # accepted are not touched.
            group: FrontEndGroup | None = getattr(request.app.state, "elastic_ft", None)
            if (group is not None and group.out_of_service()
                    and request.url.path.startswith(INFERENCE_PREFIXES)):
                view = group.controller.view
                return JSONResponse(
                    {"error": {"message": f"DP group {view.group} is {view.state.value} "
                                          f"(epoch {view.epoch}): retry on another replica",
                               "type": "elastic_ft_group_not_serving", "code": 503}},
                    status_code=503,
                    headers={"Retry-After": "1", "X-Elastic-FT-State": view.state.value})
            return await call_next(request)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        # First, before any early return: the routes exist on every server, the engine-less
        # render server included, so each one needs the key its server was started with.
        setattr(state, api_key.STATE_ATTR, api_key.check_for(args))
        if getattr(state, api_key.STATE_ATTR) is not None:
            logger.info("vllm-elastic-ft: /elastic_ft/* routes require the server's API key")
        if engine_client is None:
            return
        vllm_config = engine_client.vllm_config
        config = ElasticFTConfig.from_additional_config(vllm_config.additional_config)
        world = vllm_config.parallel_config.data_parallel_size
        if not (config.enabled and config.watchdog) or world < 2:
            return
        from vllm_elastic_ft.comm.store import connect_store, without_secret
        from vllm_elastic_ft.vllm.watchdog_store import store_address

        address = store_address()
        store = connect_store(address) if address else None
        hf = vllm_config.model_config.hf_config
        experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
        state.elastic_ft = FrontEndGroup(store, world, experts, config)
        state.elastic_ft.store_address = address
        if config.in_engine_rebuild and store is not None:
            from vllm_elastic_ft.vllm.frontend_recovery import install

            recovery = install(config.min_live_ranks)
            recovery.bind_llm(engine_client)
            state.elastic_ft.attach_recovery(recovery)
        if state.elastic_ft.follower is not None:
            state.elastic_ft.follower.start()
        if config.in_engine_rebuild and store is not None:
            from vllm_elastic_ft.vllm.node_agent import watch_head_ranks

            # Multi-node: the other nodes' ranks cannot probe this node's pids.
            state.elastic_ft.head_liveness = watch_head_ranks(store, GROUP_NAME, vllm_config)
        logger.info("vllm-elastic-ft: following DP group %s (%d ranks) through %s",
                    GROUP_NAME, world, without_secret(address) if address else None)
