"""The expert placement solver: a pure function, tested without processes.

Given the current placement (rank -> experts it holds, redundant replicas
allowed) and the ranks that are live at the new epoch, :func:`solve` returns a
placement in which every logical expert has at least one live replica:

1. survivors keep every expert they hold (no weight moves, no reload);
2. an expert whose replicas all sat on lost ranks is *orphaned*; if a live
   rank already holds a replica, nothing is loaded (redundancy pays off);
3. each remaining orphan is loaded by the live rank with the fewest experts
   (ties: lowest rank), from the checkpoint;
4. a new rank (rejoin) with no experts takes an even share from the most
   loaded ranks, which may then drop those experts (``to_drop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlacementPlan:
    placement: dict[int, tuple[int, ...]]  # live rank -> experts held afterwards
    to_load: dict[int, tuple[int, ...]] = field(default_factory=dict)  # from the checkpoint / a peer
    to_drop: dict[int, tuple[int, ...]] = field(default_factory=dict)
    reason: str = ""

    def owner_of(self, expert: int) -> int:
        """The rank that computes ``expert`` (the lowest live rank holding a replica)."""
        return min(r for r, experts in self.placement.items() if expert in experts)

    def expert_map(self, rank: int, num_experts: int) -> list[int]:
        """vLLM-style map: global expert -> local slot on ``rank`` if it computes it, else -1.

        With replicas, only the owner computes an expert, so the combine (a sum
        over ranks) counts every expert once.
        """
        mine = [e for e in self.placement[rank] if self.owner_of(e) == rank]
        slots = {e: i for i, e in enumerate(self.placement[rank])}
        return [slots[e] if e in mine else -1 for e in range(num_experts)]


def contiguous(num_experts: int, ranks: list[int]) -> dict[int, tuple[int, ...]]:
    """vLLM's default EP layout: rank i of n holds a contiguous block of experts."""
    n = len(ranks)
    base, extra = divmod(num_experts, n)
    placement, start = {}, 0
    for i, rank in enumerate(ranks):
        size = base + (1 if i < extra else 0)
        placement[rank] = tuple(range(start, start + size))
        start += size
    return placement


def solve(num_experts: int, current: dict[int, tuple[int, ...]], live: list[int]) -> PlacementPlan:
    """The placement over ``live`` ranks that keeps every expert served (see module doc)."""
    if not live:
        raise ValueError("no live rank to place experts on")
    placement = {r: list(current.get(r, ())) for r in sorted(live)}
    held = {e for experts in placement.values() for e in experts}
    orphans = [e for e in range(num_experts) if e not in held]
    to_load: dict[int, list[int]] = {}
    newcomers = [r for r in placement if not placement[r]]
    # Orphans first go to newcomers (they have room), then to the least loaded.
    for expert in orphans:
        pool = newcomers or list(placement)
        rank = min(pool, key=lambda r: (len(placement[r]), r))
        placement[rank].append(expert)
        to_load.setdefault(rank, []).append(expert)
        if newcomers and len(placement[rank]) >= num_experts // len(placement):
            newcomers.remove(rank)
    # A newcomer still under its share takes experts from the most loaded ranks.
    to_drop: dict[int, list[int]] = {}
    share = num_experts // len(placement)
    for rank in newcomers:
        while len(placement[rank]) < share:
            donor = max(placement, key=lambda r: (len(placement[r]), -r))
            if len(placement[donor]) <= share:
                break
            expert = placement[donor].pop()
            to_drop.setdefault(donor, []).append(expert)
            placement[rank].append(expert)
            to_load.setdefault(rank, []).append(expert)
    lost = sorted(set(current) - set(live))
    reason = (f"live {sorted(live)}, lost {lost}: {len(orphans)} orphaned expert(s) "
              f"{orphans} loaded; {sum(len(v) for v in to_drop.values())} moved to newcomers")
    return PlacementPlan(
        {r: tuple(sorted(v)) for r, v in placement.items()},
        {r: tuple(sorted(v)) for r, v in to_load.items()},
        {r: tuple(sorted(v)) for r, v in to_drop.items()},
        reason,
    )


def admit(current: dict[int, tuple[int, ...]], members: list[int], joiner: int,
          joiner_experts: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """The placement after ``joiner`` rejoins, bringing ``joiner_experts`` (already loaded).

    The joiner computes the experts it brought; the ranks that took them over
    during the shrink stop computing them (their weights stay loaded, unmapped,
    so the combine's sum counts every expert once). If the joiner did not make
    it into ``members``, the placement stays as it was.
    """
    if joiner not in members:
        return {r: tuple(current.get(r, ())) for r in members}
    brought = set(joiner_experts)
    placement = {r: tuple(e for e in current.get(r, ()) if e not in brought)
                 for r in members if r != joiner}
    placement[joiner] = tuple(sorted(brought))
    return placement
