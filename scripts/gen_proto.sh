#!/usr/bin/env bash
# Regenerate molink/comm/proto/molink_pb2*.py from molink.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. molink/comm/proto/molink.proto
