"""The wire format of `calm serve`: OpenAI's completions request and responses, and its errors.

`CompletionRequest` is the body of ``POST /v1/completions`` (OpenAI's fields, plus CALM's own
``sampler`` and ``num_samples``, and vLLM's ``ignore_eos``). It is strict: an unknown field, a field of the wrong JSON type
(``"max_tokens": "16"``, ``"temperature": true``) or a value out of range is a 400 error whose
OpenAI-style error object names the field (``param``). OpenAI fields this server does not
implement (``n``, ``best_of``, ``logprobs``, ``echo``, ``suffix``, ``top_p``, penalties,
``logit_bias``) are accepted at their neutral defaults only, and otherwise refused by name.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "MAX_NUM_SAMPLES",
    "MAX_STOPS",
    "ApiError",
    "CompletionRequest",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_completion_request",
]

MAX_NUM_SAMPLES = 4096  # CALM's head samples per step and row: bounds one request's work per step
MAX_STOPS = 4  # OpenAI's bound on stop sequences

Prompt = str | list[str] | list[int] | list[list[int]]


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with `status`."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param=None, code=None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. None means "the default" for every optional field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # default: the served model
    prompt: Prompt
    max_tokens: int | None = None  # default 16, as OpenAI's
    temperature: float | None = None  # default 1
    seed: int | None = None  # prompt i of a list uses seed + i (as `generate`); None: random
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # CALM's knobs (a baseline server checks and ignores them, so clients can address both)
    sampler: Literal["exact", "approx"] | None = None
    num_samples: int | None = None
    ignore_eos: bool | None = None  # as vLLM's: go on past the end-of-text token
    # OpenAI fields accepted at their neutral values only
    n: int | None = None
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check(self) -> None:
        """Range checks that the types cannot express (ApiError naming the field)."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ApiError(f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")
        if self.num_samples is not None and not 1 <= self.num_samples <= MAX_NUM_SAMPLES:
            raise ApiError(
                f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {self.num_samples}", param="num_samples"
            )
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError("prompt is an empty list", param="prompt")
        stops = self.stops
        if len(stops) > MAX_STOPS:
            raise ApiError(f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", param="stop")
        if any(s == "" for s in stops):
            raise ApiError("stop sequences must not be empty strings", param="stop")
        neutral = {
            "n": (1,),
            "best_of": (1,),
            "echo": (False,),
            "suffix": ("",),
            "top_p": (1.0,),
            "presence_penalty": (0.0,),
            "frequency_penalty": (0.0,),
        }
        for name, ok in neutral.items():
            value = getattr(self, name)
            if value is not None and value not in ok:
                raise ApiError(
                    f"{name}={value!r} is not supported by this server (only {ok[0]!r})", param=name
                )
        if self.logprobs is not None:
            raise ApiError("logprobs are not supported (CALM has no logits)", param="logprobs")
        if self.logit_bias:
            raise ApiError("logit_bias is not supported (CALM has no logits)", param="logit_bias")

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "an object",
    "list_type": "an array",
}


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The validated request in a raw JSON body, or an ApiError (400) naming the problem."""
    try:
        req = CompletionRequest.model_validate_json(raw)
    except ValidationError as err:
        raise _validation_error(err) from None
    req.check()
    return req


def _validation_error(err: ValidationError) -> ApiError:
    e = err.errors(include_url=False)[0]
    loc = [str(x) for x in e["loc"]]
    kind = e["type"]
    if kind == "json_invalid":
        return ApiError(f"malformed JSON body: {e['msg'].removeprefix('Invalid JSON: ')}")
    if not loc:
        return ApiError("the request body must be a JSON object")
    field = loc[0]
    if kind == "extra_forbidden":
        return ApiError(f"unknown field {field!r}", param=field)
    if kind == "missing":
        return ApiError(f"missing required field {field!r}", param=field)
    if field == "prompt":
        return ApiError(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
            param="prompt",
        )
    where = ".".join(loc)
    if kind in _TYPE_WORDS:
        return ApiError(f"{where} must be {_TYPE_WORDS[kind]} (or null), got {e['input']!r}", param=field)
    return ApiError(f"{where}: {e['msg']}", param=field)


# ---------------------------------------------------------------------------------------------
# Responses


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    cid: str,
    model: str,
    texts: list[str],
    finish: list[str | None],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict:
    """The non-streamed ``text_completion`` object, one choice per prompt."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": t, "index": i, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    cid: str, model: str, index: int | None, text: str, finish: str | None, usage_: dict | None = None
) -> str:
    """One server-sent event: a ``text_completion`` chunk (``index`` None: the usage-only chunk
    of ``stream_options.include_usage``, with no choices)."""
    choices = (
        [] if index is None else [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]
    )
    body = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None or index is None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"
