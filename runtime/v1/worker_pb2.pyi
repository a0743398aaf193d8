from colaflow.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capabilities(_message.Message):
    __slots__ = ("cores", "memory_bytes", "accelerator", "codecs")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_bytes: int
    accelerator: str
    codecs: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Codec]
    def __init__(self, cores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., accelerator: _Optional[str] = ..., codecs: _Optional[_Iterable[_Union[_tensor_pb2.Codec, str]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "capabilities")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    capabilities: Capabilities
    def __init__(self, worker_id: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("session", "heartbeat_s", "max_message_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    heartbeat_s: float
    max_message_bytes: int
    def __init__(self, session: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "credit", "update", "heartbeat", "goodbye", "refusal")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    credit: Credit
    update: Chunk
    heartbeat: Heartbeat
    goodbye: Goodbye
    refusal: Refusal
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., update: _Optional[_Union[Chunk, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("session", "progress")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    session: str
    progress: _containers.RepeatedCompositeFieldContainer[SiteProgress]
    def __init__(self, session: _Optional[str] = ..., progress: _Optional[_Iterable[_Union[SiteProgress, _Mapping]]] = ...) -> None: ...

class SiteProgress(_message.Message):
    __slots__ = ("job", "site", "version", "fitted_through")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FITTED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    job: str
    site: str
    version: int
    fitted_through: int
    def __init__(self, job: _Optional[str] = ..., site: _Optional[str] = ..., version: _Optional[int] = ..., fitted_through: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("packets",)
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    packets: int
    def __init__(self, packets: _Optional[int] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("job", "site", "step", "reason")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job: str
    site: str
    step: int
    reason: str
    def __init__(self, job: _Optional[str] = ..., site: _Optional[str] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("time", "status")
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    time: float
    status: str
    def __init__(self, time: _Optional[float] = ..., status: _Optional[str] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason", "leaving")
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    reason: str
    leaving: bool
    def __init__(self, reason: _Optional[str] = ..., leaving: _Optional[bool] = ...) -> None: ...

class UpdateFrame(_message.Message):
    __slots__ = ("job", "site", "version", "fitted_through", "params", "loss", "optimizer", "grad_norm", "lr")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FITTED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    job: str
    site: str
    version: int
    fitted_through: int
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    loss: float
    optimizer: OptimizerState
    grad_norm: float
    lr: float
    def __init__(self, job: _Optional[str] = ..., site: _Optional[str] = ..., version: _Optional[int] = ..., fitted_through: _Optional[int] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., loss: _Optional[float] = ..., optimizer: _Optional[_Union[OptimizerState, _Mapping]] = ..., grad_norm: _Optional[float] = ..., lr: _Optional[float] = ...) -> None: ...

class OptimizerState(_message.Message):
    __slots__ = ("tensors", "meta")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    meta: bytes
    def __init__(self, tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., meta: _Optional[bytes] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("packet", "ack", "revocation", "heartbeat", "assignment")
    PACKET_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    packet: Chunk
    ack: UpdateAck
    revocation: Revocation
    heartbeat: Heartbeat
    assignment: Chunk
    def __init__(self, packet: _Optional[_Union[Chunk, _Mapping]] = ..., ack: _Optional[_Union[UpdateAck, _Mapping]] = ..., revocation: _Optional[_Union[Revocation, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., assignment: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job", "spec", "sites")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    job: str
    spec: bytes
    sites: _containers.RepeatedCompositeFieldContainer[SiteStart]
    def __init__(self, job: _Optional[str] = ..., spec: _Optional[bytes] = ..., sites: _Optional[_Iterable[_Union[SiteStart, _Mapping]]] = ...) -> None: ...

class SiteStart(_message.Message):
    __slots__ = ("site", "has_state", "version", "params", "optimizer")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SITE_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    site: bytes
    has_state: bool
    version: int
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    optimizer: OptimizerState
    def __init__(self, site: _Optional[bytes] = ..., has_state: _Optional[bool] = ..., version: _Optional[int] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., optimizer: _Optional[_Union[OptimizerState, _Mapping]] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("job", "sites", "reason")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job: str
    sites: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, job: _Optional[str] = ..., sites: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("job", "site", "version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    site: str
    version: int
    def __init__(self, job: _Optional[str] = ..., site: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PacketFrame(_message.Message):
    __slots__ = ("job", "step", "inputs", "sites")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    sites: _containers.RepeatedCompositeFieldContainer[SiteGrad]
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., sites: _Optional[_Iterable[_Union[SiteGrad, _Mapping]]] = ...) -> None: ...

class SiteGrad(_message.Message):
    __slots__ = ("site", "version", "input", "g", "route", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SITE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    site: str
    version: int
    input: int
    g: _tensor_pb2.Tensor
    route: _tensor_pb2.Tensor
    stats: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, site: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[int] = ..., g: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., route: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., stats: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq", "index", "count", "header", "payload_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    index: int
    count: int
    header: bytes
    payload_bytes: int
    def __init__(self, seq: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., header: _Optional[bytes] = ..., payload_bytes: _Optional[int] = ...) -> None: ...
