"""The HTTP side of `calm serve`: a FastAPI app over one `calm.serve.engine.Engine`.

Routes: ``POST /v1/completions`` (OpenAI's completions, streamed as server-sent events with
``stream: true``), ``GET /v1/models``, ``GET /health``. Errors are OpenAI error objects
(`calm.serve.schema.ApiError`): 400 naming the field for a bad request, 404 for another model
name, 429 with ``Retry-After`` when the batch and the queue are full, 503 while shutting down.

The engine runs in its own thread; each sequence's events reach its request through an
``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``. A client that disconnects (a stream
whose connection closes, or a plain request whose client is gone) cancels its sequences,
which leave the batch at the engine's next step.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from calm.generation_inputs import GenerationError, check_lengths, check_temperature
from calm.serve.engine import Engine, EngineStopped, Event, Sampling, Sequence
from calm.serve.schema import (
    ApiError,
    CompletionRequest,
    completion_chunk,
    completion_response,
    error_body,
    new_completion_id,
    parse_completion_request,
    usage,
)
from calm.serve.text import CompletionText

__all__ = ["create_app"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # a plain (non-streamed) request checks this often whether its client left


def create_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    """The app serving `engine`'s model as `model_name`; the engine thread runs with the app's
    lifespan (started at startup, stopped at shutdown, after uvicorn's graceful drain)."""
    created = int(time.time())
    state = {"stopping": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            state["stopping"] = True
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="calm serve", version="1", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type=kind), status_code=err.status_code)

    @app.get("/health")
    async def health():
        body = {"status": "stopping" if state["stopping"] else "ok", **engine.status()}
        body["stats"] = engine.stats.to_dict()
        return JSONResponse(body, status_code=503 if state["stopping"] else 200)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "calm",
            "kind": engine.kind,
            "chunk_size": engine.K,
            "context_tokens": engine.context * engine.K,
        }
        return {"object": "list", "data": [card]}

    @app.post(
        "/v1/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}},
            }
        },
    )
    async def completions(request: Request):
        req = parse_completion_request(await request.body())
        seqs, queue, prompt_tokens = _sequences(req, engine, tokenizer, model_name)
        try:
            accepted = engine.submit(seqs)
        except EngineStopped as err:
            raise ApiError(str(err), status=503, type="server_error") from None
        if not accepted:
            raise ApiError(
                f"the server is at capacity ({engine.max_rows} rows decoding, {engine.max_queue} waiting); "
                f"retry after {RETRY_AFTER_S} s",
                status=429,
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        cid = new_completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream(engine, seqs, queue, cid, model_name, prompt_tokens, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await _collect(request, engine, seqs, queue, cid, model_name, prompt_tokens)

    return app


def _sequences(req: CompletionRequest, engine: Engine, tokenizer, model_name: str):
    """The request's prompts as engine sequences (every check that can fail before decoding)."""
    if req.model is not None and req.model != model_name:
        raise ApiError(
            f"the model {req.model!r} does not exist; this server serves {model_name!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    try:
        temperature = check_temperature(temperature, engine.kind)
    except GenerationError as err:
        raise ApiError(str(err), param="temperature") from None
    sampling = Sampling(temperature, req.sampler or "exact", req.num_samples or 200)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    prompts = _prompt_ids(req.prompt, tokenizer, engine.vocab_size)
    if len(prompts) > engine.max_rows + engine.max_queue:
        raise ApiError(
            f"{len(prompts)} prompts in one request; this server takes at most "
            f"{engine.max_rows + engine.max_queue} (--max-rows + --max-queue)",
            param="prompt",
        )
    try:
        check_lengths([len(p) for p in prompts], max_tokens, engine.K, engine.context)
    except GenerationError as err:
        param = "max_tokens" if getattr(err, "param", None) == "max_new_tokens" else "prompt"
        raise ApiError(str(err).replace("max_new_tokens", "max_tokens"), param=param) from None
    seed = secrets.randbelow(2**62) if req.seed is None else req.seed
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emitter(index: int):
        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass

        return emit

    seqs = [
        Sequence(
            p,
            max_tokens,
            sampling,
            seed + i,
            CompletionText(tokenizer, req.stops),
            emitter(i),
            ignore_eos=bool(req.ignore_eos),
        )  # fmt: skip
        for i, p in enumerate(prompts)
    ]
    return seqs, queue, sum(len(p) for p in prompts)


def _prompt_ids(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(
                f"prompt {i} is empty (encodes to no tokens); to start a fresh document send the "
                "end-of-text token id as a token prompt",
                param="prompt",
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})", param="prompt"
            )
        out.append(ids)
    return out


def _cancel_unfinished(engine: Engine, seqs: list[Sequence], finished: list[bool]) -> None:
    for s, f in zip(seqs, finished):
        if not f:
            engine.cancel(s)


async def _collect(request: Request, engine, seqs, queue, cid, model_name, prompt_tokens):
    n = len(seqs)
    texts, reasons, tokens = [[] for _ in range(n)], [None] * n, [0] * n
    finished = [False] * n
    try:
        while not all(finished):
            try:
                index, ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(error_body("client disconnected"), status_code=499)
                continue
            if ev.error is not None:
                raise ApiError(ev.error, status=500, type="server_error")
            texts[index].append(ev.text)
            tokens[index] = ev.completion_tokens
            if ev.finish_reason is not None:
                reasons[index], finished[index] = ev.finish_reason, True
    finally:
        _cancel_unfinished(engine, seqs, finished)
    body = completion_response(
        cid, model_name, ["".join(t) for t in texts], reasons, prompt_tokens, sum(tokens)
    )
    return JSONResponse(body)


async def _stream(engine, seqs, queue, cid, model_name, prompt_tokens, include_usage):
    n = len(seqs)
    finished, tokens = [False] * n, [0] * n
    try:
        while not all(finished):
            index, ev = await queue.get()
            if ev.error is not None:
                yield f"data: {_json(error_body(ev.error, type='server_error'))}\n\n"
                return
            tokens[index] = ev.completion_tokens
            if ev.finish_reason is not None:
                finished[index] = True
            yield completion_chunk(cid, model_name, index, ev.text, ev.finish_reason)
        if include_usage:
            yield completion_chunk(cid, model_name, None, "", None, usage(prompt_tokens, sum(tokens)))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected (the response task is cancelled)
        _cancel_unfinished(engine, seqs, finished)


def _json(obj) -> str:
    import json

    return json.dumps(obj)
