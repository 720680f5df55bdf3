from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Signed(_message.Message):
    __slots__ = ("timestamp", "nonce", "signature")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    nonce: bytes
    signature: bytes
    def __init__(self, timestamp: _Optional[float] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("client_id", "public_key", "signed", "version", "protocol")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    public_key: str
    signed: Signed
    version: str
    protocol: int
    def __init__(self, client_id: _Optional[int] = ..., public_key: _Optional[str] = ..., signed: _Optional[_Union[Signed, _Mapping]] = ..., version: _Optional[str] = ..., protocol: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("run_id", "heartbeat_s", "chunk_bytes", "max_payload_bytes", "max_metrics_keys", "max_metrics_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_METRICS_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_METRICS_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    heartbeat_s: float
    chunk_bytes: int
    max_payload_bytes: int
    max_metrics_keys: int
    max_metrics_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., max_payload_bytes: _Optional[int] = ..., max_metrics_keys: _Optional[int] = ..., max_metrics_bytes: _Optional[int] = ...) -> None: ...

class Reject(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at",)
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    sent_at: float
    def __init__(self, sent_at: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "round", "config_json", "payload_size", "payload_sha256", "max_result_bytes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: str
    round: int
    config_json: str
    payload_size: int
    payload_sha256: bytes
    max_result_bytes: int
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., config_json: _Optional[str] = ..., payload_size: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., max_result_bytes: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("task_id", "ok", "error", "num_examples", "loss", "metrics_json", "payload_size", "payload_sha256", "signed")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    ok: bool
    error: str
    num_examples: int
    loss: float
    metrics_json: str
    payload_size: int
    payload_sha256: bytes
    signed: Signed
    def __init__(self, task_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., metrics_json: _Optional[str] = ..., payload_size: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., signed: _Optional[_Union[Signed, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("task_id", "offset", "data", "last")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    offset: int
    data: bytes
    last: bool
    def __init__(self, task_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "result", "chunk")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    result: Result
    chunk: Chunk
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "reject", "heartbeat", "task", "chunk", "cancel", "finished")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    reject: Reject
    heartbeat: Heartbeat
    task: Task
    chunk: Chunk
    cancel: Cancel
    finished: Finished
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., reject: _Optional[_Union[Reject, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("client_id", "signed")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    signed: Signed
    def __init__(self, client_id: _Optional[int] = ..., signed: _Optional[_Union[Signed, _Mapping]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
