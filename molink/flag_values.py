"""How MoLink's flags read their values: argparse ``type=`` functions, each refusing bad text
with a message that names what it expected."""

from __future__ import annotations

import argparse
import os
from typing import Any


def number(kind: type[int] | type[float], text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def mebibytes(text: str) -> float:
    value = number(float, text)
    if not 0 < value <= 64 * 1024:  # NaN too
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 65536 MiB, got {text}")
    return value


def share(text: str) -> float:
    value = number(float, text)
    if not 0 <= value <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def port(text: str) -> int:
    value = number(int, text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {value}")
    return value


def port_or_any(text: str) -> int:
    """A port, or 0 for any free one."""
    value = number(int, text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535 (0: any free), got {value}")
    return value


def seconds(text: str) -> float:
    value = number(float, text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def seconds_or_zero(text: str) -> float:
    value = number(float, text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, got {text}")
    return value


def parse_serving_layers(text: str) -> tuple[int, int]:
    """``"START,END"`` (both inclusive) -> (start, end)."""
    try:
        start_s, end_s = text.split(",")
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--serving_layers takes START,END (inclusive), e.g. 0,15; got {text!r}"
        ) from None
    if start < 0 or end < start:
        raise argparse.ArgumentTypeError(f"--serving_layers {text}: need 0 <= START <= END")
    return start, end


def absolute_path(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def as_tuple(values: list[str] | None) -> tuple[str, ...]:
    return tuple(values or ())
