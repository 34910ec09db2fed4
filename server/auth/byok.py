"""Bring-your-own-key providers: storing one (validated, encrypted) and resolving its key for a call."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from server.auth.crypto import Binding, DecryptionFailed, EncryptionKeyMissing, Keyring
from server.auth.endpoints import EndpointPolicy
from server.auth.redact import Redactor
from server.auth.store import GLOBAL_ORGANIZATION, AuthStore, ProviderRecord, api_key_last4
from server.errors import FieldViolation, InvalidRequest, NotFound

log = logging.getLogger(__name__)


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
    keyring: Keyring,
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
    if not keyring.configured:
        raise EncryptionKeyMissing()
    canonical = policy.validate_byok_base_url(base_url)
    # Bound to exactly what the row will say, so the row decrypts only as itself.
    binding = Binding(organization_id=organization_id, provider_name=name, base_url=canonical)
    return await store.create_provider(
        organization_id=organization_id,
        name=name,
        endpoint_type=endpoint_type,
        base_url=canonical,
        api_key_encrypted=await keyring.encrypt_async(api_key, binding),
        api_key_last4=api_key_last4(api_key),
    )


async def resolve_byok(
    store: AuthStore,
    *,
    keyring: Keyring,
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
    api_key = await keyring.decrypt_async(record.api_key_encrypted, binding_of(record))
    if redactor is not None:
        # One entry per provider: a replaced key replaces the old one in the redactor.
        redactor.add_owned(redaction_owner(record.organization_id, record.name), api_key)
    return ByokCredentials(provider=record, api_key=api_key)


def binding_of(record: ProviderRecord) -> Binding:
    """What a stored provider's key is bound to: its organization, name and base URL."""
    return Binding(
        organization_id=record.organization_id, provider_name=record.name, base_url=record.base_url
    )


@dataclass(slots=True)
class RotationReport:
    """What `rotate_encryption` did; `failed` names providers (never keys) with the reason."""

    rotated: int = 0
    unchanged: int = 0
    changed_meanwhile: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (organization, name, cause)


async def rotate_encryption(store: AuthStore, keyring: Keyring) -> RotationReport:
    """Re-encrypt every provider key not yet under the current passphrase, count and one salt.

    Readers are never locked out: each row is swapped in one compare-and-set UPDATE, from a value
    servers holding either passphrase can read to one they can read too. Idempotent: run it again
    after a failure, or after a server that still wrote under the old passphrase has restarted.
    """
    if not keyring.configured:
        raise EncryptionKeyMissing()
    report = RotationReport()
    records = await store.all_providers()
    for record in records:
        # Keep the salt of a row already under the current passphrase, so all rows end under one.
        try:
            await keyring.decrypt_async(record.api_key_encrypted, binding_of(record))
        except DecryptionFailed:
            continue
        if keyring.adopt_write_salt(record.api_key_encrypted):
            break
    for record in records:
        token = record.api_key_encrypted
        binding = binding_of(record)
        try:
            api_key = await keyring.decrypt_async(token, binding)
            if not keyring.needs_rotation(token):  # derived above: no PBKDF2 here
                report.unchanged += 1
                continue
            fresh = await keyring.encrypt_async(api_key, binding)
        except DecryptionFailed as exc:
            report.failed.append((record.organization_id, record.name, exc.cause))
            continue
        if await store.replace_provider_key(provider_id=record.id, old=token, new=fresh):
            report.rotated += 1
        else:
            report.changed_meanwhile += 1  # deleted, or re-created, while we ran: nothing to do
    log.info(
        "BYOK key rotation: %d re-encrypted, %d already current, %d changed meanwhile, %d failed",
        report.rotated,
        report.unchanged,
        report.changed_meanwhile,
        len(report.failed),
    )
    return report
