"""vLLM's ``--api-key`` on the plugin's own routes (``/elastic_ft/...``).

vLLM 0.32 enforces the key in ``AuthenticationMiddleware``
(``vllm/entrypoints/serve/middleware/authenticate.py``), and only on paths that
start with ``/v1``, ``/v2``, ``/inference`` or ``/cohere``. Left alone, the
plugin's ``/elastic_ft/status`` and ``POST /elastic_ft/replace`` (which starts
engine processes) would answer anyone on a server started with ``--api-key``.
:class:`ElasticFTAuthMiddleware` applies vLLM's rule to ``/elastic_ft``: the
same keys (``--api-key``, possibly several, else ``VLLM_API_KEY``), the same
header (``Authorization: Bearer <key>``), vLLM's own constant-time comparison
(``AuthenticationMiddleware.verify_token``), the same 401 body
(``{"error": "Unauthorized"}``), ``OPTIONS`` let through (CORS preflight) as
vLLM does. ``/health`` is not under the prefix: load balancers probe it without
a key, as with stock vLLM.
"""

from __future__ import annotations

from argparse import Namespace

from starlette.datastructures import Headers, State
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Paths that need the key when the server has one (vLLM's rule: a plain prefix match).
GUARDED_PREFIX = "/elastic_ft"

#: Where ``init_state`` leaves the check on ``app.state``: an :class:`ApiKeyCheck`, or None
#: when the server has no key (then nothing is checked, as in vLLM).
STATE_ATTR = "elastic_ft_api_key"


def api_tokens(args: Namespace | None) -> list[str]:
    """The keys the server requires, [] for none.

    The same expression as vLLM's ``init_entrypoints_middleware``
    (``vllm/entrypoints/serve/middleware/register.py``): ``--api-key`` (a list)
    takes precedence over ``VLLM_API_KEY``; empty strings are no key.
    """
    from vllm import envs

    keys = getattr(args, "api_key", None) if args is not None else None
    return [key for key in (keys or [envs.VLLM_API_KEY]) if key]


class ApiKeyCheck:
    """vLLM's bearer-token check for one set of keys.

    It wraps vLLM's own ``AuthenticationMiddleware`` only for its
    ``verify_token`` (keys hashed once, ``secrets.compare_digest`` against
    each): whatever vLLM accepts on ``/v1``, this accepts, and nothing else.
    """

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("ApiKeyCheck needs at least one key")
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        self._vllm = AuthenticationMiddleware(app=None, tokens=tokens)  # type: ignore[arg-type]

    def allows(self, headers: Headers) -> bool:
        return self._vllm.verify_token(headers)


def check_for(args: Namespace | None) -> ApiKeyCheck | None:
    """The check for a server started with ``args``; None when it has no key."""
    tokens = api_tokens(args)
    return ApiKeyCheck(tokens) if tokens else None


def _check_of(state: State) -> ApiKeyCheck | None:
    """The check ``init_state`` stored; if it never ran, the one of the args vLLM's
    ``build_app`` put on ``app.state`` — never open just because the plugin's state
    is missing on a server that has a key."""
    if hasattr(state, STATE_ATTR):
        return getattr(state, STATE_ATTR)
    check = check_for(getattr(state, "args", None))
    setattr(state, STATE_ATTR, check)
    return check


class ElasticFTAuthMiddleware:
    """Pure ASGI middleware: ``/elastic_ft...`` needs the server's API key, when it has one.

    Added in ``attach_router`` (during ``build_app``, before vLLM adds its own
    middleware, so vLLM's CORS middleware stays outside it); the check is read
    from ``app.state`` per request because ``init_state`` runs after the
    middleware stack is declared.
    """

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        #: The FastAPI app's state (given here, not taken from the request's scope, so that
        #: no request finds the routes open for want of it).
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        # As vLLM: the path as routed, without the server's --root-path.
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path.startswith(GUARDED_PREFIX):
            check = _check_of(self.state)
            if check is not None and not check.allows(Headers(scope=scope)):
                response = JSONResponse(content={"error": "Unauthorized"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
