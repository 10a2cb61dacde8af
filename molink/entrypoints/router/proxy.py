"""The router's HTTP side: vLLM's OpenAI API on one port, forwarded to the heads.

* ``POST /v1/completions`` and ``/v1/chat/completions`` (streamed or not) go to the ready head
  with the least outstanding work (:class:`~.heads.HeadDirectory`). A head that can't be reached
  or answers 502/503/504 gets nothing more until it is ready again, and the request goes to the
  next head. A stream cut mid-way is continued on another head from the tokens already sent
  (:mod:`.stitching`); the client sees a pause, then the rest of the same stream.
* A head's 4xx (bad input) and 500 reach the client as they are.
* ``GET /v1/models`` from any ready head; ``/health``; ``/ready`` (503 with the cause while no
  head is ready); ``/metrics`` (``molink_router_*``); ``/swarm`` (this router and its heads).
* With API keys, every ``/v1`` path needs ``Authorization: Bearer <key>``; the heads get the
  router's own head key, never the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from vllm.logger import init_logger

from molink.entrypoints.router.heads import Head, HeadDirectory
from molink.entrypoints.router.stitching import Kind, StreamStitcher
from molink.telemetry import router_metrics as m
from molink.vllm_compat.auth import bearer_token_checker

logger = init_logger(__name__)

#: Statuses that mean the head, not the request, failed: the request goes to another head.
HEAD_FAILED_STATUSES = frozenset({502, 503, 504})
_ROUTES: dict[str, Kind] = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


class _ClientGone(Exception):
    """The client closed its connection: stop, and drop the head's request with it."""


@dataclass
class _HeadFailed:
    why: str


@dataclass
class _Answer:
    """The head answered with an error before any output: pass it on as it is."""

    status: int
    body: bytes
    content_type: str


def _error(status: int, message: str) -> web.Response:
    """An OpenAI-style error body."""
    kind = "ServiceUnavailableError" if status == 503 else "BadRequestError"
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


def _sse(chunk: dict[str, Any] | str) -> bytes:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Router:
    """Forwards OpenAI requests to the heads of a :class:`HeadDirectory`."""

    def __init__(
        self,
        directory: HeadDirectory,
        api_keys: list[str],
        head_api_key: str | None = None,
        read_timeout_s: float = 300.0,
    ) -> None:
        """``read_timeout_s``: a head that sends nothing for this long has failed."""
        self.directory = directory
        self._verify = bearer_token_checker(api_keys) if api_keys else None
        self._head_headers = {"Authorization": f"Bearer {head_api_key}"} if head_api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._follower: asyncio.Task | None = None
        self.url = ""

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/swarm", self._swarm)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._follower = asyncio.create_task(self.directory.run(self._session))

    async def _stop(self, app: web.Application) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self._session is not None:
            await self._session.close()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        guarded = self._verify is not None and request.path.startswith("/v1")
        if guarded and not self._verify(request.headers):  # type: ignore[misc]
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    # ------------------------------------------------------------------ plain routes
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.directory.ready_heads()
        if ready:
            return web.json_response({"ready": True, "heads": [h.url for h in ready]})
        return web.json_response(
            {"ready": False, "cause": self.directory.unavailable_cause()}, status=503
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        heads = list(self.directory.heads.values())
        ready = sum(h.ready for h in heads)
        m.HEADS.labels("ready").set(ready)
        m.HEADS.labels("not_ready").set(len(heads) - ready)
        m.OUTSTANDING.set(sum(h.outstanding for h in heads))
        return web.Response(
            body=generate_latest(m.ROUTER_REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _swarm(self, request: web.Request) -> web.Response:
        heads = [h.describe() for h in self.directory.heads.values()]
        router = {
            "role": "router",
            "url": self.url or None,
            "heads_ready": sum(h["ready"] for h in heads),
            "swarm_error": self.directory.swarm_error or None,
        }
        return web.json_response({"router": router, "heads": heads})

    async def _models(self, request: web.Request) -> web.Response:
        tried: set[str] = set()
        while (head := self.directory.pick(tried)) is not None:
            tried.add(head.url)
            try:
                async with self._http.get(
                    f"{head.url}/v1/models", headers=self._head_headers, timeout=self._timeout
                ) as resp:
                    body = await resp.read()
                    if resp.status not in HEAD_FAILED_STATUSES:
                        return web.Response(
                            body=body, status=resp.status, content_type="application/json"
                        )
                    self.directory.failed(head, f"HTTP {resp.status}")
            except (TimeoutError, aiohttp.ClientError) as e:
                self.directory.failed(head, f"unreachable ({type(e).__name__})")
        return _error(503, self.directory.unavailable_cause())

    @property
    def _http(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the router's app has not started"
        return self._session

    # ------------------------------------------------------------------ generation
    async def _generate(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        kind = _ROUTES[route]
        try:
            body = await request.json()
        except ValueError as e:
            m.REQUESTS.labels(route, "client_error").inc()
            return _error(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            m.REQUESTS.labels(route, "client_error").inc()
            return _error(400, "the request body must be a JSON object")
        if body.get("stream"):
            return await self._stream(request, route, kind, body)
        return await self._unary(route, body)

    async def _unary(self, route: str, body: dict[str, Any]) -> web.Response:
        """Forward a whole request; a failed head's request is sent again to the next one."""
        tried: set[str] = set()
        while (head := self.directory.pick(tried)) is not None:
            tried.add(head.url)
            head.outstanding += 1
            head.sent += 1
            try:
                async with self._http.post(
                    head.url + route, json=body, headers=self._head_headers, timeout=self._timeout
                ) as resp:
                    data = await resp.read()
                    if resp.status not in HEAD_FAILED_STATUSES:
                        outcome = "ok" if resp.status < 400 else "client_error"
                        m.REQUESTS.labels(route, outcome).inc()
                        return web.Response(
                            body=data, status=resp.status, content_type=resp.content_type
                        )
                    why = f"HTTP {resp.status}"
            except (TimeoutError, aiohttp.ClientError) as e:
                why = f"unreachable ({type(e).__name__}: {e})"[:300]
            finally:
                head.outstanding -= 1
            self._head_failed(head, why)
            m.RESUMED.labels("restart").inc()
        m.REQUESTS.labels(route, "unavailable").inc()
        return _error(503, self.directory.unavailable_cause())

    async def _stream(
        self, request: web.Request, route: str, kind: Kind, body: dict[str, Any]
    ) -> web.StreamResponse:
        """Forward a stream; when its head fails, go on with another head (see module doc)."""
        stitcher = StreamStitcher(kind, body)
        out = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        tried: set[str] = set()
        lost_at: float | None = None
        try:
            while True:
                head = self.directory.pick(tried)
                if head is None:
                    why = self.directory.unavailable_cause()
                    if not out.prepared:
                        m.REQUESTS.labels(route, "unavailable").inc()
                        return _error(503, why)
                    await self._fail_stream(out, route, f"the stream's head failed and {why}")
                    return out
                tried.add(head.url)
                if not stitcher.sent_any:
                    first = stitcher.first_request()
                    pump = self._pump(request, out, head, route, first, stitcher.from_head, lost_at)
                    result = await self._relay(head, pump)
                elif stitcher.can_continue():
                    rest, path = stitcher.continuation(), "/v1/completions"
                    rewrite = stitcher.from_continuation
                    pump = self._pump(request, out, head, path, rest, rewrite, lost_at)
                    result = await self._relay(head, pump)
                else:
                    await self._fail_stream(out, route, "the stream's head failed mid-stream")
                    return out
                if isinstance(result, _Answer):
                    m.REQUESTS.labels(route, "client_error").inc()
                    return web.Response(
                        body=result.body, status=result.status, content_type=result.content_type
                    )
                if isinstance(result, _HeadFailed) and not stitcher.finished:
                    self._head_failed(head, result.why)
                    if stitcher.sent_any:
                        head.resumed_from += 1
                    m.RESUMED.labels("continue" if stitcher.sent_any else "restart").inc()
                    lost_at = time.monotonic()
                    continue
                await out.write(_sse("[DONE]"))
                await out.write_eof()
                m.REQUESTS.labels(route, "ok").inc()
                return out
        except (_ClientGone, ConnectionResetError):
            return out

    async def _relay(
        self, head: Head, streaming: Coroutine[Any, Any, _HeadFailed | _Answer | None]
    ) -> _HeadFailed | _Answer | None:
        """Run ``streaming`` (:meth:`_pump` of one of ``head``'s answers); None when it ended.

        Given up as failed when the head stops accepting connections meanwhile (a head shutting
        down may leave its streams open without sending anything more).
        """
        head.outstanding += 1
        head.sent += 1
        gone = head.gone
        pump = asyncio.ensure_future(streaming)
        watch = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: drop the head's request too
            pump.cancel()
            raise
        finally:
            watch.cancel()
            head.outstanding -= 1
        if pump.done():
            return pump.result()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        return _HeadFailed("the head accepts no connections any more (it exited or is exiting)")

    async def _pump(
        self,
        request: web.Request,
        out: web.StreamResponse,
        head: Head,
        path: str,
        body: dict[str, Any],
        rewrite: Callable[[dict[str, Any]], dict[str, Any]],
        lost_at: float | None,
    ) -> _HeadFailed | _Answer | None:
        """Stream one head's answer to the client through ``rewrite``; None when it ended."""
        try:
            async with self._http.post(
                head.url + path, json=body, headers=self._head_headers, timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    data = await resp.read()
                    if resp.status in HEAD_FAILED_STATUSES:
                        return _HeadFailed(f"HTTP {resp.status}")
                    if out.prepared:  # a continuation refused: nothing sensible to retry
                        why = f"HTTP {resp.status} for the continuation: {data[:200]!r}"
                        return _HeadFailed(why)
                    return _Answer(resp.status, data, resp.content_type)
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return None
                    chunk = json.loads(data)
                    if "error" in chunk and not chunk.get("choices"):
                        return _HeadFailed(f"error from the head: {chunk['error']}"[:300])
                    if any(c.get("finish_reason") == "abort" for c in chunk.get("choices") or []):
                        # vLLM aborts running requests when its server shuts down (SIGTERM).
                        return _HeadFailed("the head aborted the request (shutting down)")
                    rewritten = rewrite(chunk)
                    if not rewritten:
                        continue
                    if not out.prepared:
                        await out.prepare(request)
                    if lost_at is not None:
                        m.PAUSE_SECONDS.observe(time.monotonic() - lost_at)
                        lost_at = None
                    try:
                        await out.write(_sse(rewritten))
                    except (ConnectionResetError, RuntimeError) as e:
                        raise _ClientGone from e
                return _HeadFailed("the stream ended without [DONE]")
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            return _HeadFailed(f"{type(e).__name__}: {e}"[:300])

    def _head_failed(self, head: Head, why: str) -> None:
        m.HEAD_FAILURES.inc()
        self.directory.failed(head, why)

    async def _fail_stream(self, out: web.StreamResponse, route: str, why: str) -> None:
        """End a stream that can't go on: an error event, then ``[DONE]``."""
        logger.warning("A stream could not be finished: %s", why)
        m.REQUESTS.labels(route, "failed").inc()
        await out.write(
            _sse({"error": {"message": why, "type": "ServiceUnavailableError", "code": 503}})
        )
        await out.write(_sse("[DONE]"))
        await out.write_eof()
