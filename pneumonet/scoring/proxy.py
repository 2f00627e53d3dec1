"""Ray Serve's HTTP proxy, made to answer every request: 503 + Retry-After when no replica did.

The proxy sends its own 503 for backpressure, but when the replica holding a request dies (OOM
kill, lost node, forced restart) it sends nothing and uvicorn answers a bare 500: a server fault,
to a client that only has to try again. This middleware, around the proxy, turns "no response at
all" into 503 with ``Retry-After``; every response a replica or the proxy did start is passed on
untouched. Every Ray node's environment installs it (``SERVE_ENV`` in :mod:`pneumonet.scoring.cluster`):
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pneumonet.scoring.proxy:middlewares``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pneumonet.config import ServeConfig

log = logging.getLogger(__name__)

# The proxy serves every application and knows no app config: the default of serve.retry_after_s.
RETRY_AFTER_S = ServeConfig.model_fields["retry_after_s"].default


class AnswerUnanswered:
    """Pure ASGI middleware: a request the wrapped app returned from without a response gets 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            log.warning("no response for %s %s (%s); answering 503", scope.get("method"), scope.get("path"), exc)
        if not started:
            await _send_503(send)


async def _send_503(send: Send) -> None:
    body = json.dumps({"error": "the replica handling this request stopped before answering; retry"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(RETRY_AFTER_S).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Any]:
    """The proxy callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``."""
    return [Middleware(AnswerUnanswered)]
