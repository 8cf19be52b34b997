"""Control-plane ranks without a model: the product's watchdog, fencing and agreement, many times.

What ``benchmarks/control_plane_scale.py`` runs in each process. A *control-plane
rank* is the product's own objects for one rank, nothing else: a ``RankWatchdog``
(heartbeats, peer checks, verdicts), a ``GroupMember`` (fence, agreement,
reconfigure, READY, from the watchdog's thread as an idle engine does) and an
``ExpertHolder`` that only keeps the expert ids it is given. There is no model
and, by default, no communicator (:class:`NullTransport`: the data path is not
what this measures); ``transport="gloo"`` builds the real gloo communicator of
every epoch instead, so fence -> READY includes its rendezvous (one rank per
process only: its constructor is a rendezvous of every rank; its store requests
are not counted, a c10d ``PrefixStore`` cannot wrap a Python client).

A process hosts one rank (a *real* rank) or several (*emulated* ranks: threads
sharing one interpreter, to reach widths the machine has no cores for). Ranks
are grouped into virtual hosts (``ranks_per_host``): a rank probes ``/proc``
only for peers on its own virtual host and judges the others by heartbeat
staleness, as on a cluster of that many ranks per machine.

Every rank's store client is a :class:`CountingStore`: requests (round trips)
and keys per method, in a shared array the benchmark reads, plus the times of
this rank's heartbeats, fences and member publications.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.comm.transport import GlooTransport, RecoveryTier
from vllm_elastic_ft.group.member import GroupMember, MemberOptions
from vllm_elastic_ft.group.state_machine import ControllerOptions
from vllm_elastic_ft.watchdog.attribution import probe_process
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import LogAndCountSink

#: Store methods counted per rank, in this order (``other``: anything else).
METHODS = ("set", "get", "check", "multi_get", "compare_set", "add", "delete_key", "multi_set",
           "other")
#: Per rank and method: requests, keys named.
COUNTERS = 2
#: How often a rank process looks at its flags (kill, stop), in seconds.
SAMPLE_S = 0.02


def counter_slots(ranks: int) -> int:
    """The size of the shared counter array for ``ranks`` ranks."""
    return ranks * len(METHODS) * COUNTERS


def totals(counts, ranks) -> dict[str, int]:
    """Requests and keys over ``ranks``, in total and per method."""
    out = {"requests": 0, "keys": 0}
    for r in ranks:
        base = r * len(METHODS) * COUNTERS
        for i, name in enumerate(METHODS):
            req, nkeys = counts[base + i * COUNTERS], counts[base + i * COUNTERS + 1]
            out["requests"] += req
            out["keys"] += nkeys
            out[f"{name}_requests"] = out.get(f"{name}_requests", 0) + req
    return out


class CountingStore:
    """A store client that counts its requests and the keys they name (slot ``rank``).

    Also keeps the wall-clock times of this rank's heartbeat writes, and of every
    ``compare_set`` that moved the group's epoch or published an epoch's members.
    """

    def __init__(self, store, counts, rank: int, group: str):
        self._store = store
        self._counts = counts
        self._base = rank * len(METHODS) * COUNTERS
        self._lock = threading.Lock()  # the watcher and the rebuild thread share the client
        self._epoch_key = keys.epoch(group)
        self._hb_part = f"/hb/{rank}"
        self.heartbeats: list[float] = []
        self.fences: list[tuple[float, int]] = []  # (time, epoch the compare_set left)
        self.publications: list[tuple[float, str]] = []  # (time, members key)

    def _count(self, method: int, nkeys: int) -> None:
        i = self._base + method * COUNTERS
        with self._lock:
            self._counts[i] += 1
            self._counts[i + 1] += nkeys

    def set(self, key, value):
        self._count(0, 1)
        out = self._store.set(key, value)
        if key.endswith(self._hb_part):
            self.heartbeats.append(time.time())
        return out

    def get(self, key):
        self._count(1, 1)
        return self._store.get(key)

    def check(self, keys_):
        self._count(2, len(keys_))
        return self._store.check(keys_)

    def multi_get(self, keys_):
        self._count(3, len(keys_))
        return self._store.multi_get(keys_)

    def compare_set(self, key, expected, desired):
        self._count(4, 1)
        out = self._store.compare_set(key, expected, desired)
        if key == self._epoch_key:
            try:
                self.fences.append((time.time(), int(out)))
            except ValueError:
                pass
        elif key.endswith("/members") and desired:
            self.publications.append((time.time(), key))
        return out

    def add(self, key, value):
        self._count(5, 1)
        return self._store.add(key, value)

    def delete_key(self, key):
        self._count(6, 1)
        return self._store.delete_key(key)

    def multi_set(self, keys_, values):
        self._count(7, len(keys_))
        return self._store.multi_set(keys_, values)

    def __getattr__(self, name):  # everything else (PrefixStore of a communicator, timeouts)
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self._count(8, 1)
            return attr(*args, **kwargs)
        return counted


class NullTransport:
    """A transport with no data path: ``configure`` records the epoch and returns.

    What a control-plane benchmark puts where a communicator would be, so that
    fence -> READY measures the watchdog, fencing and agreement alone. Its tier
    is the in-place rebuild (the core then runs the whole recovery sequence).
    """

    name = "null"
    recovery_tier = RecoveryTier.REBUILD_IN_PLACE

    def __init__(self):
        self.configured: list[tuple[int, int, int]] = []

    def configure(self, epoch: int, rank: int, world_size: int) -> None:
        self.configured.append((epoch, rank, world_size))

    def abort(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def all_reduce(self, tensor, timeout, cancelled) -> None:
        raise NotImplementedError("a control-plane rank runs no collective")

    def dispatch(self, tensors, sizes, timeout, cancelled):
        raise NotImplementedError("a control-plane rank runs no collective")

    def combine(self, tensor, sizes, timeout, cancelled):
        raise NotImplementedError("a control-plane rank runs no collective")

    def silent_ranks(self) -> list[int]:
        return []


class KeptExperts:
    """An ``ExpertHolder`` that holds expert ids only (no weights)."""

    def __init__(self, held: tuple[int, ...]):
        self.experts = tuple(held)

    def held(self) -> tuple[int, ...]:
        return self.experts

    def adopt(self, old: tuple[int, ...], new: tuple[int, ...]) -> list[int]:
        loaded = [e for e in new if e not in self.experts]
        self.experts = tuple(new)
        return loaded


@dataclass(frozen=True)
class ControlPlaneSpec:
    world: int
    settings: WatchdogSettings = field(default_factory=WatchdogSettings)
    group: str = "cp"
    experts: int = 256
    ranks_per_host: int = 8  # 0: every rank on this machine's own host name
    join_window_s: float = 3.0
    report_wait_s: float = 1.0
    options: ControllerOptions = field(default_factory=ControllerOptions)
    transport: str = "null"  # or "gloo"
    max_life_s: float = 900.0  # a rank process never outlives this
    log_level: int = logging.ERROR

    def host_of(self, rank: int) -> str | None:
        if not self.ranks_per_host:
            return None
        return f"{os.uname().nodename}/vhost{rank // self.ranks_per_host}"


def contiguous_experts(experts: int, world: int, rank: int) -> tuple[int, ...]:
    per, extra = divmod(experts, world)
    start = rank * per + min(rank, extra)
    return tuple(range(start, start + per + (rank < extra)))


class ControlPlaneRank:
    """One rank: the product's watchdog and recovery core on a counting store client."""

    def __init__(self, rank: int, spec: ControlPlaneSpec, store_address: str, counts,
                 client=None):
        self.id = rank
        self.spec = spec
        client = client or connect_store(store_address)
        self.store = CountingStore(client, counts, rank, spec.group)
        self.sink = LogAndCountSink()
        self.watchdog = RankWatchdog(spec.settings, self.store, spec.group, rank, spec.world,
                                     sink=self.sink, host=spec.host_of(rank))
        if spec.transport == "gloo":  # (gloo's rendezvous needs a c10d store: not counted)
            self.transport = GlooTransport(client, spec.group, timedelta(seconds=120),
                                           rebuilt_timeout=timedelta(
                                               seconds=spec.options.rebuild_budget_s))
        else:
            self.transport = NullTransport()
        options = MemberOptions(True, spec.join_window_s, spec.report_wait_s, spec.options)
        self.member = GroupMember(rank, spec.world, self.store, self.watchdog, self.transport,
                                  options, spec.group)
        self.member.attach_experts(
            KeptExperts(contiguous_experts(spec.experts, spec.world, rank)), spec.experts)
        self.fence_seen_at: float | None = None
        self.killed_at: float | None = None
        # When this rank's watchdog first read a fenced epoch: right after that tick, on the
        # watcher's thread, before the core's own after-tick step (no polling thread).
        member_step = self.watchdog.after_tick

        def after_tick() -> None:
            if self.fence_seen_at is None and self.watchdog.group_epoch > 0:
                self.fence_seen_at = time.time()
            member_step()
        self.watchdog.after_tick = after_tick

    def kill(self) -> None:
        """Stop as a process on another host that stopped: no last heartbeat, no goodbye."""
        self.watchdog.shutdown(clean=False)
        self.killed_at = time.time()

    def result(self) -> dict:
        return {
            "rank": self.id,
            "killed_at": self.killed_at,
            "fence_seen_at": self.fence_seen_at,
            "epoch": self.member.epoch,
            "members": list(self.member.live),
            "reports": [asdict(r) | {"kind": r.kind.value} for r in self.sink.reports],
            "events": self.member.controller.events,
            "heartbeats": self.store.heartbeats,
            "fences": self.store.fences,
            "publications": self.store.publications,
            "tick_errors": self.watchdog.tick_errors,
            "tick_errors_by_kind": dict(self.watchdog.tick_errors_by_kind),
        }


def run_ranks_process(ranks: list[int], spec: ControlPlaneSpec, store_address: str, counts,
                      kill_flags, up, stop, results, owner: int) -> None:
    """A process of the benchmark: ``ranks`` control-plane ranks until ``stop`` is set.

    ``kill_flags[r]`` set: rank ``r`` stops at once (an emulated rank's death).
    ``up[r]`` is set once rank ``r`` is constructed. ``stop[0]`` set: report and
    leave (a flag in shared memory, not an ``Event``: setting an ``Event`` some
    SIGKILLed process waited on blocks forever). Results go to ``results``
    (pickled list, one dict per rank); then the process leaves without tearing
    anything down (a peer may be dead). It also leaves, at once, when process
    ``owner`` (the benchmark) is gone: never a stray.
    """
    logging.getLogger("vllm.elastic_ft").setLevel(spec.log_level)
    started = time.monotonic()
    looked = 0.0
    members: list[ControlPlaneRank] = []
    error = None
    try:
        # Every client first: a connect can take seconds (the store's accept backlog when
        # many ranks connect at once) and holds the interpreter's lock meanwhile, which
        # would starve the watchers of this process's ranks already up.
        clients = [connect_store(store_address) for _ in ranks]
        for r, client in zip(ranks, clients):
            members.append(ControlPlaneRank(r, spec, store_address, counts, client))
            up[r] = 1
        while not stop[0]:
            now = time.time()
            if now - looked > 0.5:
                looked = now
                if _gone(owner) or time.monotonic() - started > spec.max_life_s:
                    os._exit(3)
            for m in members:
                if kill_flags[m.id] and m.killed_at is None:
                    m.kill()
            time.sleep(SAMPLE_S)
    except BaseException as err:  # noqa: BLE001 - reported to the benchmark
        error = f"{type(err).__name__}: {err}"
    results.put(pickle.dumps({"ranks": ranks, "pid": os.getpid(), "error": error,
                              "results": [m.result() for m in members]}))
    results.close()
    results.join_thread()
    os._exit(0)


def _gone(pid: int) -> bool:
    return probe_process(pid) == "gone"


def host_store(conn, owner: int) -> None:
    """The store's own process (as the front end hosts it): a TCPStore server, until told
    (or until process ``owner`` is gone)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    conn.send(store.port)
    while not conn.poll(0.5):
        if _gone(owner):
            os._exit(3)
    conn.recv()
    os._exit(0)
