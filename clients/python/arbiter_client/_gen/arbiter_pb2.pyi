from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_ERROR: _ClassVar[Truncation]
    TRUNCATION_TRUNCATE: _ClassVar[Truncation]
    TRUNCATION_TRUNCATE_CONTENT: _ClassVar[Truncation]
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_ERROR: Truncation
TRUNCATION_TRUNCATE: Truncation
TRUNCATION_TRUNCATE_CONTENT: Truncation

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("conversation", "text", "token_ids")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    text: str
    token_ids: TokenIds
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "truncation", "reward_weights", "per_turn")
    class RewardWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    REWARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PER_TURN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    truncation: Truncation
    reward_weights: _containers.ScalarMap[str, float]
    per_turn: bool
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., reward_weights: _Optional[_Mapping[str, float]] = ..., per_turn: _Optional[bool] = ...) -> None: ...

class TurnResult(_message.Message):
    __slots__ = ("message_index", "scored", "attributes", "reward", "tokens", "on_spine")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ON_SPINE_FIELD_NUMBER: _ClassVar[int]
    message_index: int
    scored: bool
    attributes: _containers.ScalarMap[str, float]
    reward: float
    tokens: int
    on_spine: bool
    def __init__(self, message_index: _Optional[int] = ..., scored: _Optional[bool] = ..., attributes: _Optional[_Mapping[str, float]] = ..., reward: _Optional[float] = ..., tokens: _Optional[int] = ..., on_spine: _Optional[bool] = ...) -> None: ...

class TruncationInfo(_message.Message):
    __slots__ = ("truncated", "original_tokens", "dropped_messages", "dropped_tokens")
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    truncated: bool
    original_tokens: int
    dropped_messages: int
    dropped_tokens: int
    def __init__(self, truncated: _Optional[bool] = ..., original_tokens: _Optional[int] = ..., dropped_messages: _Optional[int] = ..., dropped_tokens: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("attributes", "reward", "tokens", "truncation", "turns")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.ScalarMap[str, float]
    reward: float
    tokens: int
    truncation: TruncationInfo
    turns: _containers.RepeatedCompositeFieldContainer[TurnResult]
    def __init__(self, attributes: _Optional[_Mapping[str, float]] = ..., reward: _Optional[float] = ..., tokens: _Optional[int] = ..., truncation: _Optional[_Union[TruncationInfo, _Mapping]] = ..., turns: _Optional[_Iterable[_Union[TurnResult, _Mapping]]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "tokenize_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., tokenize_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_fingerprint", "timing", "warning")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    model_fingerprint: str
    timing: Timing
    warning: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., warning: _Optional[str] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("prompt", "candidates", "truncation", "reward_weights")
    class RewardWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    REWARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    prompt: Conversation
    candidates: _containers.RepeatedScalarFieldContainer[str]
    truncation: Truncation
    reward_weights: _containers.ScalarMap[str, float]
    def __init__(self, prompt: _Optional[_Union[Conversation, _Mapping]] = ..., candidates: _Optional[_Iterable[str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., reward_weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("results", "order", "model_fingerprint", "timing", "warning")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    order: _containers.RepeatedScalarFieldContainer[int]
    model_fingerprint: str
    timing: Timing
    warning: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., order: _Optional[_Iterable[int]] = ..., model_fingerprint: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., warning: _Optional[str] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request: ScoreRequest
    def __init__(self, request_id: _Optional[str] = ..., request: _Optional[_Union[ScoreRequest, _Mapping]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ScoreResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("architecture", "attributes", "default_reward_weights", "max_input_tokens", "model_fingerprint", "backend", "chat_template", "vocab_size", "head_outputs", "limits", "warning")
    class DefaultRewardWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REWARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    attributes: _containers.RepeatedScalarFieldContainer[str]
    default_reward_weights: _containers.ScalarMap[str, float]
    max_input_tokens: int
    model_fingerprint: str
    backend: str
    chat_template: str
    vocab_size: int
    head_outputs: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    warning: str
    def __init__(self, architecture: _Optional[str] = ..., attributes: _Optional[_Iterable[str]] = ..., default_reward_weights: _Optional[_Mapping[str, float]] = ..., max_input_tokens: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., backend: _Optional[str] = ..., chat_template: _Optional[str] = ..., vocab_size: _Optional[int] = ..., head_outputs: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., warning: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_requests", "queue_capacity", "max_items_per_request", "max_message_bytes", "default_truncation")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_requests: int
    queue_capacity: int
    max_items_per_request: int
    max_message_bytes: int
    default_truncation: str
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_requests: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., max_items_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., default_truncation: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("item", "truncation")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    item: Item
    truncation: Truncation
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., truncation: _Optional[_Union[Truncation, str]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("text", "token_ids", "truncation", "model_fingerprint")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    truncation: TruncationInfo
    model_fingerprint: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., truncation: _Optional[_Union[TruncationInfo, _Mapping]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...
