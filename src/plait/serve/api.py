"""The OpenAI-compatible HTTP API: /v1/completions, /v1/models, /health, /metrics.

Every refusal is an OpenAI-style error body, `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status, and leaves the server serving: 400 for malformed or invalid requests, 401
without the API key, 404 for an unknown model or route, 429 with `Retry-After` when the queue is
full. A client that disconnects (streaming or not) has its request cancelled, freeing its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plait.errors import EngineDeadError, RequestError, ServerBusyError
from plait.serve.async_engine import AsyncEngine, Handle
from plait.serve.engine_process import ProcessEngine
from plait.serve.protocol import CompletionRequest

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends (done, failed or the
    client gone), so an abandoned request never keeps its slot."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _RequireKey:
    """Plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps `receive` and so
    hides a client's disconnect from the handlers): 401 unless `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str, on_refuse: Callable[[], None]):
        self.app, self._expected, self._on_refuse = app, f"Bearer {api_key}".encode(), on_refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                self._on_refuse()
                response = error(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def guard_api(app: FastAPI, api_key: str | None, on_refuse: Callable[[], None] = lambda: None) -> None:
    """What every plait HTTP app shares: with `api_key`, a 401 (and `on_refuse()`) for a request
    without `Authorization: Bearer KEY`; HTTP and validation errors as OpenAI-style bodies."""
    if api_key is not None:
        app.add_middleware(_RequireKey, api_key=api_key, on_refuse=on_refuse)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return error(400, str(exc))


def create_app(engine: AsyncEngine | ProcessEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """A FastAPI app serving `engine` (on a thread of this process, or in a process of its own)
    under `model_name`; with `api_key`, every request must carry `Authorization: Bearer <api_key>`.
    The app starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="plait", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = engine.metrics
    context = engine.engine.context
    created = int(time.time())

    guard_api(app, api_key, on_refuse=lambda: metrics.rejected.labels(status="401").inc())

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error(503, "the engine is not running", type_="server_error")
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "plait", "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            metrics.rejected.labels(status="400").inc()
            return error(400, f"the request body is not valid JSON: {exc}")
        try:
            req = CompletionRequest.parse(body)
            if req.model != model_name:
                metrics.rejected.labels(status="404").inc()
                return error(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                             param="model", code="model_not_found")
            params = req.sampling_params()
            prompts = [engine.engine.encode(p) for p in req.prompts()]
            for ids in prompts:
                params.check(len(ids), context)
            resume = [engine.engine.check_resume(r, params) for r in req.resume_ids(len(prompts))]
        except RequestError as exc:
            metrics.rejected.labels(status="400").inc()
            return error(400, str(exc), param=exc.param)
        queue: asyncio.Queue = asyncio.Queue()
        handles: list[Handle] = []
        try:
            for i, ids in enumerate(prompts):
                handles.append(engine.submit(ids, params, queue, tag=i, resume=resume[i]))
        except EngineDeadError as exc:
            for h in handles:
                engine.abort(h)
            metrics.rejected.labels(status="503").inc()
            return error(503, str(exc), type_="server_error", code="engine_down")
        except ServerBusyError as exc:
            for h in handles:
                engine.abort(h)
            metrics.rejected.labels(status="429").inc()
            return error(429, str(exc), type_="rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(RETRY_AFTER_S)})

        def cancel_unfinished() -> None:
            for h in handles:
                engine.abort(h)

        reply = _Reply(f"cmpl-{uuid.uuid4().hex}", model_name, prompts, req.token_ids)
        if req.stream:
            return _EventStream(reply.events(queue, req.include_usage), cancel_unfinished)
        try:
            return await reply.whole(queue, request)
        finally:
            cancel_unfinished()

    return app


class _Reply:
    """Turns a request's engine outputs into an OpenAI completion, whole or as events."""

    def __init__(self, cid: str, model: str, prompts: list[list[int]], token_ids: bool = False):
        self.cid, self.model, self.created = cid, model, int(time.time())
        self.token_ids = token_ids  # plait's extension: token ids beside the text (see protocol)
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.n = len(prompts)
        self.completion_tokens = [0] * self.n

    def _usage(self) -> dict[str, int]:
        done = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def _body(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    async def events(self, queue: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        # Every chunk is this request's fixed fields around one choice: the fixed part is encoded
        # once. What is already queued when the client is ready goes out in one write.
        head = json.dumps(self._body([], None))
        head = head[:head.index('"choices": [') + len('"choices": [')]  # "choices" is the last key but one
        tail = '], "usage": null}' if include_usage else "]}"
        remaining = self.n
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            lines = []
            for index, out in batch:
                if isinstance(out, BaseException):
                    # engine_down: nothing wrong with the request, which a router may run elsewhere.
                    code = "engine_down" if isinstance(out, EngineDeadError) else None
                    body = {"error": {"message": f"generation failed: {out}", "type": "server_error",
                                      "param": None, "code": code}}
                    yield "".join(lines) + f"data: {json.dumps(body)}\n\n"
                    return
                self.completion_tokens[index] = out.completion_tokens
                if out.finished:
                    remaining -= 1
                if out.text or out.finished or self.token_ids:
                    choice = {"index": index, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
                    if self.token_ids:
                        choice["plait"] = {"token_ids": out.token_ids, "prompt_tokens": out.prompt_tokens}
                    lines.append(f"data: {head}{json.dumps(choice)}{tail}\n\n")
            if lines:
                yield "".join(lines)
        if include_usage:
            yield f"data: {json.dumps(self._body([], self._usage()))}\n\n"
        yield "data: [DONE]\n\n"

    async def whole(self, queue: asyncio.Queue, request: Request) -> Response:
        texts: list[list[str]] = [[] for _ in range(self.n)]
        ids: list[list[int]] = [[] for _ in range(self.n)]
        reasons: list[str | None] = [None] * self.n
        remaining = self.n
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while remaining:
            # Outputs may arrive every few milliseconds: look for a vanished client on a clock.
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    log.info("client of %s went away; request cancelled", self.cid)
                    return Response(status_code=499)
                next_check = time.monotonic() + DISCONNECT_POLL_S
            try:
                index, out = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                continue
            if isinstance(out, EngineDeadError):
                return error(503, f"generation failed: {out}", type_="server_error", code="engine_down")
            if isinstance(out, BaseException):
                return error(500, f"generation failed: {out}", type_="server_error")
            texts[index].append(out.text)
            ids[index] += out.token_ids
            self.completion_tokens[index] = out.completion_tokens
            if out.finished:
                reasons[index] = out.finish_reason
                remaining -= 1
        choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        if self.token_ids:
            for choice, tokens in zip(choices, ids):
                choice["plait"] = {"token_ids": tokens}
        return JSONResponse(self._body(choices, self._usage()))
