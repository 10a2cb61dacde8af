"""vLLM's process-tree kill at shutdown, for children that exit while it runs.

vLLM 0.32's ``kill_process_tree(pid)`` (``vllm.utils.system_utils``) lists the process's children,
then logs each one's ``child.name()`` and SIGKILLs it, suppressing only ``ProcessLookupError``. A
child that exits between the listing and ``name()`` raises ``psutil.NoSuchProcess``, which ends
the API server's shutdown task before it stops the HTTP server: the process then runs on until
it is killed. A MoLink head's EngineCore has such children, its DHT process and that process's
p2pd, which stop on the same SIGTERM; heads hung on every few stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import psutil
import vllm.v1.utils as v1_utils
from vllm.logger import init_logger

logger = init_logger(__name__)


def _kill_process_tree(pid: int) -> None:
    """vLLM's ``kill_process_tree``, copied, with children that are gone already skipped."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            logger.warning(
                "[shutdown] force killing sub process %s pid %d", child.name(), child.pid
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def tolerate_vanishing_children() -> None:
    """Make vLLM's shutdown kill process trees whose members exit meanwhile (idempotent; the
    process's one patch of it).

    Needs from vLLM: ``vllm.v1.utils.shutdown`` (the engine core processes' shutdown) calls
    ``kill_process_tree(pid)`` by the name ``vllm.v1.utils`` imported, for each process still
    alive after its timeout.
    """
    module: Any = v1_utils
    module.kill_process_tree = _kill_process_tree
