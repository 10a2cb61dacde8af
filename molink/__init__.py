"""MoLink: serve one LLM split across several machines linked over ordinary networks."""

__version__ = "0.2.0"
