"""UsageService (sums of the traces) and LimitsService (limits of keys and organizations)."""

from __future__ import annotations

from datetime import UTC, timedelta

import grpc
from llmgateway.v1 import usage_pb2

from server.api.auth import KeyAuthenticator
from server.api.context import Context, parse, run_unary
from server.api.handlers import service, unary
from server.api.traces import readable_owner
from server.auth.store import AuthStore
from server.billing.cost import dollars
from server.errors import FailedPrecondition, FieldViolation, InvalidRequest, NotFound, PermissionDenied
from server.limits.book import LimitsBook
from server.limits.model import Limits, parse_count, parse_spend, spend_text
from server.traces.base import TraceBackend
from server.traces.usage import UsageQuery

USAGE_SERVICE = "llmgateway.v1.UsageService"
LIMITS_SERVICE = "llmgateway.v1.LimitsService"
MAX_RANGE = timedelta(days=400)
MAX_ROWS = 10_000
_GROUPS = {
    usage_pb2.USAGE_GROUP_BY_DAY: "day",
    usage_pb2.USAGE_GROUP_BY_MODEL: "model",
    usage_pb2.USAGE_GROUP_BY_KEY: "key_id",
    usage_pb2.USAGE_GROUP_BY_USER: "user_id",
}
_ORDER = ("day", "model", "key_id", "user_id")


def _invalid(field: str, description: str) -> InvalidRequest:
    return InvalidRequest(
        f"{field}: {description}",
        metadata={"field": field},
        field_violations=[FieldViolation(field, description)],
    )


class UsageServicer:
    def __init__(self, reader: TraceBackend | None, auth: KeyAuthenticator) -> None:
        self._reader = reader
        self._auth = auth

    async def get_usage(self, data: bytes, context: Context) -> usage_pb2.GetUsageResponse:
        async def call() -> usage_pb2.GetUsageResponse:
            actor = await self._auth.actor_for(context)
            request = parse(usage_pb2.GetUsageRequest, data)
            if not request.HasField("start_time") or not request.HasField("end_time"):
                raise _invalid("start_time", "start_time and end_time are required")
            start = request.start_time.ToDatetime(tzinfo=UTC)
            end = request.end_time.ToDatetime(tzinfo=UTC)
            if not start < end <= start + MAX_RANGE:
                raise _invalid("end_time", f"after start_time, at most {MAX_RANGE.days} days later")
            groups = set()
            for value in request.group_by:
                if value not in _GROUPS:
                    raise _invalid("group_by", "one of DAY, MODEL, KEY, USER")
                groups.add(_GROUPS[value])
            for field in ("model", "user_id", "key_id"):
                if len(getattr(request, field)) > 256:
                    raise _invalid(field, "at most 256 characters")
            if not actor.is_admin and (
                (request.user_id and request.user_id != actor.user_id)
                or (request.key_id and request.key_id != actor.key_id)
            ):
                raise PermissionDenied(
                    "another user's or key's usage needs an admin key", metadata={"key_id": actor.key_id}
                )
            reader = self._reader
            if reader is None or not reader.readable:
                name = reader.name if reader is not None else "none"
                raise FailedPrecondition(
                    f"the first trace backend ({name}) is write-only; put a readable one first in "
                    "LLMGW_TRACE_BACKENDS",
                    metadata={"backend": name},
                )
            query = UsageQuery(
                organization_id=actor.organization_id,
                start_time=start,
                end_time=end,
                group_by=tuple(g for g in _ORDER if g in groups),
                owner=readable_owner(actor),
                model=request.model,
                user_id=request.user_id,
                key_id=request.key_id,
            )
            rows = await reader.usage(query=query)
            if len(rows) > MAX_ROWS:
                raise FailedPrecondition(
                    f"more than {MAX_ROWS} rows: narrow the range or group by less",
                    metadata={"rows": len(rows), "limit": MAX_ROWS},
                )
            return usage_pb2.GetUsageResponse(
                rows=[
                    usage_pb2.UsageRow(
                        day=r.day,
                        model=r.model,
                        key_id=r.key_id,
                        user_id=r.user_id,
                        requests=r.requests,
                        errors=r.errors,
                        prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.completion_tokens,
                        total_tokens=r.total_tokens,
                        cached_tokens=r.cached_tokens,
                        cache_write_tokens=r.cache_write_tokens,
                        reasoning_tokens=r.reasoning_tokens,
                        cost_usd=dollars(r.cost_pico),
                        unpriced_requests=r.unpriced,
                    )
                    for r in rows
                ]
            )

        return await run_unary(context, call)

    def handlers(self) -> grpc.GenericRpcHandler:
        return service(USAGE_SERVICE, {"GetUsage": unary(self.get_usage)})


def limits_to_proto(limits: Limits) -> usage_pb2.Limits:
    out = usage_pb2.Limits()
    if limits.requests_per_minute is not None:
        out.requests_per_minute = limits.requests_per_minute
    if limits.tokens_per_minute is not None:
        out.tokens_per_minute = limits.tokens_per_minute
    if limits.spend_per_day is not None:
        out.spend_per_day_usd = spend_text(limits.spend_per_day)
    if limits.spend_per_month is not None:
        out.spend_per_month_usd = spend_text(limits.spend_per_month)
    return out


def limits_from_proto(message: usage_pb2.Limits) -> Limits:
    """Validated limits; every bad field is reported (BadRequest)."""
    violations: list[FieldViolation] = []
    values: dict[str, int | None] = {}
    for name in ("requests_per_minute", "tokens_per_minute"):
        if message.HasField(name):
            try:
                values[name] = parse_count(str(getattr(message, name)), name)
            except ValueError as exc:
                violations.append(FieldViolation(f"limits.{name}", str(exc)))
    for name, target in (("spend_per_day_usd", "spend_per_day"), ("spend_per_month_usd", "spend_per_month")):
        if message.HasField(name):
            try:
                values[target] = parse_spend(getattr(message, name), name)
            except ValueError as exc:
                violations.append(FieldViolation(f"limits.{name}", str(exc)))
    if violations:
        raise InvalidRequest(
            "invalid limits: " + "; ".join(v.description for v in violations),
            metadata={"fields": ",".join(v.field for v in violations)},
            field_violations=violations,
        )
    return Limits(**values)


class LimitsServicer:
    """Admin keys only, within their organization: a key of another organization is NOT_FOUND
    (the same answer as a key that does not exist, so ids of other tenants cannot be probed)."""

    def __init__(self, store: AuthStore, book: LimitsBook, auth: KeyAuthenticator) -> None:
        self._store = store
        self._book = book
        self._auth = auth

    async def _own_key(self, key_id: str, organization_id: str) -> None:
        if not key_id:
            raise _invalid("key_id", "required")
        key = await self._store.get_key(key_id=key_id[:64])
        if key is None or key.organization_id != organization_id:
            raise NotFound(f"no key {key_id[:64]!r} in this organization", metadata={"key_id": key_id[:64]})

    async def set_key_limits(self, data: bytes, context: Context) -> usage_pb2.SetKeyLimitsResponse:
        async def call() -> usage_pb2.SetKeyLimitsResponse:
            actor = await self._auth.admin_for(context)
            request = parse(usage_pb2.SetKeyLimitsRequest, data)
            await self._own_key(request.key_id, actor.organization_id)
            limits = limits_from_proto(request.limits)
            await self._book.set("key", request.key_id, limits)
            return usage_pb2.SetKeyLimitsResponse(limits=limits_to_proto(limits))

        return await run_unary(context, call)

    async def get_limits(self, data: bytes, context: Context) -> usage_pb2.GetLimitsResponse:
        async def call() -> usage_pb2.GetLimitsResponse:
            actor = await self._auth.admin_for(context)
            request = parse(usage_pb2.GetLimitsRequest, data)
            if request.key_id:
                await self._own_key(request.key_id, actor.organization_id)
                limits = await self._book.get("key", request.key_id)
            else:
                limits = await self._book.get("org", actor.organization_id)
            return usage_pb2.GetLimitsResponse(limits=limits_to_proto(limits))

        return await run_unary(context, call)

    def handlers(self) -> grpc.GenericRpcHandler:
        return service(
            LIMITS_SERVICE,
            {"SetKeyLimits": unary(self.set_key_limits), "GetLimits": unary(self.get_limits)},
        )
