"""The rank watchdog around DeepEP's dispatch and combine (GPU wide-EP).

:class:`WatchedDeepEPBuffer` stands in front of a ``deep_ep.Buffer`` and
forwards every attribute to it unchanged, except the four all-to-all calls,
which it runs inside a watchdog deadline:

* high-throughput ``dispatch`` / ``combine`` block the host until the other
  ranks' counts arrive, so the deadline spans the call itself;
* low-latency ``low_latency_dispatch`` / ``low_latency_combine`` only launch
  kernels and return a receive hook (vLLM asks for one); the deadline spans
  launch to hook completion, which is where a silent peer stalls the host.

DeepEP's own kernel timeout is ~100 s; the watchdog's deadline (seconds) fires
long before. With ``enable_shrink=True`` the low-latency kernels mark a silent
rank in a mask buffer: :meth:`masked_ranks` reads it, and the watchdog uses it
as the suspect list of a missed deadline.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog

#: Buffer methods whose call spans the whole exchange on the host.
BLOCKING_CALLS = ("dispatch", "combine")
#: Buffer methods that return a receive hook as their last result.
HOOKED_CALLS = ("low_latency_dispatch", "low_latency_combine")


class WatchedDeepEPBuffer:
    """A ``deep_ep.Buffer`` whose dispatch/combine run under ``watchdog``."""

    def __init__(self, buffer: Any, watchdog: RankWatchdog):
        self._buffer = buffer
        self._watchdog = watchdog
        if hasattr(buffer, "low_latency_query_mask_buffer"):
            watchdog.miss_suspects = self.masked_ranks

    @property
    def wrapped(self) -> Any:
        return self._buffer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._buffer, name)
        if name in BLOCKING_CALLS:
            return self._blocking(name, attr)
        if name in HOOKED_CALLS:
            return self._hooked(name, attr)
        return attr

    def _blocking(self, op: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def watched(*args: Any, **kwargs: Any) -> Any:
            seq = self._watchdog.begin(op)
            try:
                return call(*args, **kwargs)
            finally:
                self._watchdog.end(seq)

        return watched

    def _hooked(self, op: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def watched(*args: Any, **kwargs: Any) -> Any:
            seq = self._watchdog.begin(op)
            try:
                result = call(*args, **kwargs)
            except BaseException:
                self._watchdog.end(seq)
                raise
            hook = result[-1] if isinstance(result, tuple) and result else None
            if not kwargs.get("return_recv_hook") or not callable(hook):
                self._watchdog.end(seq)  # no hook: the launch is all the host sees
                return result
            return result[:-1] + (self._ending_hook(hook, seq),)

        return watched

    def _ending_hook(self, hook: Callable[[], Any], seq: int) -> Callable[[], Any]:
        def recv_hook() -> Any:
            try:
                return hook()
            finally:
                self._watchdog.end(seq)

        return recv_hook

    def masked_ranks(self) -> list[int]:
        """Ranks the low-latency kernels marked as timed out (``enable_shrink`` only)."""
        from vllm_elastic_ft.comm.deepep_transport import masked_ranks

        return masked_ranks(self._buffer)
