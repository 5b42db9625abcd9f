"""OpenAI's chat-completions shapes, both ways: what `granite-vision serve` reads from a client and
writes back, and what `--server` (`engine.remote`) sends and reads. One module, so the two ends
cannot drift apart.

A request is one question about one picture: one user message holding one `image_url` part (a
`data:` URL; a path or http(s) URL only where the server allows them) and text parts, which are
joined. Anything a Granite Vision prompt cannot hold (a second picture, earlier turns, a system
message, tools) is refused with a reason, never silently dropped.

Answers carry, besides OpenAI's fields, a `granite_vision` object (OpenAI clients ignore what they
do not know): the exact token ids, the finish reason before it is mapped to OpenAI's words (a
stopped loop is "repetition" here, "stop" there), so that `--server` records equal local ones.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .jobs import RANGES, temperature_problem, text_problem
from .pictures import Blob

#: Our finish reasons as OpenAI's enum spells them.
FINISH_REASONS = {"stop": "stop", "length": "length", "repetition": "stop"}


class BadRequest(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error `code` and `param`."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class ChatRequest:
    """What a chat-completions request asks, in our terms."""

    image_url: str
    question: str
    max_new_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    include_usage: bool
    schema: str | None
    """A JSON Schema's text (`response_format` `json_schema`), or None."""
    json_object: bool
    repetition_stop: bool


def parse_chat(body: Any, default_max_tokens: int) -> ChatRequest:
    """A request body, checked; `BadRequest` says what is wrong with it."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    image_url, question = _message(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be a positive integer, not {max_tokens!r}", param="max_tokens")
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(f"temperature must be a number of 0 or more, not {temperature!r}", param="temperature")
    if problem := temperature_problem(temperature):
        raise BadRequest(f"temperature {temperature!r}: {problem}", param="temperature")
    seed, (low, high) = body.get("seed"), RANGES["seed"]
    if seed is not None and not (_is_int(seed) and low <= seed <= high):
        raise BadRequest(f"seed must be an integer from {low} to {high}, not {seed!r}", param="seed")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream must be true or false", param="stream")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: one answer a request", param="n")
    options = body.get("stream_options") or {}
    schema, json_object = _response_format(body.get("response_format"))
    repetition_stop = body.get("repetition_stop", True)
    if not isinstance(repetition_stop, bool):
        raise BadRequest("repetition_stop must be true or false", param="repetition_stop")
    return ChatRequest(
        image_url, question, max_tokens, float(temperature), seed, bool(body.get("stream")),
        bool(isinstance(options, dict) and options.get("include_usage")), schema, json_object, repetition_stop,
    )  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _message(messages: Any) -> tuple[str, str]:
    """The picture and the question of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a list holding one user message", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise BadRequest(
            "granite-vision answers one question about one picture: send exactly one user message"
            " (no system message, no earlier turns)",
            param="messages",
        )
    content = messages[0].get("content")
    if isinstance(content, str) or not isinstance(content, list):
        raise BadRequest(
            "the user message needs a picture: content must be a list with one image_url part", param="messages"
        )
    images, texts = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise BadRequest("an image_url part needs a url", param="messages")
            images.append(url)
        else:
            raise BadRequest(f"unsupported content part {kind!r}: use text and image_url", param="messages")
    if len(images) != 1:
        raise BadRequest(f"one picture a request, not {len(images)}", param="messages")
    question = "\n".join(texts)
    if not question.strip():
        raise BadRequest("the user message has no question: add a text part", param="messages")
    if problem := text_problem(question):
        raise BadRequest(f"the question is {problem}", param="messages")
    return images[0], question


def _response_format(value: Any) -> tuple[str | None, bool]:
    if value is None:
        return None, False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, False
    if kind == "json_object":
        return None, True
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs json_schema.schema, an object", param="response_format")
        return json.dumps(schema), False
    raise BadRequest(f"response_format type {kind!r}: use text, json_object or json_schema", param="response_format")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URL."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise BadRequest("a data: URL must be base64 (data:image/png;base64,...)", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the data: URL is not valid base64", param="messages") from None


def picture_source(url: str, name: str | None = None) -> str | Blob:
    """An `image_url` as a source to read: a `data:` URL's bytes (named `name`), a `file://`
    URL's path (percent-decoded), else the URL or path as given (whether it may be read is the
    caller's to say)."""
    if url.startswith("data:"):
        return Blob(data_url_bytes(url), name)
    if url.startswith("file://"):
        return urllib.parse.unquote(url.removeprefix("file://"))
    return url


def chat_request(url: str, question: str, settings, stream: bool) -> dict:
    """The body `--server` sends for one row (`settings`: the engine's `GenerationSettings`)."""
    body: dict[str, Any] = {
        "model": "granite-vision",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "repetition_stop": settings.repetition_stop,
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    if settings.schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": settings.schema.schema},
        }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def completion(model: str, record, request_id: str | None = None) -> dict:
    """A `chat.completion` for an answered record."""
    return {
        "id": request_id or new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": record.answer},
                "finish_reason": FINISH_REASONS.get(record.finish_reason, "stop"),
                "logprobs": None,
            }
        ],
        "usage": usage(record),
        "granite_vision": extension(record),
    }


def chunk(model: str, request_id: str, created: int, delta: dict, finish: str | None = None, **extra) -> dict:
    """One `chat.completion.chunk` of a streamed answer."""
    choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if delta is not None else []
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }


def usage(record) -> dict:
    prompt, answer = record.prompt_tokens or 0, record.answer_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def extension(record, with_answer: bool = False) -> dict:
    """What a record holds beyond OpenAI's fields, for `--server` to rebuild it exactly (a stream's
    last chunk also carries the whole answer)."""
    extra = {"finish_reason": record.finish_reason, "token_ids": list(record.token_ids), "error": record.error}
    return extra | ({"answer": record.answer} if with_answer else {})


def error_body(message: str, code: str = "invalid_request", param: str | None = None, kind: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = kind or ("invalid_request_error" if code != "server_error" else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def answer_of(body: dict):
    """The `Answer` a completion (or the last chunk of a stream) carries, as the engine made it."""
    from .engine import Answer

    try:
        extra = body["granite_vision"]
        choice = body["choices"][0] if body.get("choices") else {}
        text = choice.get("message", {}).get("content") if "message" in choice else extra.get("answer")
        tokens = tuple(extra["token_ids"])
        return Answer(text or "", int(body["usage"]["prompt_tokens"]), len(tokens), extra["finish_reason"], tokens)
    except (KeyError, TypeError, ValueError, IndexError):
        raise UsageError("the server's answer is not granite-vision's: is --server a granite-vision serve?") from None
