"""Command-line entry points.

Importing this package sets the process environment every MoLink node needs, before vLLM or
gRPC read it (explicit settings by the user win).
"""

import os

# PP through our executor needs the V1 model runner (V2 broadcasts tokens over torch.distributed).
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
# gRPC and the DHT run threads in the server process: never fork the engine from it.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# The DHT forks its process while gRPC threads run; gRPC's notes about that are harmless.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
