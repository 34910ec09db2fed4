"""Who a call runs as: the organization and user of the gateway key it presented."""

from __future__ import annotations

from dataclasses import dataclass

# Organization of every call while authentication is off. Not "" on purpose: "" is the
# organization of *global* BYOK providers (visible to every organization), and providers created
# while auth is off must not silently become global once auth is turned on.
ANONYMOUS_ORGANIZATION = "default"


@dataclass(frozen=True, slots=True)
class Actor:
    """The caller of one RPC. Traces, providers and reads are scoped to `organization_id`."""

    organization_id: str
    user_id: str = ""
    is_admin: bool = False
    key_id: str = ""  # "" for the anonymous actor

    @property
    def is_anonymous(self) -> bool:
        return not self.key_id


# The actor of every call while authentication is off (LLMGW_AUTH=off, or auto on loopback).
# It is an admin: with auth off the operator has chosen to trust every caller that can reach the
# socket, and ProviderService (admin only) would otherwise be unusable.
ANONYMOUS = Actor(organization_id=ANONYMOUS_ORGANIZATION, user_id="", is_admin=True, key_id="")
