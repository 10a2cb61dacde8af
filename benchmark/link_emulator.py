"""A TCP relay that behaves like a slow network link: one-way delay, jitter and a rate limit.

Used by ``benchmark/swarm.py`` to put a WAN-like link in front of a node's gRPC port when the
kernel has no ``netem`` queueing discipline (``tc qdisc add ... netem`` fails with "Specified
qdisc kind is unknown" on some sandboxes). Each direction of a relay is one emulated link shared
by all connections through it: bytes leave at ``rate`` and arrive ``delay`` (+ jitter) later, in
order, without blocking the sender (so bytes in flight fill the bandwidth-delay product, as on a
real link).

    python -m benchmark.link_emulator --listen 127.0.0.1:60052 --target 127.0.0.1:50052 \\
        --delay-ms 20 --rate-mbit 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass

CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkSpec:
    """One direction of an emulated link."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float = 0.0  # 0: unlimited

    @property
    def is_ideal(self) -> bool:
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.rate_mbit == 0

    def describe(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "unlimited"
        return f"{self.delay_ms:g} ms ± {self.jitter_ms:g} ms one-way, {rate}"


class _Direction:
    """Serialization and propagation state of one direction (shared by its connections)."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._free_at = 0.0  # when the link has sent everything queued so far

    def arrival_time(self, nbytes: int, last_arrival: float) -> float:
        now = time.monotonic()
        start = max(now, self._free_at)
        if self.spec.rate_mbit > 0:
            start += nbytes * 8 / (self.spec.rate_mbit * 1e6)
        self._free_at = start
        jitter = (
            random.uniform(-self.spec.jitter_ms, self.spec.jitter_ms) if self.spec.jitter_ms else 0
        )
        arrival = start + max(0.0, self.spec.delay_ms + jitter) / 1e3
        return max(arrival, last_arrival)  # a TCP stream never reorders


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction
) -> None:
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            arrival, data = item
            delay = arrival - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()

    delivery = asyncio.create_task(deliver())
    last = 0.0
    try:
        while data := await reader.read(CHUNK):
            last = direction.arrival_time(len(data), last)
            queue.put_nowait((last, data))
    finally:
        queue.put_nowait(None)
        with contextlib.suppress(Exception):
            await delivery
        with contextlib.suppress(Exception):  # pass the half-close on, after the data
            writer.write_eof()


class LinkEmulator:
    """Relays ``listen`` -> ``target`` through an emulated link, on a background thread."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], spec: LinkSpec) -> None:
        self.listen, self.target, self.spec = listen, target, spec
        self._up, self._down = _Direction(spec), _Direction(spec)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="link-emulator", daemon=True)

    def start(self) -> LinkEmulator:
        self._thread.start()
        self._ready.wait(10)
        if self._server is None:
            raise RuntimeError(f"link emulator could not listen on {self.listen}")
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, *self.listen)
            )
        finally:
            self._ready.set()
        if self._server is not None:
            self._loop.run_forever()
            self._server.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pump(client_r, server_w, self._up),
            _pump(server_r, client_w, self._down),
            return_exceptions=True,
        )
        for writer in (server_w, client_w):
            writer.close()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.link_emulator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (default 20)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform jitter")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="0 = unlimited")
    args = parser.parse_args()
    spec = LinkSpec(args.delay_ms, args.jitter_ms, args.rate_mbit)
    emulator = LinkEmulator(args.listen, args.target, spec).start()
    print(f"relaying {args.listen} -> {args.target} over {spec.describe()}; Ctrl-C stops")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
