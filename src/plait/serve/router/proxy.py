"""Forwarding completions to replicas, and carrying them over to another replica when one dies.

A whole (non-streamed) completion whose replica fails is simply sent again: nothing reached the
client yet, and a request's tokens depend only on its prompt, settings and seed. A stream asks its
replica for token ids beside the text (plait's `plait.token_ids` extension); when the replica
fails, the rest goes to another one with `plait.resume` = the tokens already forwarded, per
unfinished prompt. That replica replays them (same draws of a seeded generator) and continues, so
the client reads one stream with the tokens of an undisturbed run, under one id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from plait.serve.api import DISCONNECT_POLL_S, error
from plait.serve.router.config import RouterConfig
from plait.serve.router.metrics import RouterMetrics
from plait.serve.router.replicas import NoReplicaError, Replica, ReplicaSet

log = logging.getLogger(__name__)

ACQUIRE_TIMEOUT_S = 300.0  # a request waits this long for a ready replica (a cold start included)
RESUME_RETRY_S = 0.2  # the rest of a stream, refused by every replica as too busy, is sent again after this
_PASS_HEADERS = ("content-type", "retry-after")


def _prompts(prompt: Any) -> list[Any] | None:
    """The request's prompts as a list (one item per choice), or None if the shape is not one
    the API takes (the replica then answers with the error)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        return list(prompt)
    return None


class Proxy:
    def __init__(self, replicas: ReplicaSet, client: httpx.AsyncClient, config: RouterConfig,
                 metrics: RouterMetrics):
        self.replicas, self.client, self.config, self.metrics = replicas, client, config, metrics

    def _passthrough(self, resp: httpx.Response, content: bytes) -> Response:
        headers = {k: v for k, v in resp.headers.items() if k.lower() in _PASS_HEADERS}
        return Response(content, status_code=resp.status_code, headers=headers)

    async def _acquire(self, full: Collection[int] = ()) -> Replica:
        return await self.replicas.acquire(ACQUIRE_TIMEOUT_S, exclude=full)

    def _another_has_room(self, r: Replica, full: set[int]) -> bool:
        """After replica `r` answered 429: whether another ready replica has not (yet)."""
        full.add(r.id)
        if self.replicas.has_ready(exclude=full):
            self.metrics.busy_retries.inc()
            return True
        return False

    async def whole(self, body: bytes, request: Request) -> Response:
        """A non-streamed completion (or any body the router does not look into)."""
        self.metrics.requests.labels(kind="whole").inc()
        failed_at: float | None = None
        full: set[int] = set()  # replicas that answered 429: their queues are full
        attempts = 0
        while attempts < self.config.max_attempts:
            try:
                r = await self._acquire(full)
            except NoReplicaError as exc:
                return error(503, f"no replica can serve this request: {exc}", type_="server_error",
                             code="no_replica")
            if failed_at is not None:
                self.metrics.record_failover(failed_at, "whole")
                failed_at = None
            try:
                call = asyncio.ensure_future(self.client.post(
                    f"{r.url}/v1/completions", content=body,
                    headers={**self.replicas.headers, "content-type": "application/json"}))
                while not call.done():
                    # The replica cancels a request whose client went: tell it by hanging up.
                    await asyncio.wait({call}, timeout=DISCONNECT_POLL_S)
                    if not call.done() and await request.is_disconnected():
                        call.cancel()
                        return Response(status_code=499)
                resp = call.result()
                if _engine_down(resp.status_code, resp.content):
                    raise _ReplicaDown(f"replica {r.id}'s engine process died")
            except (httpx.TransportError, _ReplicaDown) as exc:
                self.replicas.suspect(r, exc)
                self.metrics.retries.inc()
                failed_at = failed_at or time.monotonic()
                attempts += 1
                continue
            finally:
                self.replicas.release(r)
            if resp.status_code == 429 and self._another_has_room(r, full):
                continue
            return self._passthrough(resp, resp.content)
        return error(502, f"the request failed on {self.config.max_attempts} replicas in a row",
                     type_="server_error", code="replicas_failed")

    async def stream(self, body: dict[str, Any]) -> Response:
        """A streamed completion: the first replica's answer decides the status; a failure after
        that continues on another replica inside the same event stream."""
        self.metrics.requests.labels(kind="stream").inc()
        prompts = _prompts(body.get("prompt"))
        wants_ids = isinstance(body.get("plait"), dict) and body["plait"].get("token_ids") is True
        usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
        first = {**body, "plait": {"token_ids": True}, "stream_options": {"include_usage": False}}
        if prompts is None or isinstance(body.get("plait"), dict) and "resume" in body["plait"]:
            first = body  # malformed for the API (or already a resumption): the replica answers as it is
        opened = await self._open(first)
        if isinstance(opened, Response):
            return opened
        r, resp = opened
        if resp.status_code != 200 or first is body:
            return await self._relay(r, resp)
        state = _StreamState(prompts, body, wants_ids, usage)
        return StreamingResponse(self._events(state, r, resp), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _open(self, body: dict[str, Any], resuming: bool = False) -> tuple[Replica, httpx.Response] | Response:
        """Send `body` to a replica, trying others while connections fail. `resuming`: the rest
        of a stream, whose failover is counted at its first event instead.

        A replica whose queue is full (429) passes the request on to another; when all are full, a
        new request gets the 429, while the rest of a stream waits for room (it must not be lost)."""
        failed_at = None
        full: set[int] = set()  # replicas that answered 429
        attempts = 0
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        while attempts < self.config.max_attempts:
            try:
                r = await self._acquire(full)
            except NoReplicaError as exc:
                return error(503, f"no replica can serve this request: {exc}", type_="server_error",
                             code="no_replica")
            try:
                req = self.client.build_request("POST", f"{r.url}/v1/completions", json=body,
                                                headers=self.replicas.headers)
                resp = await self.client.send(req, stream=True)
                if resp.status_code in (429, 503):
                    content = await resp.aread()
                    await resp.aclose()
                    if _engine_down(resp.status_code, content):
                        raise _ReplicaDown(f"replica {r.id}'s engine process died")
                    resp = httpx.Response(resp.status_code, headers=resp.headers, content=content, request=req)
            except (httpx.TransportError, _ReplicaDown) as exc:
                self.replicas.release(r)
                self.replicas.suspect(r, exc)
                self.metrics.retries.inc()
                failed_at = failed_at or time.monotonic()
                attempts += 1
                continue
            except BaseException:
                self.replicas.release(r)
                raise
            if resp.status_code == 429:
                if self._another_has_room(r, full):
                    self.replicas.release(r)
                    continue
                if resuming and time.monotonic() < deadline:
                    self.replicas.release(r)
                    await asyncio.sleep(RESUME_RETRY_S)
                    full.clear()
                    continue
            if failed_at is not None and not resuming:
                self.metrics.record_failover(failed_at, "stream")
            return r, resp
        return error(502, f"the request failed on {self.config.max_attempts} replicas in a row",
                     type_="server_error", code="replicas_failed")

    async def _relay(self, r: Replica, resp: httpx.Response) -> Response:
        """The replica's answer as it is (an error, or a stream the router does not follow)."""
        if resp.status_code != 200 or "text/event-stream" not in resp.headers.get("content-type", ""):
            try:
                content = await resp.aread()
            except httpx.TransportError as exc:
                self.replicas.suspect(r, exc)
                content = b""
            finally:
                await resp.aclose()
                self.replicas.release(r)
            return self._passthrough(resp, content)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                self.replicas.release(r)
        return StreamingResponse(relay(), media_type="text/event-stream")

    async def _events(self, s: _StreamState, r: Replica, resp: httpx.Response) -> AsyncIterator[str]:
        attempts = 1
        while True:
            failure: BaseException | None = None
            try:
                buffer = ""
                async for text in resp.aiter_text():
                    buffer += text
                    *events, buffer = buffer.split("\n\n")
                    out = []
                    for event in events:
                        line = s.take(event)
                        if line:
                            out.append(line)
                        if s.replica_down:
                            break
                    if s.failed_at is not None and out:
                        self.metrics.record_failover(s.failed_at, "stream")
                        s.failed_at = None
                    if out:
                        yield "".join(out)
                    if s.done or s.replica_down:
                        break
            except (httpx.TransportError, ValueError, KeyError, IndexError) as exc:
                failure = exc  # a broken connection, or a broken event (the replica died writing it)
            finally:
                await resp.aclose()
                self.replicas.release(r)
            if s.done or s.error:
                break
            if s.all_finished:
                break  # only [DONE] was missing
            if s.replica_down:
                s.replica_down = False
                failure = failure or _ReplicaDown(f"replica {r.id}'s engine process died")
            failure = failure or RuntimeError("the stream ended early")
            self.replicas.suspect(r, failure)
            s.failed_at = s.failed_at or time.monotonic()
            if attempts >= self.config.max_attempts:
                yield s.error_event(f"the stream failed on {attempts} replicas in a row")
                return
            attempts += 1
            self.metrics.retries.inc()
            opened = await self._open(s.rest(), resuming=True)
            if isinstance(opened, Response):
                yield s.error_event(f"no replica could continue the stream ({opened.status_code})")
                return
            r, resp = opened
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                await resp.aclose()
                self.replicas.release(r)
                yield s.error_event(f"a replica refused to continue the stream: {body}")
                return
        if s.error:
            return
        if s.usage:
            yield f"data: {json.dumps(s.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"


class _ReplicaDown(Exception):
    """A replica answered, but its engine process had died: like a broken connection, the
    request moves to another replica."""


def _engine_down(status: int, content: bytes) -> bool:
    if status != 503:
        return False
    try:
        return json.loads(content)["error"]["code"] == "engine_down"
    except (ValueError, KeyError, TypeError):
        return False


class _StreamState:
    """What of a stream reached the client: per choice, its tokens and whether it finished."""

    def __init__(self, prompts: list[Any], body: dict[str, Any], wants_ids: bool, usage: bool):
        self.prompts, self.body, self.wants_ids, self.usage = prompts, body, wants_ids, usage
        n = len(prompts)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.prompt_tokens = [0] * n
        self.finished = [False] * n
        self.index = list(range(n))  # the current replica's choice index → the client's
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.done = False
        self.error = False
        self.replica_down = False  # the replica said its engine died: continue elsewhere
        self.failed_at: float | None = None

    @property
    def all_finished(self) -> bool:
        return all(self.finished)

    def take(self, event: str) -> str | None:
        """One event from the replica → the line for the client (None for nothing to send)."""
        event = event.strip()
        if not event.startswith("data: "):
            return None
        data = event[6:]
        if data == "[DONE]":
            self.done = True
            return None
        obj = json.loads(data)
        if "error" in obj and obj["error"].get("code") == "engine_down":
            self.replica_down = True  # not the request's fault: it continues on another replica
            return None
        if "error" in obj:  # the replica's engine failed this request: that is the answer
            self.error = True
            return f"{event}\n\n"
        if not obj.get("choices"):
            return None  # a usage chunk: the router sends its own, over every replica's part
        for choice in obj["choices"]:
            i = self.index[choice["index"]]
            ext = choice.pop("plait", None) or {}
            self.tokens[i] += ext.get("token_ids", [])
            self.prompt_tokens[i] = ext.get("prompt_tokens", self.prompt_tokens[i])
            if choice.get("finish_reason") is not None:
                self.finished[i] = True
            choice["index"] = i
            if self.wants_ids:
                choice["plait"] = {"token_ids": ext.get("token_ids", [])}
        if not any(c["text"] or c.get("finish_reason") or self.wants_ids for c in obj["choices"]):
            return None  # held-back text (a partial character, a possible stop string)
        obj["id"], obj["created"] = self.id, self.created
        return f"data: {json.dumps(obj)}\n\n"

    def rest(self) -> dict[str, Any]:
        """The request for the unfinished choices, resuming after what was sent."""
        self.index = [i for i, done in enumerate(self.finished) if not done]
        return {**self.body, "prompt": [self.prompts[i] for i in self.index],
                "plait": {"token_ids": True, "resume": [self.tokens[i] for i in self.index]},
                "stream_options": {"include_usage": False}}

    def usage_chunk(self) -> dict[str, Any]:
        done = sum(len(t) for t in self.tokens)
        prompt = sum(self.prompt_tokens)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.body.get("model"),
                "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": done,
                                         "total_tokens": prompt + done}}

    def error_event(self, message: str) -> str:
        self.error = True
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return f"data: {json.dumps(body)}\n\n"
