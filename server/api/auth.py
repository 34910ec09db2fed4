"""Who is calling, for the servicers: the auth policy applied to the call's metadata."""

from __future__ import annotations

from server.api.context import Context
from server.auth.actor import Actor
from server.auth.policy import Authenticator, require_admin


class KeyAuthenticator:
    """Adapts `server.auth.policy.Authenticator` to a gRPC servicer context."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def actor_for(self, context: Context) -> Actor:
        return await self._authenticator.actor(context.invocation_metadata())

    async def admin_for(self, context: Context) -> Actor:
        actor = await self.actor_for(context)
        require_admin(actor)
        return actor
