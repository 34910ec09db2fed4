import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmgateway.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProviderTrace(_message.Message):
    __slots__ = ("id", "step_id", "agent_id", "agent_tags", "run_id", "call_type", "organization_id", "user_id", "provider", "model", "model_endpoint_type", "is_byok", "request_json", "response_json", "error_type", "error_message", "usage", "latency_ms", "time_to_first_token_ms", "created_at", "truncated", "notes", "route", "deployment", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_TAGS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_TYPE_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_ENDPOINT_TYPE_FIELD_NUMBER: _ClassVar[int]
    IS_BYOK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    step_id: str
    agent_id: str
    agent_tags: _containers.RepeatedScalarFieldContainer[str]
    run_id: str
    call_type: str
    organization_id: str
    user_id: str
    provider: str
    model: str
    model_endpoint_type: str
    is_byok: bool
    request_json: str
    response_json: str
    error_type: str
    error_message: str
    usage: _chat_pb2.Usage
    latency_ms: float
    time_to_first_token_ms: float
    created_at: _timestamp_pb2.Timestamp
    truncated: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    route: str
    deployment: str
    attempts: _containers.RepeatedCompositeFieldContainer[RouteAttempt]
    def __init__(self, id: _Optional[str] = ..., step_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., agent_tags: _Optional[_Iterable[str]] = ..., run_id: _Optional[str] = ..., call_type: _Optional[str] = ..., organization_id: _Optional[str] = ..., user_id: _Optional[str] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., model_endpoint_type: _Optional[str] = ..., is_byok: _Optional[bool] = ..., request_json: _Optional[str] = ..., response_json: _Optional[str] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ..., usage: _Optional[_Union[_chat_pb2.Usage, _Mapping]] = ..., latency_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., truncated: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ..., route: _Optional[str] = ..., deployment: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[RouteAttempt, _Mapping]]] = ...) -> None: ...

class RouteAttempt(_message.Message):
    __slots__ = ("route", "deployment", "status", "latency_ms")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    route: str
    deployment: str
    status: str
    latency_ms: float
    def __init__(self, route: _Optional[str] = ..., deployment: _Optional[str] = ..., status: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class GetProviderTraceRequest(_message.Message):
    __slots__ = ("step_id",)
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    def __init__(self, step_id: _Optional[str] = ...) -> None: ...

class GetProviderTraceResponse(_message.Message):
    __slots__ = ("trace",)
    TRACE_FIELD_NUMBER: _ClassVar[int]
    trace: ProviderTrace
    def __init__(self, trace: _Optional[_Union[ProviderTrace, _Mapping]] = ...) -> None: ...

class ListProviderTracesRequest(_message.Message):
    __slots__ = ("step_id", "run_id", "agent_id", "start_time", "end_time", "page_size", "page_token")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    run_id: str
    agent_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, step_id: _Optional[str] = ..., run_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListProviderTracesResponse(_message.Message):
    __slots__ = ("traces", "next_page_token")
    TRACES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    traces: _containers.RepeatedCompositeFieldContainer[ProviderTrace]
    next_page_token: str
    def __init__(self, traces: _Optional[_Iterable[_Union[ProviderTrace, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
