"""Issue 12: what a surviving rank keeps per fault + replace cycle stays bounded.

``benchmarks/harness_soak.py`` (real gloo ranks, SIGKILL + replacement each
cycle) found the per-process histories as the only Python-level growth of a
survivor: the controller's events (about 8 per cycle) and the watchdog sink's
fault reports (one per fault), both kept for the life of the process. They
keep the newest ones now; totals still count every one. The last test runs
real gloo communicators, epoch after epoch, in two real processes: a retired
communicator's threads and sockets are given back once it is released.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.state_machine import (
    ControllerOptions, JoinRequested, PeerFenced, RebuildDone, RebuildStarted, Served,
)
from vllm_elastic_ft.testing.harness import RankGroup
from vllm_elastic_ft.watchdog.report import FaultKind, FaultReport, LogAndCountSink

CYCLES = 200  # fault + replace cycles: far more events and reports than either keeps


def _cycle(c: GroupController, epoch: int) -> int:
    """One cycle as a survivor of a 2-rank group sees it: rank 1 dies, is replaced."""
    c.fault({"epoch": epoch, "suspects": [1], "kind": "dead", "reporter": 0})
    c.handle(RebuildStarted(epoch + 1))
    c.handle(RebuildDone(epoch + 1, (0,)))
    c.handle(Served(epoch + 1))
    c.handle(JoinRequested(1))
    c.handle(PeerFenced(epoch + 2))
    c.handle(RebuildStarted(epoch + 2))
    c.handle(RebuildDone(epoch + 2, (0, 1)))
    c.handle(Served(epoch + 2))
    return epoch + 2


def test_controller_keeps_only_the_newest_events_over_many_cycles():
    c = GroupController("g", 2, ControllerOptions(min_live_ranks=1), rank=0)
    epoch, sizes = 0, []
    for _ in range(CYCLES):
        epoch = _cycle(c, epoch)
        sizes.append(len(c.events))
    assert c.view.state.value == "HEALTHY" and c.view.epoch == epoch == 2 * CYCLES
    assert c.view.live_ranks == (0, 1)
    assert sizes[-1] == sizes[CYCLES // 2], f"flat once full, not {sizes[::40]}"
    assert max(sizes) == len(c.events) == GroupController.max_events
    # The newest are kept, in order, ending with this cycle's return to HEALTHY.
    assert c.events[-1]["epoch"] == epoch and c.events[-1]["state"] == "HEALTHY"
    epochs = [e["epoch"] for e in c.events]
    assert epochs == sorted(epochs) and epochs[0] > 0, "the oldest ones were dropped"


def _report(i: int) -> FaultReport:
    return FaultReport(group="g", epoch=i, reporter=0, suspects=(1,), kind=FaultKind.DEAD,
                       trigger="liveness", reason="rank(s) [1] dead", detected_at=float(i),
                       evidence={"1": "process gone"})


def test_sink_keeps_only_the_newest_reports_and_counts_every_one():
    sink = LogAndCountSink()
    held = []
    for i in range(CYCLES * 2):
        sink.publish(_report(i))
        held.append(len(sink.reports))
    assert held[-1] == held[3 * CYCLES // 2], f"flat once full, not {held[::80]}"
    assert max(held) == len(sink.reports) == LogAndCountSink.max_reports
    assert sink.total == CYCLES * 2 and sink.counts["dead"] == CYCLES * 2
    assert [r.epoch for r in sink.reports] == list(range(CYCLES * 2 - sink.max_reports,
                                                         CYCLES * 2)), "the newest, in order"


def test_a_reader_iterating_the_reports_is_not_shifted_by_a_publish():
    sink = LogAndCountSink()
    for i in range(sink.max_reports):
        sink.publish(_report(i))
    seen = []
    for r in sink.reports:  # as the recovery core's thread does while the watcher publishes
        seen.append(r.epoch)
        if r.epoch == 10:
            sink.publish(_report(10_000))
    assert seen[:sink.max_reports] == list(range(sink.max_reports)), "no report skipped"


# ---------------------------------------------------------------- real processes
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _epochs_rank(rank: int, world: int, store_address: str, epochs: int) -> dict:
    """Build ``epochs`` communicators one after the other, as a survivor's rebuilds do."""
    import torch

    from vllm_elastic_ft.comm.elastic_group import ElasticProcessGroup
    from vllm_elastic_ft.comm.store import connect_store

    group = ElasticProcessGroup(connect_store(store_address), timedelta(seconds=30))
    retire_s = 3.0  # each communicator's timeout: released at the first abort after it

    def epoch(e: int) -> None:
        pg = group.configure(f"bounds/{e}", rank, world, timedelta(seconds=retire_s))
        t = torch.ones(16)
        pg.allreduce([t]).wait()
        assert float(t[0]) == world

    epoch(0)
    base = {"threads": _threads(), "fds": _open_fds()}
    for e in range(1, epochs):
        epoch(e)
    piled = {"threads": _threads(), "fds": _open_fds(), "retired": len(group._retired)}
    time.sleep(retire_s + 0.5)  # every retired communicator's timeout has passed
    epoch(epochs)
    after = {"threads": _threads(), "fds": _open_fds(), "retired": len(group._retired)}
    group.shutdown()
    return {"base": base, "piled": piled, "after": after}


def test_retired_gloo_communicators_give_their_threads_and_sockets_back():
    epochs = 12
    with RankGroup(_epochs_rank, 2, epochs) as group:
        results = group.results(timeout_s=120)
    for rank, r in results.items():
        base, piled, after = r["base"], r["piled"], r["after"]
        # While their timeouts run, the retired ones are kept (a collective may still wait).
        assert piled["retired"] >= 1 and piled["threads"] > base["threads"], r
        # Then only the newest retired one is left: threads and fds are back at the
        # current communicator's plus that one's (what each retired one held).
        assert after["retired"] == 1, r
        for what in ("threads", "fds"):
            each = -(-(piled[what] - base[what]) // piled["retired"])  # ceil
            assert after[what] <= base[what] + each + 1, (what, r)
