"""Token authentication for the WebSockets, for programs that can set headers on the handshake.

With `Authorization: Bearer <token>` the connection is the token's user (or anonymous for a bad token,
which the consumers close with 4401) and skips the Origin check: that check stops other sites' pages
from riding on a browser's session cookie, and a browser page cannot set this header. Without the
header the connection goes through `otherwise` (the Origin check and the session, as before).
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser

from api.tokens import TokenInvalid, authenticate_token, bearer_token


def _user_of(token: str):
    try:
        return authenticate_token(token).user
    except TokenInvalid:
        return AnonymousUser()


class BearerTokenWebsocketMiddleware:
    def __init__(self, inner, *, otherwise) -> None:
        self.inner = inner
        self.otherwise = otherwise

    async def __call__(self, scope, receive, send):
        header = next((value for name, value in scope.get("headers", []) if name == b"authorization"), None)
        token = bearer_token(header.decode("latin-1")) if header is not None else None
        if token is None:
            return await self.otherwise(scope, receive, send)
        user = await database_sync_to_async(_user_of)(token)
        return await self.inner({**scope, "user": user}, receive, send)
