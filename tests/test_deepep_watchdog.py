"""WatchedDeepEPBuffer against a recording stand-in of deep_ep.Buffer's call signatures.

The real DeepEP cannot run on a CPU machine (benchmarks/deepep_watchdog.py runs
it on a GPU). The stand-in records calls and can stall one, like a buffer whose
peer went silent; the watchdog around it is real (real store, real monitor).
"""

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from vllm_elastic_ft.watchdog.deepep import WatchedDeepEPBuffer
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import LogAndCountSink


class RecordingBuffer:
    """deep_ep.Buffer's methods as vLLM 0.32 calls them; records each call."""

    def __init__(self, rank=0, group_size=2, stall_s=0.0, masked=()):
        self.rank, self.group_size = rank, group_size
        self.capture = object()
        self.calls: list[tuple[str, dict]] = []
        self.stall_s = stall_s
        self.masked = masked

    def _record(self, name, kwargs):
        self.calls.append((name, kwargs))
        time.sleep(self.stall_s)

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        self._record("get_dispatch_layout", dict(num_experts=num_experts))
        return "per_rank", "per_rdma_rank", "per_expert", "in_rank", "event"

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment=1, config=None, previous_event=None,
                 async_finish=False, allocate_on_comm_stream=False):
        self._record("dispatch", dict(x=x, topk_idx=topk_idx))
        return x, topk_idx, topk_weights, [1], "handle", "event"

    def combine(self, x, handle, topk_weights=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        self._record("combine", dict(x=x, handle=handle))
        return x, None, "event"

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             use_fp8=True, async_finish=False, return_recv_hook=False, **kw):
        self.calls.append(("low_latency_dispatch", dict(return_recv_hook=return_recv_hook)))
        return x, [1], "handle", "event", lambda: self._record("ll_dispatch_hook", {})

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, async_finish=False,
                            return_recv_hook=False, **kw):
        self.calls.append(("low_latency_combine", dict(return_recv_hook=return_recv_hook)))
        return x, "event", lambda: self._record("ll_combine_hook", {})

    def low_latency_query_mask_buffer(self, mask):
        for r in self.masked:
            mask[r] = 1


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def _watchdog(store, sink, deadline_s=0.2):
    settings = WatchdogSettings(deadline_s=deadline_s, warmup_calls=0, heartbeat_interval_s=0.02)
    return RankWatchdog(settings, store, "gpu", 0, 2, sink=sink)


def test_calls_are_forwarded_unchanged_and_other_attributes_pass_through(store):
    sink = LogAndCountSink()
    wd = _watchdog(store, sink)
    inner = RecordingBuffer()
    buf = WatchedDeepEPBuffer(inner, wd)
    try:
        assert buf.capture is inner.capture and buf.group_size == 2
        layout = buf.get_dispatch_layout(topk_idx="ids", num_experts=8)
        out = buf.dispatch(x="x", topk_idx="ids", num_tokens_per_rank=layout[0])
        assert out == ("x", "ids", None, [1], "handle", "event")
        assert buf.combine(x="y", handle="handle") == ("y", None, "event")
        assert [c[0] for c in inner.calls] == ["get_dispatch_layout", "dispatch", "combine"]
        assert wd.entered == wd.finished == 2  # dispatch and combine were guarded
    finally:
        wd.shutdown()
    assert sink.reports == []


def test_low_latency_deadline_spans_launch_to_hook(store):
    wd = _watchdog(store, LogAndCountSink())
    inner = RecordingBuffer()
    buf = WatchedDeepEPBuffer(inner, wd)
    try:
        *_, hook = buf.low_latency_dispatch("x", "ids", 128, 8, return_recv_hook=True)
        assert wd.entered == 1 and wd.finished == 0, "armed until the hook has run"
        hook()
        assert wd.finished == 1 and inner.calls[-1][0] == "ll_dispatch_hook"
        buf.low_latency_combine("x", "ids", "w", "handle", return_recv_hook=False)
        assert wd.finished == 2, "without a hook the launch ends the guarded call"
    finally:
        wd.shutdown()


def test_stalled_dispatch_is_reported_with_the_masked_rank(store):
    sink = LogAndCountSink()
    wd = _watchdog(store, sink, deadline_s=0.2)
    peer_status = threading.Event()
    # The peer (rank 1) beats and is alive: only the mask can name it.
    from vllm_elastic_ft.watchdog.attribution import RankStatus

    def beat():
        while not peer_status.is_set():
            store.set("eft/gpu/e0/hb/1", RankStatus(1, 1, "elsewhere", time.time(), 0, 0).encode())
            time.sleep(0.02)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    buf = WatchedDeepEPBuffer(RecordingBuffer(stall_s=0.6, masked=(1,)), wd)
    try:
        start = time.time()
        buf.dispatch(x="x", topk_idx="ids")  # stalls past the 0.2 s deadline
        deadline = time.monotonic() + 2
        while not sink.reports and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        peer_status.set()
        wd.shutdown()
    report = sink.reports[0]
    assert report.suspects == (1,) and report.trigger == "deadline" and report.op == "dispatch"
    assert "mask" in report.reason
    assert report.detected_at - start < 0.6, "seen before the call returned"
