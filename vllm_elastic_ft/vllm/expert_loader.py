"""Give a surviving vLLM worker the experts of a lost rank, read from the checkpoint.

After a shrink, every logical expert must still have a live replica. The
placement solver names the orphaned experts each survivor takes; this module
loads exactly those (no other weight is touched) into each MoE layer of the
running model:

1. read ``<layer>.<e>.{gate,up,down}`` weights from the checkpoint's
   safetensors files (the two naming conventions of vLLM's MoE checkpoints:
   ``gate_proj/up_proj/down_proj`` — Qwen, DeepSeek — and ``w1/w3/w2`` —
   Mixtral, PhiMoE);
2. lay them out as the layer's kernel expects (``w13 = [gate; up]``, the
   intermediate dim zero-padded to the kernel's alignment, then the CPU kernel's
   prepack — prepacking works per expert, so new experts are packed alone and
   appended);
3. append them to ``w13_weight``/``w2_weight`` and point the layer's expert map
   at the new local slots (``RoutedExperts.update_expert_map_info``), which the
   next forward reads.

When a rejoined rank takes its experts back, the survivor unmaps them but keeps
their weights in their slots ("parked"): a later loss of the same rank maps them
again without reading the checkpoint, and no expert ever gets a second slot. A
survivor's MoE weights are thus bounded by one copy of every expert, however
many faults come (issue 12: memory flat over fault + replace cycles). Freeing
parked slots would mean repacking the layer's weights while it serves, for at
most the experts a DP=1 copy holds.

Targets vLLM 0.32.0's ``RoutedExperts`` / ``ExpertMapManager`` and
``CPUUnquantizedExperts`` (unquantized CPU MoE). Quantized or zentorch layers
are refused with a clear error rather than loaded wrong.
"""

from __future__ import annotations

import glob
import os
import weakref
from dataclasses import dataclass, field

import torch

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

#: (gate, up, down) weight names of one expert, per checkpoint convention.
EXPERT_WEIGHT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


#: MoE layer -> {global expert id: the local slot still holding its weights, unmapped}.
_PARKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ExpertLoadError(RuntimeError):
    """An orphaned expert could not be loaded (missing weights, unsupported layer)."""


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's routed-expert modules (vLLM's ``RoutedExperts``), in model order."""
    return [m for m in model.modules()
            if hasattr(m, "expert_map_manager") and hasattr(m, "w13_weight")
            and hasattr(m, "layer_name")]


def local_experts(layer: torch.nn.Module) -> list[int]:
    """Global ids of the experts ``layer`` computes on this rank."""
    expert_map = layer.expert_map_manager.expert_map
    if expert_map is None:
        return list(range(layer.expert_map_manager.global_num_experts))
    return torch.where(expert_map != -1)[0].tolist()


@dataclass
class CheckpointIndex:
    """Which safetensors file holds which tensor, for a local checkpoint directory."""

    directory: str
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, directory: str) -> CheckpointIndex:
        from safetensors import safe_open

        paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not paths:
            raise ExpertLoadError(f"no *.safetensors files in {directory!r}: cannot load orphaned "
                                  "experts (a local checkpoint directory is needed)")
        index = cls(directory)
        for path in paths:
            with safe_open(path, framework="pt") as f:
                index.files.update({name: path for name in f.keys()})
        return index

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(path, framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in wanted})
        return out


def _expert_names(index: CheckpointIndex, layer_name: str, expert: int) -> tuple[str, str, str]:
    for gate, up, down in EXPERT_WEIGHT_NAMES:
        names = tuple(f"{layer_name}.{expert}.{n}.weight" for n in (gate, up, down))
        if all(n in index.files for n in names):
            return names  # type: ignore[return-value]
    raise ExpertLoadError(
        f"{layer_name}: expert {expert} not found in the checkpoint under any of "
        f"{[c for c in EXPERT_WEIGHT_NAMES]} (fused or renamed expert weights are not supported)")


def _kernel_of(layer: torch.nn.Module):
    kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is None or not hasattr(experts, "isa"):
        raise ExpertLoadError(f"{layer.layer_name}: not an unquantized CPU MoE layer "
                              f"({type(experts).__name__}); orphan loading supports those only")
    if getattr(experts, "_use_zentorch", False):
        raise ExpertLoadError(f"{layer.layer_name}: zentorch MoE layers are not supported")
    return experts


def parked_experts(layer: torch.nn.Module) -> dict[int, int]:
    """Experts ``layer`` stopped computing whose weights it keeps: global id -> slot."""
    return dict(_PARKED.get(layer, {}))


def load_experts(layer: torch.nn.Module, experts: list[int], index: CheckpointIndex) -> None:
    """Map ``experts`` (global ids not computed yet) on ``layer``: parked ones back to their
    slots, the others appended from the checkpoint."""
    if not experts:
        return
    parked = _PARKED.get(layer, {})
    remapped = [e for e in experts if e in parked]
    if remapped:
        manager = layer.expert_map_manager
        manager._expert_map[torch.tensor(remapped)] = torch.tensor(
            [parked.pop(e) for e in remapped], dtype=manager._expert_map.dtype)
        if manager._expert_mask is not None:
            manager._expert_mask[torch.tensor(remapped)] = 1
        layer.update_expert_map_info()
    _append_experts(layer, [e for e in experts if e not in remapped], index)


def _append_experts(layer: torch.nn.Module, experts: list[int], index: CheckpointIndex) -> None:
    """Append ``experts`` to ``layer``'s weights from the checkpoint and map them there."""
    if not experts:
        return
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.utils import replace_parameter

    kernel = _kernel_of(layer)
    names = [_expert_names(index, layer.layer_name, e) for e in experts]
    weights = index.read([n for triple in names for n in triple])
    dtype = layer.w13_weight.dtype
    padded = kernel._padded_intermediate_size(kernel.moe_config)
    w13_rows, w2_rows = [], []
    for gate_name, up_name, down_name in names:
        gate, up, down = weights[gate_name], weights[up_name], weights[down_name]
        inter, hidden = gate.shape
        w13 = torch.zeros(2 * padded, hidden, dtype=dtype)
        w13[:inter] = gate
        w13[padded:padded + inter] = up
        w2 = torch.zeros(hidden, padded, dtype=dtype)
        w2[:, :inter] = down
        w13_rows.append(w13)
        w2_rows.append(w2)
    new13 = cpu_prepack_moe_weight(torch.stack(w13_rows), kernel.isa)
    new2 = cpu_prepack_moe_weight(torch.stack(w2_rows), kernel.isa)
    first_slot = layer.w13_weight.shape[0]
    replace_parameter(layer, "w13_weight", torch.cat([layer.w13_weight.data, new13]))
    replace_parameter(layer, "w2_weight", torch.cat([layer.w2_weight.data, new2]))
    manager = layer.expert_map_manager
    manager._expert_map[torch.tensor(experts)] = torch.arange(
        first_slot, first_slot + len(experts), dtype=manager._expert_map.dtype)
    if manager._expert_mask is not None:
        manager._expert_mask[torch.tensor(experts)] = 1
    manager._local_num_experts = first_slot + len(experts)
    layer.update_expert_map_info()
    layer.moe_config.num_local_experts = manager._local_num_experts


def unmap_experts(model: torch.nn.Module, experts: list[int]) -> None:
    """Stop computing ``experts`` on this rank (a rejoined rank computes them again).

    Their weights stay in their slots, parked: a later shrink that needs them
    again maps them back there (see the module docstring).
    """
    if not experts:
        return
    ids = torch.tensor(experts)
    for layer in moe_layers(model):
        manager = layer.expert_map_manager
        if manager._expert_map is None:
            continue
        parked = _PARKED.setdefault(layer, {})
        for expert in experts:
            slot = int(manager._expert_map[expert])
            if slot != -1:
                parked[expert] = slot
        manager._expert_map[ids] = -1
        if manager._expert_mask is not None:
            manager._expert_mask[ids] = 0
        layer.update_expert_map_info()
    logger.warning("stopped computing experts %s (a rejoined rank computes them)", experts)


def load_orphans(model: torch.nn.Module, experts: list[int], checkpoint_dir: str) -> int:
    """Load ``experts`` into every MoE layer of ``model``; returns the parameters added."""
    if not experts:
        return 0
    index = CheckpointIndex.scan(checkpoint_dir)
    layers = moe_layers(model)
    before = sum(l.w13_weight.numel() + l.w2_weight.numel() for l in layers)
    for layer in layers:
        load_experts(layer, [e for e in experts if e not in local_experts(layer)], index)
    added = sum(l.w13_weight.numel() + l.w2_weight.numel() for l in layers) - before
    logger.warning("loaded orphaned experts %s into %d MoE layers from %s (+%d parameters)",
                   experts, len(layers), checkpoint_dir, added)
    return added
