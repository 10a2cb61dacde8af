"""The head's executor plug-in: vLLM's ``Executor`` set-up hook, and the ``collective_rpc``
side channel from the API server process to the executor in the engine process."""

from __future__ import annotations

from typing import Any

from vllm.v1.executor.abstract import Executor


class ExecutorHooks(Executor):
    """vLLM's ``Executor`` whose set-up is the public-named :meth:`init_executor`.

    Needs from vLLM: ``Executor.__init__`` sets ``vllm_config`` (and its parts) and then calls
    the abstract ``_init_executor``.
    """

    def init_executor(self) -> None:
        """Set the executor up (``self.vllm_config`` is set); subclasses implement it. Called
        from vLLM's abstract ``Executor._init_executor``."""
        raise NotImplementedError

    def _init_executor(self) -> None:
        self.init_executor()


async def call_executor(engine: Any, method: str) -> Any:
    """Call ``method`` on the head's executor from the API server process; its result.

    The executor answers ``method`` in its ``collective_rpc`` (a name no worker has), so this is
    a side channel to the engine process, not a call on the workers.

    Needs from vLLM: ``EngineClient.collective_rpc(method)`` (``AsyncLLM``) reaches
    ``EngineCore.collective_rpc``, which calls ``Executor.collective_rpc(method, timeout, args,
    kwargs)`` and returns its list (one entry: MoLink's executor answers once).
    """
    results = await engine.collective_rpc(method)
    return results[0]
