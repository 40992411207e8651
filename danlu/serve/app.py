"""The HTTP layer: an OpenAI-compatible API, the chat page, feedback routes; errors in OpenAI's shape.

`create_app(models, options)` builds the FastAPI app around already loaded models (tests build it around the tiny
checkpoint; `danlu serve` around the user's). Request bodies are read and validated here rather than by FastAPI's
automatic parsing, so that every bad input — malformed JSON, a wrong type, an oversized body — becomes a 4xx with
OpenAI's `{"error": {message, type, param, code}}` that the official clients understand, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from danlu import DanluError
from danlu.serve.chat import Outcome, Sampling, answer_chat, answer_text, with_date
from danlu.serve.feedback import FeedbackStore
from danlu.serve.memory import SHARED, CorrectionMemory, last_user_text, scope_of, with_memory
from danlu.serve.routing import ServedModel
from danlu.serve.sanitize import MAX_DEPTH, defuse_tree, json_depth, text_chars
from danlu.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    error_body,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
M = TypeVar("M", bound=BaseModel)


class DetectRequest(BaseModel):
    """POST /v1/detect: one text or up to 64."""

    input: str | Annotated[list[str], Field(max_length=64)]


@dataclass
class ServeOptions:
    api_key: str | None = None
    admin_key: str | None = None  # for /v1/admin/*: approving corrections for every user's memory
    feedback: FeedbackStore | None = None
    memory: CorrectionMemory | None = None
    date_prompt: bool = True  # tell the model today's date and time in a system message
    builtin_tools: bool = True  # execute get_date/calculator calls when the client defines no tools
    tool_rounds: int = 3
    max_tokens_limit: int | None = None  # default: the model's context length
    default_max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    # A request's text (contents, tools, …) above this many characters per context token is refused before any
    # tokenization: no tokenizer packs more into one token, so such a prompt cannot fit. Bounds the CPU any one
    # request can take from the others.
    max_chars_per_token: int = 16
    now: Callable[[], _dt.datetime] = field(default=_dt.datetime.now)
    detector: Any = None  # a danlu.detect.classifier.Detector (`--detector DIR`): enables POST /v1/detect


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers
    )


def create_app(models: list[ServedModel], options: ServeOptions | None = None) -> FastAPI:
    opts = options or ServeOptions()
    if not models:
        raise DanluError("create_app: no models to serve")
    registry = {m.name: m for m in models}
    if opts.feedback is not None and opts.memory is not None:
        for c in opts.feedback.corrections(latest_only=False):
            remember(opts.memory, c)
    # The OpenAPI document (clients, schemathesis) but no docs pages: those would load scripts from a CDN.
    app = FastAPI(title="danlu", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.models = registry
    app.state.options = opts

    # ---- errors ------------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return _error_response(APIError(404, f"no route {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        return _error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    # ---- auth --------------------------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        """Bearer key (API clients) or HTTP Basic with the key as password (the browser, for the page)."""
        if opts.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        if not given or not hmac.compare_digest(given.encode(), opts.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Basic realm="danlu", charset="UTF-8"'})  # fmt: skip

    def authorize_admin(request: Request) -> None:
        if opts.admin_key is None:
            raise APIError(403, "this server has no admin key (start it with --admin-key)", code="no_admin")
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), opts.admin_key.encode()
        ):
            raise APIError(401, "missing or wrong admin key (send Authorization: Bearer ADMIN_KEY)",
                           code="invalid_api_key")  # fmt: skip

    async def read_body(request: Request, schema: type[M], *, admin: bool = False) -> M:
        authorize_admin(request) if admin else authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > opts.max_body_bytes:
            raise APIError(413, f"request body over {opts.max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > opts.max_body_bytes:
                raise APIError(
                    413, f"request body over {opts.max_body_bytes} bytes", code="request_too_large"
                )
        return await asyncio.to_thread(parse_body, bytes(raw), schema)  # a large body must not stall the loop

    def pick(name: str) -> ServedModel:
        if name not in registry:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(registry)}", param="model",
                           code="model_not_found")  # fmt: skip
        return registry[name]

    def check_max_tokens(model: ServedModel, max_tokens: int | None, param: str) -> None:
        limit = opts.max_tokens_limit or model.context_length
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"{param} = {max_tokens} is over this server's limit of {limit}", param=param,
                           code="max_tokens_exceeded")  # fmt: skip

    def check_chars(model: ServedModel, *parts: Any, param: str = "messages") -> None:
        """Refuses a prompt that cannot fit the context, by its character count alone, before tokenizing it."""
        n, limit = sum(text_chars(p) for p in parts), model.context_length * opts.max_chars_per_token
        if n > limit:
            raise APIError(400, f"the prompt has {n} characters; model {model.name!r} has a context of "
                           f"{model.context_length} tokens", param=param, code="context_length_exceeded")  # fmt: skip

    def admit(model: ServedModel, streams: int) -> Any:
        """Room for a request's `streams` on the model's worker (released when the request ends), or a 429 with
        Retry-After when active + waiting streams would pass the worker's bound (a base and its adapters share
        one worker, so one bound). A worker without `reserve` admits everything."""
        reserve = getattr(model.worker, "reserve", None)
        if reserve is None:
            return None
        worker = model.worker
        if streams > worker.max_active + worker.max_queued:  # would never fit: waiting cannot help
            raise APIError(400, f"{streams} choices in one request; model {model.name!r} takes at most "
                           f"{worker.max_active + worker.max_queued} streams at once", param="n")  # fmt: skip
        ticket = reserve(streams)
        if ticket is None:
            wait = worker.retry_after()
            raise APIError(429, f"model {model.name!r} is busy: {worker.max_active} streams running and "
                           f"{worker.max_queued} waiting at most; retry in {wait} s", type_="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)})  # fmt: skip
        return ticket

    def check_prompt(model: ServedModel, n_prompt: int, param: str = "messages") -> None:
        if n_prompt >= model.context_length:
            raise APIError(400, f"the prompt is {n_prompt} tokens; model {model.name!r} has a context of "
                           f"{model.context_length} tokens", param=param, code="context_length_exceeded")  # fmt: skip

    # ---- meta routes -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        """Each model's streams and counters; 503 with status "error" once a model's engine process has exited (a
        load balancer or orchestrator then restarts the server)."""
        models = {
            m.name: {"active": m.worker.active, "queued": m.worker.queued, **m.worker.stats,
                     "engine": "exited" if getattr(m.worker, "gone", None) else "running"}
            for m in registry.values()
        }  # fmt: skip
        down = [name for name, info in models.items() if info["engine"] == "exited"]
        return JSONResponse(
            {"status": "error" if down else "ok", "models": models}, status_code=503 if down else 200
        )

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [m.card() for m in registry.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return pick(name).card()

    # ---- chat --------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await read_body(request, ChatCompletionRequest)
        model = pick(req.model)
        if len(req.messages) > opts.max_messages:
            raise APIError(400, f"at most {opts.max_messages} messages", param="messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        check_max_tokens(
            model, max_tokens, "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        )
        defuse = model.tokenizer.defuse
        raw_tools = [t.model_dump() for t in req.tools] if req.tools and req.tool_choice != "none" else None
        raw_messages = [m.plain(_as_is) for m in req.messages]
        check_chars(model, raw_messages, raw_tools)
        client_messages = defuse_tree(raw_messages, defuse)  # what is stored as feedback is safe to train on
        messages = list(client_messages)
        headers: dict[str, str] = {}
        scope = scope_of(req.user)
        if opts.memory is not None:
            memory = await asyncio.to_thread(opts.memory.recall, last_user_text(messages), scope)
            if memory is not None:
                messages = with_memory(messages, memory)
                headers["x-danlu-memory"] = f"{memory.score:.3f}"
        now = opts.now()
        if opts.date_prompt:
            messages = with_date(messages, now)
        # the one place: everything that reaches the template, client's or remembered, is defused the same way
        messages, client_tools = defuse_tree(messages, defuse), defuse_tree(raw_tools, defuse)
        try:
            rendered = await asyncio.to_thread(
                model.tokenizer.render_chat, messages, tools=client_tools, add_generation_prompt=True
            )
        except DanluError as e:
            raise APIError(400, str(e), param="messages") from None
        n_prompt = len(rendered[0])
        check_prompt(model, n_prompt)
        sampling = Sampling(
            max_tokens=max_tokens or min(opts.default_max_tokens, model.context_length - n_prompt),
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop,
            ignore_eos=req.ignore_eos,
        )  # fmt: skip
        ticket = admit(model, req.n)
        rid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def choice_events(i: int) -> AsyncIterator[tuple]:
            return answer_chat(
                model, messages, sampling, index=i, client_tools=client_tools,
                builtin_tools=opts.builtin_tools and client_tools is None and req.tool_choice != "none",
                tool_rounds=opts.tool_rounds, today=lambda: now.date(), resolve=pick,
            )  # fmt: skip

        async def store(i: int, out: Outcome) -> None:
            if req.store and opts.feedback is not None:
                meta = req.metadata or {}
                await asyncio.to_thread(
                    opts.feedback.record_response, rid, idx=i, model=out.model, messages=client_messages,
                    answer=out.content, conversation_id=meta.get("conversation_id"),
                    finish_reason=out.finish_reason, mean_logprob=out.mean_logprob,
                    params={"temperature": req.temperature, "top_p": req.top_p, "max_tokens": max_tokens,
                            "seed": req.seed, "tools": out.tool_results or None, "user": req.user},
                )  # fmt: skip

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _holding(ticket, _sse_chat(rid, created, model.name, req.n, choice_events, store, include_usage)),
                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"},
            )  # fmt: skip

        outcomes: list[tuple[Outcome, list[dict[str, Any]] | None]] = [None] * req.n  # type: ignore[list-item]

        async def run_choice(i: int) -> None:
            calls = None
            async for ev in choice_events(i):
                if ev[0] == "tool_calls":
                    calls = ev[1]
                elif ev[0] == "done":
                    outcomes[i] = (ev[1], calls)
                    await store(i, ev[1])

        try:
            await _unless_disconnected(request, asyncio.gather(*(run_choice(i) for i in range(req.n))))
        finally:
            _release(ticket)
        choices = []
        for i, (out, calls) in enumerate(outcomes):
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": out.content if not calls else (out.content or None),
            }
            if calls:
                msg["tool_calls"] = calls
            choice: dict[str, Any] = {"index": i, "message": msg, "finish_reason": out.finish_reason,
                                      "logprobs": _chat_logprobs(model, out) if req.logprobs else None}  # fmt: skip
            choices.append(choice)
        answered = outcomes[0][0].model
        body = {
            "id": rid, "object": "chat.completion", "created": created, "model": answered, "choices": choices,
            "usage": _usage([o for o, _ in outcomes]), "system_fingerprint": None,
        }  # fmt: skip
        return JSONResponse(body, headers=headers)

    # ---- plain completions -------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read_body(request, CompletionRequest)
        model = pick(req.model)
        check_max_tokens(model, req.max_tokens, "max_tokens")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = _prompt_list(req.prompt)
        tok = model.tokenizer
        bos = getattr(tok, "bos_id", None)
        prompt_ids = []
        for p in prompts:
            if isinstance(p, str):
                check_chars(model, p, param="prompt")
            ids = await asyncio.to_thread(tok.encode, p) if isinstance(p, str) else list(p)
            if any(not 0 <= t < tok.vocab_size for t in ids):
                raise APIError(400, f"token ids must be in [0, {tok.vocab_size})", param="prompt")
            if isinstance(p, str) and bos is not None:
                ids = [bos, *ids]
            if not ids:
                raise APIError(400, "empty prompt", param="prompt")
            check_prompt(model, len(ids), param="prompt")
            prompt_ids.append(ids)
        if len(prompts) * req.n > 64:
            raise APIError(400, "at most 64 choices (prompts × n) per request", param="n")
        sampling = Sampling(max_tokens=req.max_tokens or 16, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos)  # fmt: skip
        rid = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        jobs = [(k * req.n + i, prompts[k], prompt_ids[k]) for k in range(len(prompts)) for i in range(req.n)]
        ticket = admit(model, len(jobs))

        def echo_text(p: str | list[int]) -> str:
            return p if isinstance(p, str) else tok.decode(list(p))

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _holding(ticket, _sse_text(rid, created, model, jobs, sampling, include_usage,
                                           echo_text if req.echo else None)),
                media_type="text/event-stream", headers={"cache-control": "no-cache"},
            )  # fmt: skip
        outcomes: list[Outcome] = [None] * len(jobs)  # type: ignore[list-item]

        async def run_choice(idx: int, ids: list[int]) -> None:
            async for ev in answer_text(model, ids, sampling, idx):
                if ev[0] == "done":
                    outcomes[idx] = ev[1]

        try:
            await _unless_disconnected(
                request, asyncio.gather(*(run_choice(idx, ids) for idx, _, ids in jobs))
            )
        finally:
            _release(ticket)
        choices = []
        for idx, p, _ in jobs:
            out = outcomes[idx]
            text = (echo_text(p) if req.echo else "") + out.content
            lp = _text_logprobs(model, out) if req.logprobs is not None else None
            choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": out.finish_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model.name,
                             "choices": choices, "usage": _usage(outcomes)})  # fmt: skip

    # ---- feedback ----------------------------------------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        req = await read_body(request, FeedbackRequest)
        store = opts.feedback
        if store is None:
            raise APIError(
                400, "this server keeps no feedback (started with --no-feedback)", code="feedback_off"
            )
        if req.rating is None and req.correction is None:
            raise APIError(400, "give a rating (-1, 0, 1) and/or a correction", param="rating")
        try:
            if req.rating is not None:
                await asyncio.to_thread(store.rate, req.response_id, req.rating, req.index, req.comment)
            if req.correction is not None:
                if not req.correction.strip():
                    raise APIError(400, "correction is empty", param="correction")
                resp = await asyncio.to_thread(store.correct, req.response_id, req.correction, req.index)
                if opts.memory is not None:
                    await asyncio.to_thread(remember, opts.memory, resp)
        except KeyError as e:
            raise APIError(404, str(e.args[0]), param="response_id", code="response_not_found") from None
        return {"ok": True, "response_id": req.response_id, "index": req.index}

    # ---- AI-text detection (`danlu serve … --detector DIR`) ---------------------------------------------------------
    @app.post("/v1/detect", summary="P(machine) of texts, from the --detector classifier")
    async def detect(request: Request) -> dict[str, Any]:
        """`{"input": TEXT | [TEXT, …]}` → `{"data": [{index, p_machine, label, tokens, truncated}]}`; texts over the
        detector's max_tokens are scored on their first tokens (`truncated: true`)."""
        req = await read_body(request, DetectRequest)
        if opts.detector is None:
            raise APIError(
                404, "this server has no detector (start it with --detector DIR)", code="detector_off"
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or any(not t.strip() for t in texts):
            raise APIError(400, "input must be a non-empty text or a list of non-empty texts", param="input")
        try:
            rows = await asyncio.to_thread(opts.detector.detect, texts)
        except DanluError as e:
            raise APIError(400, str(e), param="input") from None
        return {"object": "list", "model": opts.detector.name,
                "data": [{"index": i, **r} for i, r in enumerate(rows)]}  # fmt: skip

    # ---- admin: which corrections every user's memory may use --------------------------------------------------
    @app.get("/v1/admin/corrections")
    async def list_corrections(request: Request) -> dict[str, Any]:
        authorize_admin(request)
        if opts.feedback is None:
            raise APIError(400, "this server keeps no feedback", code="feedback_off")
        rows = await asyncio.to_thread(opts.feedback.corrections, latest_only=False)
        data = [{"id": c["correction_id"], "response_id": c["id"], "index": c["idx"], "scope": c["scope"],
                 "approved": c["approved"], "question": last_user_text(c["messages"]), "answer": c["answer"],
                 "correction": c["correction"]} for c in rows]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/admin/corrections/{correction_id}/approve")
    async def approve_correction(correction_id: str, request: Request) -> dict[str, Any]:
        authorize_admin(request)
        if opts.feedback is None:
            raise APIError(400, "this server keeps no feedback", code="feedback_off")
        if not correction_id.isdigit() or len(correction_id) > 18:
            raise APIError(404, f"no correction {correction_id!r}", code="correction_not_found")
        try:
            c = await asyncio.to_thread(opts.feedback.approve, int(correction_id))
        except KeyError as e:
            raise APIError(404, str(e.args[0]), code="correction_not_found") from None
        if opts.memory is not None:
            await asyncio.to_thread(remember, opts.memory, c)
        return {"ok": True, "id": c["correction_id"], "approved": True}

    @app.get("/v1/feedback/stats")
    async def feedback_stats(request: Request) -> dict[str, Any]:
        authorize(request)
        if opts.feedback is None:
            raise APIError(400, "this server keeps no feedback", code="feedback_off")
        return await asyncio.to_thread(opts.feedback.stats)

    # ---- the page ----------------------------------------------------------------------------------------------
    @app.get("/")
    async def index(request: Request) -> Response:
        authorize(request)
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"cache-control": "no-cache"})  # fmt: skip

    @app.get("/static/{path:path}")
    async def static(path: str, request: Request) -> Response:
        authorize(request)
        target = safe_static_path(path)
        if target is None:
            raise APIError(404, f"no static file {path!r}", code="not_found")
        return FileResponse(target)

    _document_bodies(app, {("post", "/v1/chat/completions"): ChatCompletionRequest,
                           ("post", "/v1/completions"): CompletionRequest, ("post", "/v1/feedback"): FeedbackRequest,
                           ("post", "/v1/detect"): DetectRequest})  # fmt: skip
    return app


def _document_bodies(app: FastAPI, bodies: dict[tuple[str, str], type[BaseModel]]) -> None:
    """Puts the request models in the OpenAPI document. The routes parse their JSON off the event loop
    (`read_body`), so FastAPI cannot see the models; clients and schemathesis still need them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = generate()
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for (method, path), model in bodies.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            doc["paths"][path][method]["requestBody"] = {"required": True,
                                                         "content": {"application/json": {"schema": ref}}}  # fmt: skip
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _as_is(text: str) -> str:
    return text


def parse_body(raw: bytes, schema: type[M]) -> M:
    """JSON body → validated request, or an APIError 400 in OpenAI's shape (malformed, too deep, wrong types)."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"JSON body nested deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    if json_depth(data) > MAX_DEPTH:
        raise APIError(400, f"JSON body nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                       code="invalid_value") from None  # fmt: skip


def remember(memory: CorrectionMemory, correction: dict[str, Any]) -> None:
    """Puts a stored correction into the memory: in its maker's scope, and in the shared one once approved."""
    question = last_user_text(correction["messages"])
    memory.add(question, correction["correction"], correction.get("scope") or "anonymous")
    if correction.get("approved"):
        memory.add(question, correction["correction"], SHARED)


def safe_static_path(path: str) -> Path | None:
    """The file under STATIC_DIR that `path` names, or None: never a path outside the folder (.., links, abs)."""
    if "\x00" in path or "\\" in path:
        return None
    target = (STATIC_DIR / path).resolve()
    if not target.is_relative_to(STATIC_DIR) or not target.is_file():
        return None
    return target


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "empty prompt", param="prompt")
    return list(prompt)


def _usage(outcomes: list[Outcome]) -> dict[str, int]:
    # n choices share one prompt in OpenAI's accounting; tool rounds add their prompts
    prompt = max((o.prompt_tokens for o in outcomes), default=0)
    completion = sum(o.completion_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(model: ServedModel, t: int) -> str:
    return model.tokenizer.decode([t])


def _chat_logprobs(model: ServedModel, out: Outcome) -> dict[str, Any]:
    content = []
    for t, lp in zip(out.token_ids, out.logprobs):
        s = _token_text(model, t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
    return {"content": content}


def _text_logprobs(model: ServedModel, out: Outcome) -> dict[str, Any]:
    tokens = [_token_text(model, t) for t in out.token_ids]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": out.logprobs[: len(tokens)], "top_logprobs": None,
            "text_offset": offsets}  # fmt: skip


def _release(ticket: Any) -> None:
    if ticket is not None:
        ticket.release()


async def _holding(ticket: Any, body: AsyncIterator[str]) -> AsyncIterator[str]:
    """A streaming body that keeps its request's room on the worker (`admit`) until it ends or is abandoned."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        _release(ticket)


async def _unless_disconnected(request: Request, work: asyncio.Future) -> None:
    """Awaits `work`, cancelling it (and so its generation) when the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                return
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


async def _merge(sources: list[AsyncIterator[tuple]]) -> AsyncIterator[tuple[int, tuple]]:
    """Interleaves several choices' event streams as (choice index, event); cancels them all on exit."""
    if len(sources) == 1:
        async for ev in sources[0]:
            yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, src: AsyncIterator[tuple]) -> None:
        try:
            async for ev in src:
                await q.put((i, ev))
        except Exception as e:
            await q.put((i, e))
        finally:
            await q.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    try:
        remaining = len(tasks)
        while remaining:
            i, ev = await q.get()
            if ev is done:
                remaining -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream_error(e: Exception) -> str:
    if isinstance(e, APIError):
        return _sse(error_body(e.message, e.type, e.param, e.code))
    if isinstance(e, DanluError):
        return _sse(error_body(str(e)))
    return _sse(error_body(f"internal error: {type(e).__name__}", "server_error"))


async def _sse_chat(rid, created, model_name, n, choice_events, store, include_usage) -> AsyncIterator[str]:  # noqa: ANN001
    """OpenAI's chat streaming: role chunk, content deltas, tool_calls, finish chunk, usage chunk, [DONE]."""

    def chunk(model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices, **extra}  # fmt: skip
        if include_usage and "usage" not in body:
            body["usage"] = None
        return _sse(body)

    outcomes: list[Outcome] = []
    try:
        for i in range(n):
            yield chunk(model_name, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])  # fmt: skip
        async for i, ev in _merge([choice_events(i) for i in range(n)]):
            if ev[0] == "delta":
                yield chunk(model_name, [{"index": i, "delta": {"content": ev[1]}, "logprobs": None,
                                          "finish_reason": None}])  # fmt: skip
            elif ev[0] == "tool_calls":
                calls = [{"index": k, **c} for k, c in enumerate(ev[1])]
                yield chunk(model_name, [{"index": i, "delta": {"tool_calls": calls}, "logprobs": None,
                                          "finish_reason": None}])  # fmt: skip
            elif ev[0] == "done":
                out: Outcome = ev[1]
                outcomes.append(out)
                await store(i, out)
                yield chunk(out.model, [{"index": i, "delta": {}, "logprobs": None,
                                         "finish_reason": out.finish_reason}])  # fmt: skip
        if include_usage:
            yield chunk(model_name, [], usage=_usage(outcomes))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:  # mid-stream: headers are sent, so the error travels as an event (as OpenAI does)
        yield _stream_error(e)
        yield "data: [DONE]\n\n"


async def _sse_text(rid, created, model, jobs, sampling, include_usage, echo) -> AsyncIterator[str]:  # noqa: ANN001
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": model.name,
                "choices": choices, **extra}  # fmt: skip
        if include_usage and "usage" not in body:
            body["usage"] = None
        return _sse(body)

    outcomes: list[Outcome] = []
    try:
        if echo is not None:
            for idx, p, _ in jobs:
                yield chunk([{"index": idx, "text": echo(p), "logprobs": None, "finish_reason": None}])
        sources = [answer_text(model, ids, sampling, idx) for idx, _, ids in jobs]
        async for k, ev in _merge(sources):
            idx = jobs[k][0]
            if ev[0] == "delta":
                yield chunk([{"index": idx, "text": ev[1], "logprobs": None, "finish_reason": None}])
            elif ev[0] == "done":
                outcomes.append(ev[1])
                yield chunk(
                    [{"index": idx, "text": "", "logprobs": None, "finish_reason": ev[1].finish_reason}]
                )
        if include_usage:
            yield chunk([], usage=_usage(outcomes))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:
        yield _stream_error(e)
        yield "data: [DONE]\n\n"
