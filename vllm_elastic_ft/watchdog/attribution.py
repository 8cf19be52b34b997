"""Who is at fault, decided from heartbeats: a pure function with the clock passed in.

Every rank publishes a :class:`RankStatus` (pid, host, time, sequence number of
the last dispatch/combine it entered and finished). When something looks wrong
(a peer stopped beating, a call missed its deadline, a collective failed),
:func:`attribute` reads the statuses and names the suspects:

* **dead**: the process is gone (same host: ``/proc`` says so; another node:
  that node's agent marked its status ``gone``), or it stopped beating and the
  collective failed with a closed connection;
* **hung**: the process exists but is stopped (``/proc`` state ``T``), or it
  stopped beating while no connection closed;
* **slow**: it beats, but had not entered the call that missed its deadline.

A status is read from a key any process can write: :meth:`RankStatus.decode`
accepts only a well-formed one and raises ``ValueError`` (with the reason) for
anything else, so the watchdog can set that one peer's value aside instead of
failing in the middle of an attribution.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass, fields

from vllm_elastic_ft.watchdog.report import FaultKind

#: ``/proc/<pid>/stat`` states meaning "will never run again" / "stopped".
_GONE_STATES = {"Z", "X", "x"}
_STOPPED_STATES = {"T", "t"}
#: The ``state`` values under a rank's heartbeat key: it publishes ``running`` and, at a
#: clean shutdown, ``left``; its node's agent writes ``gone`` once the rank's process
#: exited (``vllm/node_agent.py``): the only word on a remote peer's death without ``/proc``.
STATUS_STATES = ("running", "left", "gone")


@dataclass(frozen=True)
class RankStatus:
    """What a rank publishes each heartbeat (JSON under an epoch-scoped key)."""

    rank: int
    pid: int
    host: str
    t: float  # wall-clock time of the heartbeat
    entered: int  # seq of the last dispatch/combine entered
    finished: int  # seq of the last dispatch/combine finished
    state: str = "running"  # "running" or "left" (clean shutdown)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> RankStatus:
        """The status in ``raw``; ``ValueError`` saying why for anything malformed.

        Every field is type-checked here: a wrong type would otherwise fail
        later, inside ``attribute`` (arithmetic on ``t``), or mislead it (a pid
        of 0 probes as "gone", i.e. dead). Unknown fields are ignored (a newer
        rank may publish more).
        """
        try:
            data = json.loads(raw)  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        except RecursionError as err:  # deeply nested garbage: malformed like any other
            raise ValueError(f"status nests too deeply: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"a status is a JSON object, not {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "state"]
        if missing:
            raise ValueError(f"status lacks {missing}")
        for name in ("rank", "pid", "entered", "finished"):
            if type(data[name]) is not int:  # bool is an int subclass: excluded
                raise ValueError(f"status field {name!r} is not an integer: {data[name]!r}")
        if data["rank"] < 0 or data["pid"] <= 0:
            raise ValueError(f"status has rank {data['rank']} / pid {data['pid']}")
        t = data["t"]
        if type(t) not in (int, float) or not math.isfinite(t):
            raise ValueError(f"status field 't' is not a finite number: {t!r}")
        if not isinstance(data["host"], str):
            raise ValueError(f"status field 'host' is not a string: {data['host']!r}")
        if data.get("state", "running") not in STATUS_STATES:
            raise ValueError(f"status field 'state' is not one of {STATUS_STATES}: "
                             f"{data['state']!r}")
        return cls(**{n: data[n] for n in names if n in data})


@dataclass(frozen=True)
class Verdict:
    suspects: tuple[int, ...]
    kind: FaultKind
    reason: str
    evidence: dict


def probe_process(pid: int) -> str:
    """``alive``, ``stopped`` or ``gone`` for a pid on this host."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    except OSError:
        return "alive"
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in _GONE_STATES:
        return "gone"
    return "stopped" if state in _STOPPED_STATES else "alive"


def local_probe(status: RankStatus, host: str | None = None) -> str:
    """Probe ``status``'s process if it runs on this host, else ``unknown``."""
    if status.host != (host or this_host()):
        return "unknown"
    return probe_process(status.pid)


def classify_peer(
    now: float, status: RankStatus, probe: str, last_progress_t: float,
    *, stale_s: float, hung_s: float, peer_closed: bool,
) -> tuple[FaultKind | None, str]:
    """The fault of one peer (or None) and the evidence sentence."""
    age = now - status.t
    if status.state == "left":
        return None, "left cleanly"
    if status.state == "gone":
        return FaultKind.DEAD, f"its node's agent saw process {status.pid} exit"
    if probe == "gone":
        return FaultKind.DEAD, f"process {status.pid} is gone"
    if probe == "stopped" and age > hung_s:
        return FaultKind.HUNG, f"process {status.pid} is stopped, last heartbeat {age:.2f}s ago"
    if age > stale_s:
        if peer_closed:
            return FaultKind.DEAD, f"no heartbeat for {age:.2f}s and its connection closed"
        return FaultKind.HUNG, f"no heartbeat for {age:.2f}s"
    return None, f"heartbeat {age:.2f}s ago, finished seq {status.finished}, progress {now - last_progress_t:.2f}s ago"


def silent_members(now: float, me: int, world_size: int, statuses: dict[int, RankStatus],
                   epoch_began: float, limit_s: float) -> Verdict | None:
    """The members of a rebuilt epoch that have published no heartbeat in it, ``limit_s``
    after this rank moved to it (or None).

    Every member moves its watchdog to the new epoch right after the agreement,
    so its first heartbeat follows within one interval; a member that died
    between the agreement and that heartbeat has no status to classify, and an
    idle group would never name it. (Not for epoch 0: ranks start up at
    different times.)
    """
    waited = now - epoch_began
    if waited <= limit_s:
        return None
    silent = tuple(r for r in range(world_size) if r != me and r not in statuses)
    if not silent:
        return None
    return _named(silent, FaultKind.DEAD,
                  {r: f"no heartbeat in this epoch, {waited:.2f}s after it began" for r in silent})


def _named(suspects: tuple[int, ...], kind: FaultKind, evidence: dict[int, str]) -> Verdict:
    """A verdict naming ``suspects``, its reason listing each one's evidence."""
    return Verdict(suspects, kind, f"rank(s) {list(suspects)} {kind.value}: "
                   + "; ".join(f"{r}: {evidence[r]}" for r in suspects), evidence)


def attribute(
    now: float,
    me: int,
    statuses: dict[int, RankStatus],
    probes: dict[int, str],
    last_progress_t: dict[int, float],
    *,
    stale_s: float,
    hung_s: float,
    peer_closed: bool = False,
    waiting_seq: int | None = None,
    deadline_s: float | None = None,
) -> Verdict | None:
    """Name the faulty peers of rank ``me``, or None if every peer looks healthy.

    Args:
        now: wall-clock time of the check.
        me: the deciding rank.
        statuses: the latest status of every rank that has published one.
        probes: ``probe_process`` results per rank (``unknown`` on another host).
        last_progress_t: per rank, when its finished seq last moved.
        stale_s: a heartbeat older than this means the process does not run.
        hung_s: a stopped process older than this is reported hung.
        peer_closed: the failing collective saw a closed connection.
        waiting_seq: the seq of my call that missed its deadline (deadline and
            collective-error triggers); peers behind it are the suspects when
            no peer is dead or hung.
        deadline_s: that call's deadline (slow versus hung for live peers).
    """
    dead_or_hung: dict[int, tuple[FaultKind, str]] = {}
    healthy: dict[int, str] = {}
    for rank, status in sorted(statuses.items()):
        if rank == me:
            continue
        kind, why = classify_peer(
            now, status, probes.get(rank, "unknown"), last_progress_t.get(rank, status.t),
            stale_s=stale_s, hung_s=hung_s, peer_closed=peer_closed,
        )
        if kind is not None:
            dead_or_hung[rank] = (kind, why)
        else:
            healthy[rank] = why
    if dead_or_hung:
        # Dead outranks hung when both are present: it is the harder fault.
        kind = FaultKind.DEAD if any(k is FaultKind.DEAD for k, _ in dead_or_hung.values()) else FaultKind.HUNG
        suspects = tuple(r for r, (k, _) in dead_or_hung.items() if k is kind)
        return _named(suspects, kind, {r: why for r, (_, why) in dead_or_hung.items()})
    if waiting_seq is None:
        return None
    behind = [r for r, s in sorted(statuses.items()) if r != me and s.entered < waiting_seq]
    if not behind:
        evidence = {me: f"every peer entered seq {waiting_seq}; this rank was late"}
        return Verdict((me,), FaultKind.SLOW, f"rank {me} itself was slow to reach seq {waiting_seq}", evidence)
    # Alive and beating but late to the call: slow. (It becomes hung only by
    # the rules above: its process stops, or its heartbeat does.)
    evidence = {r: f"entered seq {statuses[r].entered} < {waiting_seq} after a "
                   f"{deadline_s}s deadline; {healthy.get(r, '')}" for r in behind}
    return Verdict(tuple(behind), FaultKind.SLOW,
                   f"rank(s) {behind} slow: behind seq {waiting_seq}", evidence)


def this_host() -> str:
    """Where this process's pid means something: the host name and the PID namespace.

    Two ranks may probe each other in ``/proc`` only when both agree. Host names alone
    are not enough: containers (and the simulated nodes of the tests) share a host
    name across PID namespaces, where the same number is another process or none, and
    a live peer would be named dead (issue 13)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:  # no /proc: the host name is all there is
        return socket.gethostname()
    return f"{socket.gethostname()}/{namespace}"


def this_pid() -> int:
    return os.getpid()
