from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "zlib")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ZLIB_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    zlib: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., zlib: _Optional[bool] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("wait_s", "compute_s", "arrived_unix", "decode_s", "done_unix")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    DONE_UNIX_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    compute_s: float
    arrived_unix: float
    decode_s: float
    done_unix: float
    def __init__(self, wait_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., arrived_unix: _Optional[float] = ..., decode_s: _Optional[float] = ..., done_unix: _Optional[float] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("peer_id", "dht_maddrs", "model_name", "model_hash", "start_layer", "end_layer", "num_layers", "state", "version", "is_head", "node_key", "proof")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    DHT_MADDRS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_HEAD_FIELD_NUMBER: _ClassVar[int]
    NODE_KEY_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    dht_maddrs: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_hash: str
    start_layer: int
    end_layer: int
    num_layers: int
    state: str
    version: str
    is_head: bool
    node_key: str
    proof: bytes
    def __init__(self, peer_id: _Optional[str] = ..., dht_maddrs: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_hash: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., state: _Optional[str] = ..., version: _Optional[str] = ..., is_head: _Optional[bool] = ..., node_key: _Optional[str] = ..., proof: _Optional[bytes] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class InitStageRequest(_message.Message):
    __slots__ = ("stage_config_json", "session", "head_peer_id")
    STAGE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEAD_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    stage_config_json: str
    session: str
    head_peer_id: str
    def __init__(self, stage_config_json: _Optional[str] = ..., session: _Optional[str] = ..., head_peer_id: _Optional[str] = ...) -> None: ...

class InitStageReply(_message.Message):
    __slots__ = ("kv_cache_spec", "available_kv_bytes")
    KV_CACHE_SPEC_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    kv_cache_spec: bytes
    available_kv_bytes: int
    def __init__(self, kv_cache_spec: _Optional[bytes] = ..., available_kv_bytes: _Optional[int] = ...) -> None: ...

class StartStageRequest(_message.Message):
    __slots__ = ("kv_cache_config", "next_address", "epoch", "standby", "session", "hot", "mirror_address", "drain_epoch", "drain_step", "forget_held")
    KV_CACHE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HOT_FIELD_NUMBER: _ClassVar[int]
    MIRROR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DRAIN_STEP_FIELD_NUMBER: _ClassVar[int]
    FORGET_HELD_FIELD_NUMBER: _ClassVar[int]
    kv_cache_config: bytes
    next_address: str
    epoch: int
    standby: bool
    session: str
    hot: bool
    mirror_address: str
    drain_epoch: int
    drain_step: int
    forget_held: bool
    def __init__(self, kv_cache_config: _Optional[bytes] = ..., next_address: _Optional[str] = ..., epoch: _Optional[int] = ..., standby: _Optional[bool] = ..., session: _Optional[str] = ..., hot: _Optional[bool] = ..., mirror_address: _Optional[str] = ..., drain_epoch: _Optional[int] = ..., drain_step: _Optional[int] = ..., forget_held: _Optional[bool] = ...) -> None: ...

class StartStageReply(_message.Message):
    __slots__ = ("kv_held",)
    KV_HELD_FIELD_NUMBER: _ClassVar[int]
    kv_held: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kv_held: _Optional[_Iterable[int]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "epoch", "scheduler_output", "sample", "grammar_output", "tensors", "error", "timings", "session", "replay", "replay_layer", "row_order")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    REPLAY_LAYER_FIELD_NUMBER: _ClassVar[int]
    ROW_ORDER_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    epoch: int
    scheduler_output: bytes
    sample: bool
    grammar_output: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    error: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    session: str
    replay: bool
    replay_layer: int
    row_order: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step_id: _Optional[int] = ..., epoch: _Optional[int] = ..., scheduler_output: _Optional[bytes] = ..., sample: _Optional[bool] = ..., grammar_output: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., error: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., session: _Optional[str] = ..., replay: _Optional[bool] = ..., replay_layer: _Optional[int] = ..., row_order: _Optional[_Iterable[str]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "epoch", "model_runner_output", "error", "timings", "leaving", "shrink_kv_blocks", "grow_kv_blocks", "replayed")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_RUNNER_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    SHRINK_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GROW_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    epoch: int
    model_runner_output: bytes
    error: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    leaving: bool
    shrink_kv_blocks: int
    grow_kv_blocks: int
    replayed: bool
    def __init__(self, step_id: _Optional[int] = ..., epoch: _Optional[int] = ..., model_runner_output: _Optional[bytes] = ..., error: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., leaving: _Optional[bool] = ..., shrink_kv_blocks: _Optional[int] = ..., grow_kv_blocks: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("epoch", "session")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    session: str
    def __init__(self, epoch: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class ListenRequest(_message.Message):
    __slots__ = ("node_key", "unix_time", "proof")
    NODE_KEY_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    node_key: str
    unix_time: float
    proof: bytes
    def __init__(self, node_key: _Optional[str] = ..., unix_time: _Optional[float] = ..., proof: _Optional[bytes] = ...) -> None: ...

class DialOrder(_message.Message):
    __slots__ = ("token", "via")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    token: str
    via: str
    def __init__(self, token: _Optional[str] = ..., via: _Optional[str] = ...) -> None: ...

class InviteRequest(_message.Message):
    __slots__ = ("target", "token", "via")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    target: str
    token: str
    via: str
    def __init__(self, target: _Optional[str] = ..., token: _Optional[str] = ..., via: _Optional[str] = ...) -> None: ...

class TunnelChunk(_message.Message):
    __slots__ = ("data", "token", "target")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    token: str
    target: str
    def __init__(self, data: _Optional[bytes] = ..., token: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("address", "nonce")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    address: str
    nonce: bytes
    def __init__(self, address: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class DialBackReply(_message.Message):
    __slots__ = ("proof", "error")
    PROOF_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    proof: bytes
    error: str
    def __init__(self, proof: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...
