"""How much of a request is left once some of its tokens reached the client: one rule.

A request that was running on a lost rank is continued elsewhere as prompt +
the tokens already generated, with its token budget lowered by as many. The
API server does it at the engine level (``frontend_recovery.py``, on
``SamplingParams``); a Ray Serve replica does it at the OpenAI level
(``ray_serve/continuation.py``, on the request's ``max_tokens``). Both ask
this function, so the two front ends continue a request the same way.
"""

from __future__ import annotations


def remaining_budget(max_tokens: int | None, min_tokens: int | None,
                     generated: int) -> tuple[int | None, int] | None:
    """``(max_tokens, min_tokens)`` of the continuation, or None when nothing is left.

    Args:
        max_tokens: the request's budget (None: up to the model's length).
        min_tokens: the request's minimum (None or 0: none).
        generated: tokens the client already has.
    """
    if max_tokens is not None:
        remaining = max_tokens - generated
        if remaining <= 0:
            return None
    else:
        remaining = None
    return remaining, max(0, (min_tokens or 0) - generated)
