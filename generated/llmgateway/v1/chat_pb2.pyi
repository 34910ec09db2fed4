from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProviderCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVIDER_CATEGORY_UNSPECIFIED: _ClassVar[ProviderCategory]
    PROVIDER_CATEGORY_BASE: _ClassVar[ProviderCategory]
    PROVIDER_CATEGORY_BYOK: _ClassVar[ProviderCategory]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SYSTEM: _ClassVar[Role]
    ROLE_DEVELOPER: _ClassVar[Role]
    ROLE_USER: _ClassVar[Role]
    ROLE_ASSISTANT: _ClassVar[Role]
    ROLE_TOOL: _ClassVar[Role]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_TOOL_CALLS: _ClassVar[FinishReason]
    FINISH_REASON_CONTENT_FILTER: _ClassVar[FinishReason]
    FINISH_REASON_FUNCTION_CALL: _ClassVar[FinishReason]
PROVIDER_CATEGORY_UNSPECIFIED: ProviderCategory
PROVIDER_CATEGORY_BASE: ProviderCategory
PROVIDER_CATEGORY_BYOK: ProviderCategory
ROLE_UNSPECIFIED: Role
ROLE_SYSTEM: Role
ROLE_DEVELOPER: Role
ROLE_USER: Role
ROLE_ASSISTANT: Role
ROLE_TOOL: Role
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_TOOL_CALLS: FinishReason
FINISH_REASON_CONTENT_FILTER: FinishReason
FINISH_REASON_FUNCTION_CALL: FinishReason

class LLMConfig(_message.Message):
    __slots__ = ("model", "model_endpoint_type", "model_endpoint", "context_window", "handle", "provider_name", "provider_category", "put_inner_thoughts_in_kwargs", "model_wrapper", "temperature", "max_tokens", "reasoning_effort", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty", "parallel_tool_calls", "response_format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_ENDPOINT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PUT_INNER_THOUGHTS_IN_KWARGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_WRAPPER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_EFFORT_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_endpoint_type: str
    model_endpoint: str
    context_window: int
    handle: str
    provider_name: str
    provider_category: ProviderCategory
    put_inner_thoughts_in_kwargs: bool
    model_wrapper: str
    temperature: float
    max_tokens: int
    reasoning_effort: str
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    frequency_penalty: float
    presence_penalty: float
    parallel_tool_calls: bool
    response_format: ResponseFormat
    def __init__(self, model: _Optional[str] = ..., model_endpoint_type: _Optional[str] = ..., model_endpoint: _Optional[str] = ..., context_window: _Optional[int] = ..., handle: _Optional[str] = ..., provider_name: _Optional[str] = ..., provider_category: _Optional[_Union[ProviderCategory, str]] = ..., put_inner_thoughts_in_kwargs: _Optional[bool] = ..., model_wrapper: _Optional[str] = ..., temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., reasoning_effort: _Optional[str] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., parallel_tool_calls: _Optional[bool] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ...) -> None: ...

class ResponseFormat(_message.Message):
    __slots__ = ("type", "json_schema")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    type: str
    json_schema: JsonSchemaFormat
    def __init__(self, type: _Optional[str] = ..., json_schema: _Optional[_Union[JsonSchemaFormat, _Mapping]] = ...) -> None: ...

class JsonSchemaFormat(_message.Message):
    __slots__ = ("name", "description", "schema", "strict")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    schema: _struct_pb2.Struct
    strict: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., strict: _Optional[bool] = ...) -> None: ...

class ImageUrl(_message.Message):
    __slots__ = ("url", "detail")
    URL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    url: str
    detail: str
    def __init__(self, url: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image_url")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    text: str
    image_url: ImageUrl
    def __init__(self, text: _Optional[str] = ..., image_url: _Optional[_Union[ImageUrl, _Mapping]] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments", "thought_signature")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    THOUGHT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments: str
    thought_signature: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ..., thought_signature: _Optional[str] = ...) -> None: ...

class ThinkingBlock(_message.Message):
    __slots__ = ("type", "text", "signature", "data")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    type: str
    text: str
    signature: str
    data: str
    def __init__(self, type: _Optional[str] = ..., text: _Optional[str] = ..., signature: _Optional[str] = ..., data: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content", "parts", "name", "tool_calls", "tool_call_id", "reasoning_content", "refusal", "thinking_blocks")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REASONING_CONTENT_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    THINKING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    role: Role
    content: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    name: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    tool_call_id: str
    reasoning_content: str
    refusal: str
    thinking_blocks: _containers.RepeatedCompositeFieldContainer[ThinkingBlock]
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., content: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ..., name: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ..., reasoning_content: _Optional[str] = ..., refusal: _Optional[str] = ..., thinking_blocks: _Optional[_Iterable[_Union[ThinkingBlock, _Mapping]]] = ...) -> None: ...

class FunctionDefinition(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TraceContext(_message.Message):
    __slots__ = ("step_id", "agent_id", "run_id", "call_type", "tags")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_TYPE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    agent_id: str
    run_id: str
    call_type: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., call_type: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateRequest(_message.Message):
    __slots__ = ("llm_config", "messages", "functions", "function_call", "force_tool_call", "use_tool_naming", "put_inner_thoughts_first", "first_message", "user_id", "name", "trace", "final_completion_without_deltas", "route", "fallbacks")
    LLM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_CALL_FIELD_NUMBER: _ClassVar[int]
    FORCE_TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    USE_TOOL_NAMING_FIELD_NUMBER: _ClassVar[int]
    PUT_INNER_THOUGHTS_FIRST_FIELD_NUMBER: _ClassVar[int]
    FIRST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    FINAL_COMPLETION_WITHOUT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    llm_config: LLMConfig
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionDefinition]
    function_call: str
    force_tool_call: str
    use_tool_naming: bool
    put_inner_thoughts_first: bool
    first_message: bool
    user_id: str
    name: str
    trace: TraceContext
    final_completion_without_deltas: bool
    route: str
    fallbacks: _containers.RepeatedCompositeFieldContainer[LLMConfig]
    def __init__(self, llm_config: _Optional[_Union[LLMConfig, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., functions: _Optional[_Iterable[_Union[FunctionDefinition, _Mapping]]] = ..., function_call: _Optional[str] = ..., force_tool_call: _Optional[str] = ..., use_tool_naming: _Optional[bool] = ..., put_inner_thoughts_first: _Optional[bool] = ..., first_message: _Optional[bool] = ..., user_id: _Optional[str] = ..., name: _Optional[str] = ..., trace: _Optional[_Union[TraceContext, _Mapping]] = ..., final_completion_without_deltas: _Optional[bool] = ..., route: _Optional[str] = ..., fallbacks: _Optional[_Iterable[_Union[LLMConfig, _Mapping]]] = ...) -> None: ...

class StreamCreateRequest(_message.Message):
    __slots__ = ("llm_config", "messages", "functions", "function_call", "force_tool_call", "use_tool_naming", "put_inner_thoughts_first", "first_message", "user_id", "name", "trace", "final_completion_without_deltas", "route", "fallbacks")
    LLM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_CALL_FIELD_NUMBER: _ClassVar[int]
    FORCE_TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    USE_TOOL_NAMING_FIELD_NUMBER: _ClassVar[int]
    PUT_INNER_THOUGHTS_FIRST_FIELD_NUMBER: _ClassVar[int]
    FIRST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    FINAL_COMPLETION_WITHOUT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    llm_config: LLMConfig
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionDefinition]
    function_call: str
    force_tool_call: str
    use_tool_naming: bool
    put_inner_thoughts_first: bool
    first_message: bool
    user_id: str
    name: str
    trace: TraceContext
    final_completion_without_deltas: bool
    route: str
    fallbacks: _containers.RepeatedCompositeFieldContainer[LLMConfig]
    def __init__(self, llm_config: _Optional[_Union[LLMConfig, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., functions: _Optional[_Iterable[_Union[FunctionDefinition, _Mapping]]] = ..., function_call: _Optional[str] = ..., force_tool_call: _Optional[str] = ..., use_tool_naming: _Optional[bool] = ..., put_inner_thoughts_first: _Optional[bool] = ..., first_message: _Optional[bool] = ..., user_id: _Optional[str] = ..., name: _Optional[str] = ..., trace: _Optional[_Union[TraceContext, _Mapping]] = ..., final_completion_without_deltas: _Optional[bool] = ..., route: _Optional[str] = ..., fallbacks: _Optional[_Iterable[_Union[LLMConfig, _Mapping]]] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("llm_config", "messages", "functions", "function_call", "force_tool_call", "use_tool_naming", "put_inner_thoughts_first", "first_message", "user_id", "name", "trace", "final_completion_without_deltas", "route", "fallbacks")
    LLM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_CALL_FIELD_NUMBER: _ClassVar[int]
    FORCE_TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    USE_TOOL_NAMING_FIELD_NUMBER: _ClassVar[int]
    PUT_INNER_THOUGHTS_FIRST_FIELD_NUMBER: _ClassVar[int]
    FIRST_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    FINAL_COMPLETION_WITHOUT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    llm_config: LLMConfig
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionDefinition]
    function_call: str
    force_tool_call: str
    use_tool_naming: bool
    put_inner_thoughts_first: bool
    first_message: bool
    user_id: str
    name: str
    trace: TraceContext
    final_completion_without_deltas: bool
    route: str
    fallbacks: _containers.RepeatedCompositeFieldContainer[LLMConfig]
    def __init__(self, llm_config: _Optional[_Union[LLMConfig, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., functions: _Optional[_Iterable[_Union[FunctionDefinition, _Mapping]]] = ..., function_call: _Optional[str] = ..., force_tool_call: _Optional[str] = ..., use_tool_naming: _Optional[bool] = ..., put_inner_thoughts_first: _Optional[bool] = ..., first_message: _Optional[bool] = ..., user_id: _Optional[str] = ..., name: _Optional[str] = ..., trace: _Optional[_Union[TraceContext, _Mapping]] = ..., final_completion_without_deltas: _Optional[bool] = ..., route: _Optional[str] = ..., fallbacks: _Optional[_Iterable[_Union[LLMConfig, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "cache_write_tokens", "cost_usd", "cache_write_1h_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cache_write_tokens: int
    cost_usd: str
    cache_write_1h_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., cost_usd: _Optional[str] = ..., cache_write_1h_tokens: _Optional[int] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("index", "message", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    message: Message
    finish_reason: FinishReason
    def __init__(self, index: _Optional[int] = ..., message: _Optional[_Union[Message, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class ChatCompletion(_message.Message):
    __slots__ = ("id", "model", "created", "choices", "usage", "system_fingerprint")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    created: int
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    usage: Usage
    system_fingerprint: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., created: _Optional[int] = ..., choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., system_fingerprint: _Optional[str] = ...) -> None: ...

class CreateResponse(_message.Message):
    __slots__ = ("completion", "provider_trace_id", "deployment")
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    completion: ChatCompletion
    provider_trace_id: str
    deployment: RouteDeployment
    def __init__(self, completion: _Optional[_Union[ChatCompletion, _Mapping]] = ..., provider_trace_id: _Optional[str] = ..., deployment: _Optional[_Union[RouteDeployment, _Mapping]] = ...) -> None: ...

class RouteDeployment(_message.Message):
    __slots__ = ("route", "name", "model_endpoint_type", "model", "attempts")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ENDPOINT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    route: str
    name: str
    model_endpoint_type: str
    model: str
    attempts: int
    def __init__(self, route: _Optional[str] = ..., name: _Optional[str] = ..., model_endpoint_type: _Optional[str] = ..., model: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class ChatCompletionDelta(_message.Message):
    __slots__ = ("index", "content", "reasoning_content", "tool_calls", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONING_CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    content: str
    reasoning_content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallDelta]
    finish_reason: FinishReason
    def __init__(self, index: _Optional[int] = ..., content: _Optional[str] = ..., reasoning_content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallDelta, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class StreamCreateResponse(_message.Message):
    __slots__ = ("delta", "completion", "provider_trace_id", "deployment")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    delta: ChatCompletionDelta
    completion: ChatCompletion
    provider_trace_id: str
    deployment: RouteDeployment
    def __init__(self, delta: _Optional[_Union[ChatCompletionDelta, _Mapping]] = ..., completion: _Optional[_Union[ChatCompletion, _Mapping]] = ..., provider_trace_id: _Optional[str] = ..., deployment: _Optional[_Union[RouteDeployment, _Mapping]] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("prompt_tokens", "function_tokens", "total_tokens", "context_window", "encoding")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    function_tokens: int
    total_tokens: int
    context_window: int
    encoding: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., function_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., context_window: _Optional[int] = ..., encoding: _Optional[str] = ...) -> None: ...
