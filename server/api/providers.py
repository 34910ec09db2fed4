"""ProviderService: the BYOK providers of the caller's organization (admin keys only)."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from llmgateway.v1 import providers_pb2

from server.api.auth import KeyAuthenticator
from server.api.context import Context, parse, run_unary
from server.api.handlers import service, unary
from server.auth.byok import create_byok_provider, redaction_owner
from server.auth.crypto import Keyring
from server.auth.endpoints import EndpointPolicy
from server.auth.redact import Redactor
from server.auth.store import AuthStore, ProviderRecord
from server.core.validation import KNOWN_TYPES
from server.errors import FieldViolation, InvalidRequest, NotFound

SERVICE = "llmgateway.v1.ProviderService"


def provider_to_proto(record: ProviderRecord) -> providers_pb2.Provider:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(record.created_at)
    return providers_pb2.Provider(
        id=record.id,
        name=record.name,
        model_endpoint_type=record.endpoint_type,
        base_url=record.base_url,
        api_key_last4=record.api_key_last4,
        organization_id=record.organization_id,
        created_at=created,
    )


def _validate(request: providers_pb2.CreateProviderRequest) -> None:
    """What the BYOK store does not check itself (it checks name, base URL and key)."""
    violations = []
    if len(request.name) > 128:
        violations.append(FieldViolation("name", "at most 128 characters"))
    if request.model_endpoint_type not in KNOWN_TYPES:
        violations.append(FieldViolation("model_endpoint_type", f"one of {', '.join(sorted(KNOWN_TYPES))}"))
    if violations:
        raise InvalidRequest(
            "invalid provider: " + "; ".join(f"{v.field}: {v.description}" for v in violations),
            metadata={"fields": ",".join(v.field for v in violations)},
            field_violations=violations,
        )


class ProviderServicer:
    def __init__(
        self,
        store: AuthStore,
        auth: KeyAuthenticator,
        policy: EndpointPolicy,
        *,
        keyring: Keyring,
        redactor: Redactor | None = None,
    ) -> None:
        self._store = store
        self._redactor = redactor
        self._auth = auth
        self._policy = policy
        self._keyring = keyring

    async def create(self, data: bytes, context: Context) -> providers_pb2.CreateProviderResponse:
        async def call() -> providers_pb2.CreateProviderResponse:
            actor = await self._auth.admin_for(context)
            request = parse(providers_pb2.CreateProviderRequest, data)
            _validate(request)
            record = await create_byok_provider(
                self._store,
                self._policy,
                keyring=self._keyring,
                organization_id=actor.organization_id,
                name=request.name,
                endpoint_type=request.model_endpoint_type,
                base_url=request.base_url,
                api_key=request.api_key,
            )
            return providers_pb2.CreateProviderResponse(provider=provider_to_proto(record))

        return await run_unary(context, call)

    async def list(self, data: bytes, context: Context) -> providers_pb2.ListProvidersResponse:
        async def call() -> providers_pb2.ListProvidersResponse:
            actor = await self._auth.admin_for(context)
            parse(providers_pb2.ListProvidersRequest, data)
            records = await self._store.list_providers(organization_id=actor.organization_id)
            return providers_pb2.ListProvidersResponse(providers=[provider_to_proto(r) for r in records])

        return await run_unary(context, call)

    async def delete(self, data: bytes, context: Context) -> providers_pb2.DeleteProviderResponse:
        async def call() -> providers_pb2.DeleteProviderResponse:
            actor = await self._auth.admin_for(context)
            request = parse(providers_pb2.DeleteProviderRequest, data)
            if not await self._store.delete_provider(
                organization_id=actor.organization_id, name=request.name
            ):
                raise NotFound(f"no provider named {request.name!r}", metadata={"name": request.name})
            if self._redactor is not None:
                # The redactor keeps no key of a deleted provider (it stays bounded by live ones).
                self._redactor.discard_owner(redaction_owner(actor.organization_id, request.name))
            return providers_pb2.DeleteProviderResponse()

        return await run_unary(context, call)

    def handlers(self) -> grpc.GenericRpcHandler:
        return service(
            SERVICE,
            {
                "CreateProvider": unary(self.create),
                "ListProviders": unary(self.list),
                "DeleteProvider": unary(self.delete),
            },
        )
