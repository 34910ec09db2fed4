"""Bring-your-own-key providers: storing one (validated, encrypted) and resolving its key for a call."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.auth.crypto import EncryptionKeyMissing, decrypt_async, encrypt_async
from server.auth.endpoints import EndpointPolicy
from server.auth.redact import Redactor
from server.auth.store import GLOBAL_ORGANIZATION, AuthStore, ProviderRecord, api_key_last4
from server.errors import FieldViolation, InvalidRequest, NotFound


@dataclass(frozen=True, slots=True)
class ByokCredentials:
    """A provider and its decrypted key, for one upstream call. Send the key only to `base_url`."""

    provider: ProviderRecord
    api_key: str = field(repr=False)

    @property
    def base_url(self) -> str:
        return self.provider.base_url


def redaction_owner(organization_id: str, name: str) -> str:
    """The redactor entry of a provider's key (`Redactor.add_owned`)."""
    return f"byok\x00{organization_id}\x00{name}"


async def create_byok_provider(
    store: AuthStore,
    policy: EndpointPolicy,
    *,
    passphrase: str,
    organization_id: str,
    name: str,
    endpoint_type: str,
    base_url: str,
    api_key: str,
) -> ProviderRecord:
    """Validate, encrypt and store a provider (the CreateProvider RPC). Never returns the key."""
    violations = [
        FieldViolation(fname, "must not be empty")
        for fname, value in (("name", name), ("base_url", base_url), ("api_key", api_key))
        if not value.strip()
    ]
    if violations:
        raise InvalidRequest(
            "CreateProvider needs a name, a base_url and an api_key",
            metadata={"fields": ",".join(v.field for v in violations)},
            field_violations=violations,
        )
    if not passphrase:
        raise EncryptionKeyMissing()
    canonical = policy.validate_byok_base_url(base_url)
    return await store.create_provider(
        organization_id=organization_id,
        name=name,
        endpoint_type=endpoint_type,
        base_url=canonical,
        api_key_encrypted=await encrypt_async(api_key, passphrase),
        api_key_last4=api_key_last4(api_key),
    )


async def resolve_byok(
    store: AuthStore,
    *,
    passphrase: str,
    organization_id: str,
    provider_name: str,
    redactor: Redactor | None = None,
) -> ByokCredentials:
    """The organization's (else the global) provider of that name with its key decrypted.

    The key is registered with `redactor` before it is returned, so it cannot reach a trace or log.
    """
    record = await store.get_provider(organization_id=organization_id, name=provider_name)
    if record is None:
        if redactor is not None:
            # Deleted (perhaps by another process): its key leaves the redactor with it.
            redactor.discard_owner(redaction_owner(organization_id, provider_name))
            redactor.discard_owner(redaction_owner(GLOBAL_ORGANIZATION, provider_name))
        raise NotFound(
            f"no provider named {provider_name!r} for organization {organization_id!r}",
            metadata={"provider_name": provider_name, "organization_id": organization_id},
        )
    if not passphrase:
        raise EncryptionKeyMissing()
    api_key = await decrypt_async(record.api_key_encrypted, passphrase)
    if redactor is not None:
        # One entry per provider: a replaced key replaces the old one in the redactor.
        redactor.add_owned(redaction_owner(record.organization_id, record.name), api_key)
    return ByokCredentials(provider=record, api_key=api_key)
