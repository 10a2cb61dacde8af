"""Polling and reading a node's HTTP surface: ``/status``, ``/metrics``, waiting for a state."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from conftest import NodeProcess
from prometheus_client.parser import text_string_to_metric_families


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy (an ``OSError`` counts as not yet);
    fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what or check}; last value {last!r}")


def get(url: str, key: str | None = None) -> tuple[int, str]:
    """``GET url`` (with a bearer ``key``): status and body, also for HTTP errors."""
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def status(node: NodeProcess) -> dict:
    """A node's ``/status`` document."""
    with urllib.request.urlopen(node.base_url + "/status", timeout=10) as r:
        return json.load(r)


def scrape(node: NodeProcess) -> dict[tuple[str, tuple], float]:
    """Every sample of ``node``'s ``/metrics``, by (name, sorted labels)."""
    code, body = get(node.base_url + "/metrics")
    assert code == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample of :func:`scrape`'s result (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    """The sum of a metric's samples over all its labels."""
    return sum(v for (n, _), v in samples.items() if n == name)
