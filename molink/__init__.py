"""MoLink: serve one LLM split across several machines linked over ordinary networks."""

import logging

__version__ = "0.2.0"


class _VllmLogForwarder(logging.Handler):
    """Hands ``molink.*`` records to the handlers of the ``vllm`` logger.

    vLLM configures only its own logger (when and how it is configured is vLLM's business);
    forwarding at emit time makes MoLink's lines read like vLLM's, at vLLM's level, wherever
    vLLM logs (API server and engine processes alike).
    """

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if record.levelno < vllm_logger.getEffectiveLevel():
            return
        for handler in vllm_logger.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


_molink_logger = logging.getLogger("molink")
_molink_logger.setLevel(logging.DEBUG)
_molink_logger.addHandler(_VllmLogForwarder())
_molink_logger.propagate = False
