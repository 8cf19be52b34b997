"""The registry of private attributes of vLLM (and other libraries) that the plugin touches.

``patching.PatchSpec`` records what the plugin *replaces*; this module records
what it merely *reads, writes or calls* outside any patch: a private attribute
of a vLLM object (``manager._expert_map``), a private module function or global
(``parallel_state._DP``), a name from a private module (``vllm._custom_ops``).
None of them is vLLM API, so each can change in any release: every one is
listed here with the reason the plugin needs it and the vLLM versions it was
checked against. ``tests/test_private_access.py`` scans the package and fails
on a private name that is in neither registry, and checks that every vLLM
target below exists in the installed vLLM; ``vllm-elastic-ft patches``
(``compat.py``) checks them against another vLLM source tree.

``THIRD_PARTY`` lists the private names of torch, Ray and the standard library
that the plugin uses; the scan requires them to be listed, the vLLM checks
ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, SUPPORTED_VLLM_VERSIONS, PatchSpec

#: The ways the plugin touches a private attribute.
ACCESS_KINDS = ("read", "write", "call")

_LOADER = "vllm_elastic_ft/vllm/expert_loader.py"
_CPU_MOE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts"
_MAP_MANAGER = "vllm.model_executor.layers.fused_moe.expert_map_manager:ExpertMapManager"


@dataclass(frozen=True)
class PrivateAccess:
    """One private attribute the plugin touches without patching it.

    Attributes:
        target: ``module:Class._attr`` (an attribute or method of a class; an
            attribute set as ``self._attr = ...`` in the class counts), or
            ``module:_name`` (a module-level private function or global), or
            ``_private.module:name`` (a public name of a private module).
        access: ``"read"``, ``"write"`` (assigned, or mutated in place) or
            ``"call"``.
        why: what the plugin needs it for, and why no public API serves.
        used_in: the package file(s) that touch it, repository-relative;
            several are separated by ``", "``.
        vllm_versions: vLLM releases the access was checked against.
    """

    target: str
    access: str
    why: str
    used_in: str
    vllm_versions: tuple[str, ...] = SUPPORTED_VLLM_VERSIONS

    def __post_init__(self) -> None:
        if self.access not in ACCESS_KINDS:
            raise ValueError(f"{self.target}: access {self.access!r} not in {ACCESS_KINDS}")
        if ":" not in self.target:
            raise ValueError(f"{self.target}: target must be 'module:qualname'")

    @property
    def module(self) -> str:
        """The dotted module that holds the target."""
        return self.target.partition(":")[0]

    @property
    def attribute(self) -> str:
        """The last component of the target: the name the plugin's code spells."""
        return self.target.partition(":")[2].rpartition(".")[2]

    @property
    def files(self) -> tuple[str, ...]:
        """``used_in`` split into its files."""
        return tuple(part.strip() for part in self.used_in.split(",") if part.strip())


ENTRIES: tuple[PrivateAccess, ...] = (
    PrivateAccess(
        target="vllm.distributed.parallel_state:_DP",
        access="read",
        why="A replacement worker re-ranks vLLM's DP coordinator (a group of one) as its "
        "logical DP rank; get_dp_group() asserts instead of returning None when unset.",
        used_in="vllm_elastic_ft/vllm/replacement.py",
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target="vllm.distributed.parallel_state:_EP",
        access="read",
        why="The same for the EP coordinator, which the model reads its EP rank from and "
        "whose all2all manager the MoE layers use; get_ep_group() asserts when unset.",
        used_in="vllm_elastic_ft/vllm/replacement.py",
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target="vllm.v1.engine.core_client:AsyncMPClient._call_utility_async",
        access="call",
        why="Call a utility on one chosen engine (prepare a joiner, admit it) or on the "
        "live engines only; the public call_utility_async always asks the first engine.",
        used_in="vllm_elastic_ft/vllm/frontend_recovery.py, "
        "vllm_elastic_ft/vllm/patches/api_server/request_routing.py",
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target=f"{_CPU_MOE}._padded_intermediate_size",
        access="call",
        why="Experts loaded for a lost rank must be padded exactly as vLLM padded the "
        "experts it loaded itself; the padding rule has no public accessor.",
        used_in=_LOADER,
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target=f"{_CPU_MOE}._use_zentorch",
        access="read",
        why="Refuse to load orphan experts into a zentorch MoE layer (its weights are "
        "laid out differently); the flag is only kept privately.",
        used_in=_LOADER,
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target=f"{_MAP_MANAGER}._expert_map",
        access="write",
        why="Map orphan experts to the slots appended for them, and unmap experts a "
        "rejoined rank computes again; ExpertMapManager only computes the map once.",
        used_in=_LOADER,
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target=f"{_MAP_MANAGER}._expert_mask",
        access="write",
        why="Keep the expert mask (ROCm AITER) consistent with the edited expert map.",
        used_in=_LOADER,
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target=f"{_MAP_MANAGER}._local_num_experts",
        access="write",
        why="The layer holds more local experts after orphans are appended; the public "
        "local_num_experts is a read-only property over this attribute.",
        used_in=_LOADER,
        vllm_versions=CHECKED_WITH_0_33,
    ),
    PrivateAccess(
        target="vllm._custom_ops:cpu_prepack_moe_weight",
        access="call",
        why="Pack orphan experts' weights in the CPU MoE kernel's layout, as vLLM packs "
        "the experts it loads (the op is exposed only by the private _custom_ops module).",
        used_in=_LOADER,
        vllm_versions=CHECKED_WITH_0_33,
    ),
)

_RAY_LLM = "ray.llm._internal.serve"

THIRD_PARTY: tuple[PrivateAccess, ...] = (
    PrivateAccess(
        target="torch.distributed:ProcessGroup._allgather_base",
        access="call",
        why="All-gather on the stateless, epoch-scoped groups a rebuild creates: the "
        "torch.distributed wrappers accept only groups registered with the default group.",
        used_in="vllm_elastic_ft/comm/cpu_collectives.py",
    ),
    PrivateAccess(
        target="ray.experimental.internal_kv:_internal_kv_get",
        access="call",
        why="Replicas and the drill find a gang's watchdog store in Ray's GCS key-value "
        "store; Ray exposes no public cluster-wide key-value API.",
        used_in="vllm_elastic_ft/ray_serve/server.py, vllm_elastic_ft/ray_serve/drill.py",
    ),
    PrivateAccess(
        target="ray.experimental.internal_kv:_internal_kv_put",
        access="call",
        why="A gang's rank 0 publishes its watchdog store address in Ray's GCS store.",
        used_in="vllm_elastic_ft/ray_serve/server.py",
    ),
    PrivateAccess(
        target="ray.experimental.internal_kv:_internal_kv_list",
        access="call",
        why="The drill lists every gang that published a watchdog store.",
        used_in="vllm_elastic_ft/ray_serve/drill.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.serving_patterns.data_parallel.dp_server:DPServer",
        access="read",
        why="ElasticDPServer extends Ray Serve LLM's DP server (no public base class).",
        used_in="vllm_elastic_ft/ray_serve/server.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.engines.vllm.vllm_engine:VLLMEngine._engine_client",
        access="read",
        why="A replica asks its vLLM engine client whether the engine died (client.errored); "
        "Ray's VLLMEngine keeps the client privately.",
        used_in="vllm_elastic_ft/ray_serve/server.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.engines.vllm.vllm_engine:VLLMEngine._start_async_llm_engine",
        access="write",
        why="A replica that rejoins in place builds its new engine client itself (connected to "
        "a replacement engine and the gang's DP coordinator), then runs Ray's own "
        "VLLMEngine.start on it for the OpenAI serving objects; start() has no parameter "
        "for an engine client.",
        used_in="vllm_elastic_ft/ray_serve/server.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.core.server.llm_server:LLMServer._engine_cls",
        access="read",
        why="The rejoining replica makes its new engine with the class Ray chose for it.",
        used_in="vllm_elastic_ft/ray_serve/server.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.core.server.llm_server:LLMServer._llm_config",
        access="read",
        why="The same: the replica's LLMConfig (with its DP rank) for the new engine.",
        used_in="vllm_elastic_ft/ray_serve/server.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.core.configs.openai_api_models:to_model_metadata",
        access="call",
        why="The gang-aware app builds its ingress as Ray's build_openai_app does; the "
        "pieces are only in Ray's private modules.",
        used_in="vllm_elastic_ft/ray_serve/builder.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.core.ingress.ingress:OpenAiIngress",
        access="read",
        why="The same: the ingress deployment class, which ElasticOpenAiIngress extends.",
        used_in="vllm_elastic_ft/ray_serve/builder.py, vllm_elastic_ft/ray_serve/ingress.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.core.ingress.ingress:OpenAiIngress._get_response",
        access="write",
        why="The ingress's one call of the model deployment's handle: overridden so that a "
        "request whose replica process died is sent again or continued on another replica.",
        used_in="vllm_elastic_ft/ray_serve/ingress.py",
    ),
    PrivateAccess(
        target=f"{_RAY_LLM}.core.ingress.ingress:make_fastapi_ingress",
        access="call",
        why="The same: wraps the ingress class into a FastAPI deployment.",
        used_in="vllm_elastic_ft/ray_serve/builder.py",
    ),
    PrivateAccess(
        target="argparse:ArgumentParser._actions",
        access="read",
        why="add_cli_args is patched idempotently: skip adding the elastic-ft options when "
        "the parser already has them (argparse has no public list of its actions).",
        used_in="vllm_elastic_ft/vllm/patches/api_server/engine_args.py",
    ),
    PrivateAccess(
        target="os:_exit",
        access="call",
        why="A test rank process leaves without tearing down process groups whose peers "
        "may be dead (it could block); documented standard-library API.",
        used_in="vllm_elastic_ft/testing/harness.py, vllm_elastic_ft/testing/control_plane.py",
    ),
)

RegistryEntry = PatchSpec | PrivateAccess


def all_entries() -> tuple[RegistryEntry, ...]:
    """Every vLLM symbol the plugin depends on privately: patches, then accesses.

    Returns:
        Each ``PatchSpec`` of every module in ``patches.ALL`` (in that order),
        followed by ``ENTRIES``. ``THIRD_PARTY`` is not included: it names no
        vLLM symbol.
    """
    from vllm_elastic_ft.vllm import patches

    specs = tuple(spec for module in patches.ALL for spec in module.SPECS)
    return specs + ENTRIES
