"""What every request passes before the routes: the API key, the body-size limit, and a last-resort 500.

A pure ASGI middleware, not Starlette's `@app.middleware("http")`: that wrapper hides the client's
disconnect from the route, so a non-streamed request whose client went away would run on.
"""

from __future__ import annotations

import hmac
import json
import logging

from kvloom.integrations.openai.protocol import error_body

logger = logging.getLogger("kvloom.integrations.openai")

# Paths anyone may call even when an API key is set: liveness probes and the version.
PUBLIC_PATHS = frozenset({"/health", "/version", "/ping"})


class GuardMiddleware:
    """Refuses a request without the API key (401) or with a body over max_body_bytes (413); turns an
    unexpected exception into a 500 in OpenAI's shape."""

    def __init__(
        self, app, api_key: str | list[str] | None, max_body_bytes: int, public_paths: frozenset[str] = PUBLIC_PATHS
    ):
        self.app = app
        # Several keys (vLLM's `--api-key K1 K2`, for rotation): any one of them is accepted.
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        self.expected = [b"Bearer " + k.encode() for k in keys if k] or None
        self.max_body_bytes = max_body_bytes
        self.public_paths = public_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        # Behind --root-path the server sees the proxy's prefix in front of the app's own paths.
        path, root = scope["path"], scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if self.expected is not None and path not in self.public_paths:
            given = headers.get(b"authorization", b"")
            # Every key is compared (a list, not any() of a generator), so the time says nothing about which matched.
            if not any([hmac.compare_digest(given, key) for key in self.expected]):
                return await _reply(send, 401, "invalid or missing API key", "AuthenticationError")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reply(send, 413, self._too_large(), "RequestTooLarge")
        limit, seen, too_large = self.max_body_bytes, 0, False

        async def counting_receive():
            # Past the limit the app is told the client left, and its answer is replaced by a 413.
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def guarded_send(message):
            nonlocal started
            if not too_large:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception as exc:
            if too_large:
                pass
            elif started:
                raise
            else:
                # The engine failed on this request (others go on): a 500 in OpenAI's shape, not plain text.
                logger.error("%s %s failed: %s: %s", scope.get("method"), scope["path"], type(exc).__name__, exc)
                return await _reply(send, 500, f"{type(exc).__name__}: {exc}", "InternalServerError")
        if too_large:
            await _reply(send, 413, self._too_large(), "RequestTooLarge")

    def _too_large(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_body_bytes} bytes"


async def _reply(send, status: int, message: str, err_type: str) -> None:
    body = json.dumps(error_body(message, status, err_type)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
