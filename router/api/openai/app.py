"""The OpenAI-compatible HTTP API: a FastAPI app over the router's front door.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET/HEAD /health (200 SERVING only when ready, else 503 NOT_SERVING).
A request becomes one native request per choice (convert.py), each validated and admitted by the
same `FrontDoor` as gRPC (so the same limits, messages and batcher); its answer is built from the
choices' stream messages (responses.py), whole or as server-sent events. A client that disconnects
cancels its choices, as on gRPC. Errors use OpenAI's JSON shape: 400 bad input, 404 unknown model,
429 overloaded, 503 not ready; 401 (no valid API key) comes from the gate in front of every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from http import HTTPStatus
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from shardline.router.api.admission import FrontDoor, Refused
from shardline.router.api.auth import ANONYMOUS, Tenant
from shardline.router.api.openai.body_errors import describe
from shardline.router.api.openai.convert import BadField, Plan, chat_plan, completion_plan, http_param, http_wording
from shardline.router.api.openai.responses import ChoiceText, Shape, error_body, status_of, total_usage
from shardline.router.api.openai.schema import ChatBody, CompletionBody
from shardline.common.tool_calls import call_id

Admitted = list[tuple[int, object, object]]  # (choice index, RouterRequest, Batcher)


def error_response(status: int, message: str, kind: str, param: str | None, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def refusal_response(refused: Refused, names: dict[str, str]) -> JSONResponse:
    status, kind, code = status_of(refused.code)
    return error_response(status, http_wording(refused.message, names), kind, http_param(refused.field, names), code)


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not parse, as OpenAI's 400 in this server's words (body_errors.py)."""
    message, param, code = describe(exc.errors())
    return error_response(400, message, "invalid_request_error", param, code)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        code = "http_error"
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, code)


class OpenAIApi:
    """The routes; `ready()` says whether the shards are serving (for /health)."""

    def __init__(self, door: FrontDoor, ready: Callable[[], bool]) -> None:
        self.door, self.ready = door, ready
        self.model = door.cfg.model_name

    async def health(self) -> JSONResponse:
        """GET/HEAD: 200 {"status": "SERVING"} or 503 {"status": "NOT_SERVING"}, nothing else (the
        reason stays in the logs and on the authenticated APIs)."""
        if self.ready():
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    async def models(self) -> JSONResponse:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "shardline",
                "max_model_len": self.door.limits.max_total_tokens}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, body: CompletionBody, request: Request):
        cfg = self.door.cfg
        return await self._serve(body.model, lambda: completion_plan(body, cfg.max_concurrent_requests,
                                                                     cfg.security.max_n), request, chat=False)

    async def chat(self, body: ChatBody, request: Request):
        cfg = self.door.cfg
        return await self._serve(body.model, lambda: chat_plan(body, cfg.max_concurrent_requests, cfg.security.max_n),
                                 request, chat=True)

    async def _serve(self, model: str | None, make_plan: Callable[[], Plan], request: Request, chat: bool):
        if model is not None and model != self.model:
            return error_response(404, f"the model {model!r} does not exist; this server serves {self.model!r}",
                                  "invalid_request_error", "model", "model_not_found")
        try:
            plan = make_plan()
        except BadField as bad:
            return error_response(400, str(bad), "invalid_request_error", bad.param, bad.code)
        try:
            admitted = await self._admit(plan, getattr(request.state, "tenant", ANONYMOUS))
        except Refused as refused:
            return refusal_response(refused, plan.names)
        shape = Shape(chat, self.model, admitted[0][1].request_id, self._token_text, plan.tools)
        headers = {"x-request-id": ",".join(req.request_id for _, req, _ in admitted)}
        if plan.stream:
            return StreamingResponse(self._sse(plan, admitted, shape), media_type="text/event-stream",
                                     headers=headers)
        return await self._whole(plan, admitted, shape, request, headers)

    def _token_text(self, token_id: int) -> str:
        return self.door.tokenizer.decode([token_id])

    async def _admit(self, plan: Plan, tenant: Tenant) -> Admitted:
        """Validates each distinct prompt once, then admits every choice for `tenant` (named by the
        gate, router/api/openai/gate.py); all or none."""
        valid: dict[int, object] = {}
        for choice in plan.choices:
            if choice.prompt_index not in valid:
                valid[choice.prompt_index] = await self.door.check(choice.request)
        admitted: Admitted = []
        try:
            for choice in plan.choices:
                req, batcher = self.door.admit(valid[choice.prompt_index], seed=choice.seed, api="http", tenant=tenant)
                admitted.append((choice.index, req, batcher))
        except Refused:
            for _, req, batcher in admitted:
                batcher.cancel(req)
            raise
        return admitted

    async def _whole(self, plan: Plan, admitted: Admitted, shape: Shape, request: Request,
                     headers: dict[str, str]) -> JSONResponse:
        choices = [ChoiceText(index) for index, _, _ in admitted]
        runs = [asyncio.ensure_future(self._collect(c, req, batcher)) for c, (_, req, batcher) in zip(choices, admitted)]
        gathered = asyncio.gather(*runs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([gathered, gone], return_when=asyncio.FIRST_COMPLETED)
            if not gathered.done():  # the client went away: its choices leave the batch
                return error_response(499, "the client disconnected", "cancelled", None, "cancelled")
            gathered.result()
        except Refused as refused:
            return refusal_response(refused, plan.names)
        finally:
            for task in (*runs, gathered, gone):
                task.cancel()
        prompts = {choice.prompt_index: c for choice, c in zip(plan.choices, choices)}
        return JSONResponse(shape.whole(choices, plan.logprobs, total_usage(choices, prompts)), headers=headers)

    async def _collect(self, choice: ChoiceText, req, batcher) -> None:
        async with contextlib.aclosing(self.door.events(req, batcher, api="http")) as events:
            async for message in events:
                choice.add(message)

    async def _sse(self, plan: Plan, admitted: Admitted, shape: Shape) -> AsyncIterator[str]:
        """Server-sent events: chunks of every choice as their tokens come, usage, [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(self._pump(index, req, batcher, queue)) for index, req, batcher in admitted]
        choices = {index: ChoiceText(index) for index, _, _ in admitted}
        try:
            if shape.chat:
                for index in choices:
                    yield _event(shape.chunk(index, "", None, None, role=True, with_usage=plan.include_usage))
            async for event in _drain(queue, len(pumps)):
                if isinstance(event, Refused):
                    _, kind, code = status_of(event.code)
                    yield _event(error_body(http_wording(event.message, plan.names), kind,
                                            http_param(event.field, plan.names), code))
                    break
                index, message = event
                for chunk in _chunks(shape, plan, choices[index], message):
                    yield _event(chunk)
            else:
                if plan.include_usage:
                    prompts = {c.prompt_index: choices[c.index] for c in plan.choices}
                    yield _event(shape.usage_chunk(total_usage(list(choices.values()), prompts)))
            yield "data: [DONE]\n\n"
        finally:
            for pump in pumps:
                pump.cancel()

    async def _pump(self, index: int, req, batcher, queue: asyncio.Queue) -> None:
        try:
            async with contextlib.aclosing(self.door.events(req, batcher, api="http")) as events:
                async for message in events:
                    queue.put_nowait((index, message))
        except Refused as refused:
            queue.put_nowait(refused)
        queue.put_nowait(None)


def _chunks(shape: Shape, plan: Plan, choice: ChoiceText, message) -> list[dict]:
    """The chunks one native message of a choice becomes (none for held-back text)."""
    if plan.tools is not None and shape.chat:
        return _tool_chunks(shape, plan, choice, message)
    choice.add(message)
    logprobs = None
    if plan.logprobs:
        logprobs = shape.logprobs([message.token_id], [message.logprob], [choice.offsets[-1]],
                                  [choice.alternatives[-1]])
    out = []
    if message.text or logprobs is not None:
        out.append(shape.chunk(choice.index, message.text, None, logprobs, with_usage=plan.include_usage))
    if choice.finish_reason:
        text = None if shape.chat else ""
        out.append(shape.chunk(choice.index, text, choice.finish_reason, None, with_usage=plan.include_usage))
    return out


def _tool_chunks(shape: Shape, plan: Plan, choice: ChoiceText, message) -> list[dict]:
    """Chat chunks with tools in play. A named call streams its arguments as they come (the first
    delta carries its id and name); required and auto hold the output and, at its end, send the
    content (if any) and one delta per call with its whole arguments."""
    choice.add(message)
    usage, out = plan.include_usage, []
    if plan.tools.mode == "named":
        if not choice.call_id and (message.text or choice.finish_reason):
            choice.call_id = call_id()
            out.append(shape.tool_chunk(choice.index, [{"index": 0, "id": choice.call_id, "type": "function",
                                                        "function": {"name": plan.tools.name, "arguments": ""}}], usage))
        if message.text:
            out.append(shape.tool_chunk(choice.index, [{"index": 0, "function": {"arguments": message.text}}], usage))
        if choice.finish_reason:
            finish = "length" if choice.finish_reason == "length" else "tool_calls"
            out.append(shape.chunk(choice.index, None, finish, None, with_usage=usage))
        return out
    if not choice.finish_reason:
        return out
    content, calls = shape.answer(choice)
    if content:
        out.append(shape.chunk(choice.index, content, None, None, with_usage=usage))
    if calls:
        out.append(shape.tool_chunk(choice.index, [c.as_openai(i) for i, c in enumerate(calls)], usage))
    out.append(shape.chunk(choice.index, None, "tool_calls" if calls else choice.finish_reason, None,
                           with_usage=usage))
    return out


async def _drain(queue: asyncio.Queue, producers: int) -> AsyncIterator[object]:
    """The queue's items until every producer put its None."""
    while producers:
        item = await queue.get()
        if item is None:
            producers -= 1
        else:
            yield item


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(door: FrontDoor, ready: Callable[[], bool]) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over `door`."""
    api = OpenAIApi(door, ready)
    app = FastAPI(title="shardline (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/health", api.health, methods=["GET", "HEAD"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    return app
