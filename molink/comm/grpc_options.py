"""gRPC channel and server options every MoLink link uses (message sizes, keepalive, windows)."""

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# HTTP/2 starts a stream with a 64 KiB window: over a 40 ms round trip that caps a prefill's
# activations at ~1.6 MB/s until BDP probing catches up. Start with a window that covers the
# bandwidth-delay product of a fast WAN link instead.
FLOW_CONTROL_OPTIONS = [("grpc.http2.lookahead_bytes", 16 * 1024 * 1024)]
# Keepalive pings find a peer that vanished without closing its socket (power loss, cable).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    *FLOW_CONTROL_OPTIONS,
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
    *FLOW_CONTROL_OPTIONS,
]
