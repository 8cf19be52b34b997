"""attribute(): dead, hung and slow told apart from heartbeats, with the clock passed in."""

import os
import signal
import subprocess
import sys
import time

import pytest

from vllm_elastic_ft.watchdog.attribution import (
    RankStatus, attribute, probe_process, silent_members,
)
from vllm_elastic_ft.watchdog.report import FaultKind

NOW = 1000.0
KW = dict(stale_s=2.0, hung_s=0.2)


def _st(rank, age=0.05, entered=10, finished=10, state="running", host="h"):
    return RankStatus(rank, 100 + rank, host, NOW - age, entered, finished, state)


def _all(**over):
    statuses = {r: _st(r) for r in range(4)}
    statuses.update(over)
    return statuses


def test_healthy_group_has_no_verdict():
    assert attribute(NOW, 0, _all(), {}, {}, **KW) is None


def test_gone_process_is_dead_at_once():
    v = attribute(NOW, 0, _all(), {2: "gone"}, {}, **KW)
    assert v.suspects == (2,) and v.kind is FaultKind.DEAD and "gone" in v.evidence[2]


def test_stopped_process_is_hung_once_its_heartbeat_lags():
    statuses = _all()
    statuses[1] = _st(1, age=0.1)
    assert attribute(NOW, 0, statuses, {1: "stopped"}, {}, **KW) is None  # a blip
    statuses[1] = _st(1, age=0.3)
    v = attribute(NOW, 0, statuses, {1: "stopped"}, {}, **KW)
    assert v.suspects == (1,) and v.kind is FaultKind.HUNG


def test_stale_heartbeat_elsewhere_is_dead_with_closed_socket_else_hung():
    statuses = _all()
    statuses[3] = _st(3, age=2.5)
    assert attribute(NOW, 0, statuses, {}, {}, peer_closed=True, **KW).kind is FaultKind.DEAD
    assert attribute(NOW, 0, statuses, {}, {}, **KW).kind is FaultKind.HUNG


def test_dead_outranks_hung():
    v = attribute(NOW, 0, _all(), {1: "stopped", 2: "gone"}, {}, **{**KW, "hung_s": -1})
    assert v.kind is FaultKind.DEAD and v.suspects == (2,) and set(v.evidence) == {1, 2}


def test_left_rank_is_not_a_fault():
    statuses = _all()
    statuses[2] = _st(2, age=99, state="left")
    assert attribute(NOW, 0, statuses, {2: "gone"}, {}, **KW) is None


def test_deadline_miss_names_the_live_rank_behind_as_slow():
    statuses = _all()
    statuses[0] = _st(0, entered=11, finished=10)
    statuses[2] = _st(2, entered=10, finished=10)  # never entered seq 11
    for r in (1, 3):
        statuses[r] = _st(r, entered=11, finished=10)
    progressing = {2: NOW - 0.5}
    v = attribute(NOW, 0, statuses, {}, progressing, waiting_seq=11, deadline_s=1.0, **KW)
    assert v.suspects == (2,) and v.kind is FaultKind.SLOW
    assert "entered seq 10 < 11" in v.evidence[2]
    statuses[2] = _st(2, age=2.5, entered=10, finished=10)  # ...unless it stopped beating
    v = attribute(NOW, 0, statuses, {}, progressing, waiting_seq=11, deadline_s=1.0, **KW)
    assert v.suspects == (2,) and v.kind is FaultKind.HUNG


def test_deadline_miss_with_every_peer_ahead_blames_this_rank():
    statuses = {r: _st(r, entered=11, finished=10) for r in range(4)}
    v = attribute(NOW, 1, statuses, {}, {}, waiting_seq=11, deadline_s=1.0, **KW)
    assert v.suspects == (1,) and v.kind is FaultKind.SLOW


def test_a_member_silent_in_a_rebuilt_epoch_is_named_dead_after_the_limit():
    # Rank 3 agreed on the epoch, then died before its first heartbeat in it.
    statuses = {r: _st(r) for r in range(3)}
    assert silent_members(NOW, 0, 4, statuses, epoch_began=NOW - 1.0, limit_s=2.0) is None
    v = silent_members(NOW, 0, 4, statuses, epoch_began=NOW - 2.5, limit_s=2.0)
    assert v.suspects == (3,) and v.kind is FaultKind.DEAD and "no heartbeat" in v.evidence[3]
    # Everyone heard from (this rank's own heartbeat need not be read back): nothing.
    assert silent_members(NOW, 3, 4, statuses, epoch_began=NOW - 9.0, limit_s=2.0) is None


def test_probe_process_sees_alive_stopped_and_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert probe_process(proc.pid) == "alive"
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.1)
        assert probe_process(proc.pid) == "stopped"
        os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
        assert probe_process(proc.pid) == "gone"  # a zombie until reaped
    finally:
        proc.kill()
        proc.wait()
    assert probe_process(proc.pid) == "gone"


def test_a_rank_in_another_pid_namespace_is_never_probed_in_our_proc():
    """Issue 13: nodes (containers, the simulated nodes of the tests) can share a host name
    across PID namespaces, where a pid number is another process or none: such a peer is
    judged by its heartbeat (``unknown``), never by our /proc."""
    import shutil
    import subprocess
    import sys

    from vllm_elastic_ft.watchdog.attribution import RankStatus, local_probe, this_host

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this machine")
    code = ("from vllm_elastic_ft.watchdog.attribution import RankStatus, this_host\n"
            "import os, time\n"
            "print(RankStatus(1, os.getpid(), this_host(), time.time(), 0, 0).encode().decode())")
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                           code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {proc.stderr.strip()[-200:]}")
    remote = RankStatus.decode(proc.stdout.strip().splitlines()[-1].encode())
    assert remote.pid == 1, "its pid is 1 in its namespace: in ours, that is init"
    assert remote.host != this_host()
    assert local_probe(remote) == "unknown"
