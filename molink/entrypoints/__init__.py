"""Command-line entry points.

Importing this package sets the process environment every MoLink node needs, before vLLM or
gRPC read it (explicit settings by the user win).
"""

import contextlib
import faulthandler
import gc
import os
import signal
from collections.abc import Iterator

# PP through our executor needs the V1 model runner (V2 broadcasts tokens over torch.distributed).
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
# gRPC and the DHT run threads in the server process: never fork the engine from it.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# The DHT forks its process while gRPC threads run; gRPC's notes about that are harmless.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while an entry module imports vLLM, torch and
    transformers, then freeze what they built. The heap only grows while modules load, yet the
    collector walks it again and again: about a third of an import that costs 15-20 s of CPU,
    paid twice by a head (its server, and its EngineCore, which the spawn start method makes
    import the entry module again)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()  # module-level objects live as long as the process: collections skip them


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` writes the stack of every thread of this process to its log (stderr):
    what a process that stopped answering waits on. A C-level handler: it answers even when
    every Python thread is stuck."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
