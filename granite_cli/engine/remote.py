"""The `server` backend: an `Engine` whose model runs in a `granite-vision serve` elsewhere, so that
`ask --server` and `caption --server` load no model, yet read inputs, write outputs, resume and
report exactly as a local run does (the pipeline cannot tell the difference).

Pictures are read here as for a local run, at the size the server's model uses (its tile grid,
from `/v1/models`), and sent as lossless PNG `data:` URLs, so the server's processor sees the
same pixels a local one would. A batch is its rows sent at once, one request each, which the
server batches with whatever else it has. No torch here, and no HTTP library beyond Python's own.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import openai_api
from ..errors import DeviceError, OutputError, UsageError, one_line, os_reason
from . import Answer, BatchLimits, GenerationSettings, Refused, Streams, row_streams
from .prompts import grid_fit, too_long

if TYPE_CHECKING:
    from PIL import Image

#: Requests in flight at once from one `caption --server` (the server batches them).
IN_FLIGHT = 16
#: Seconds a request may wait for its answer (a long answer on a busy server takes minutes).
TIMEOUT_S = 600.0
#: Times a request is sent again after "queue full" (503), waiting as the server asks.
BUSY_RETRIES = 60


class ServerGone(DeviceError):
    """The server cannot be reached or broke off: the run stops, as when a device fails (records
    kept, --resume continues)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"the server went away ({url}: {reason})")
        self.reason = reason


@dataclass(frozen=True)
class _Row:
    url: str
    question: str


class RemoteEngine:
    """`Engine` over HTTP (see the module's docstring)."""

    def __init__(self, url: str, api_key: str | None, card: dict):
        self.url = url
        self.api_key = api_key
        self.name = card["id"]
        extra = card.get("granite_vision") or {}
        self.pinpoints = extra.get("image_grid_pinpoints")
        self.settings = dict(extra.get("settings") or {})
        """What the server's loading shaped (revision, max_tiles): the records' settings say so."""
        self.context_window = extra.get("context_window")
        self.smallest = extra.get("smallest_prompt")
        """Prompt and image tokens of the smallest question about the smallest picture (for
        `check_fits` of that one, which tells an answer length no picture can have)."""
        self.pool = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="granite-remote")

    def fit(self, width: int, height: int) -> tuple[int, int]:
        return grid_fit(self.pinpoints, width, height)

    def image_tokens(self, width: int, height: int) -> int:
        return max(1, width * height // 196)  # an estimate: only for balancing work between processes

    def tokens(self, question: str, width: int, height: int) -> int:
        return self.image_tokens(width, height) + len(question) // 4

    def check_fits(self, question: str, width: int, height: int, max_new_tokens: int) -> str | None:
        """An answer longer than the context leaves beside the smallest prompt, in a local run's
        words; anything else the server says, in the same words, when it is asked."""
        if not self.context_window or not self.smallest or (question, width, height) != ("", 1, 1):
            return None
        return too_long(*self.smallest, max_new_tokens, self.context_window)

    def prepare(self, images: list[Image.Image], questions: list[str]) -> list[_Row]:
        rows = []
        for image, question in zip(images, questions, strict=True):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)
            rows.append(_Row(openai_api.data_url(buffer.getvalue()), question))
        return rows

    def run(
        self, prepared: list[_Row], settings: GenerationSettings, streams: Streams = None
    ) -> list[Answer | Refused]:
        outs = row_streams(streams, len(prepared))
        futures = [self.pool.submit(self._ask, row, settings, out) for row, out in zip(prepared, outs, strict=True)]
        return [future.result() for future in futures]

    def limits(self, rows: int | None = None, tokens: int | None = None) -> BatchLimits:
        return BatchLimits(rows or IN_FLIGHT, tokens)

    def failure(self, exc: BaseException) -> str:
        return "device" if isinstance(exc, ServerGone) else "item"

    def release(self) -> None:
        pass

    def _ask(self, row: _Row, settings: GenerationSettings, out) -> Answer | Refused:
        body = json.dumps(openai_api.chat_request(row.url, row.question, settings, out is not None)).encode()
        for _ in range(BUSY_RETRIES):
            try:
                with _open(self.url, "/v1/chat/completions", self.api_key, body) as response:
                    return _streamed(response, out) if out is not None else openai_api.answer_of(json.load(response))
            except urllib.error.HTTPError as exc:
                error = _error(exc)
                if exc.code == 503 and error.get("code") == "queue_full":
                    time.sleep(_retry_after(exc))
                    continue
                return Refused(error.get("message") or f"the server answered HTTP {exc.code} {exc.reason}")
        return Refused("the server stayed busy (503 queue full)")


def _open(url: str, path: str, api_key: str | None, body: bytes | None = None, timeout: float = TIMEOUT_S):
    """A request to the server; `ServerGone` when it cannot be reached or breaks off."""
    headers = {"Content-Type": "application/json", "User-Agent": "granite-vision"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        return urllib.request.urlopen(urllib.request.Request(url + path, body, headers), timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, OSError) and reason.errno is not None:
            reason = os_reason(reason)  # "Connection refused (ECONNREFUSED)"
        elif isinstance(reason, BaseException):
            reason = one_line(reason)
        raise ServerGone(url, reason) from None


def load(server: str, api_key: str | None = None, label: str = "--server") -> RemoteEngine:
    """Connect to a `granite-vision serve` at `server` (`http://host:port`, or the address it
    prints, ending in /v1): one line and exit 2 when it cannot be reached, refuses the key, or is
    no granite-vision server. `api_key`: None takes $GRANITE_VISION_API_KEY; `label`: how the
    caller names the option (`--server`, `server=`)."""
    where = f"{label} {server}"
    if not server.startswith(("http://", "https://")):
        raise UsageError(f"{where}: expected an http:// or https:// URL, like http://127.0.0.1:8000")
    url = server.rstrip("/").removesuffix("/v1")
    api_key = api_key if api_key is not None else os.environ.get("GRANITE_VISION_API_KEY") or None
    try:
        with _open(url, "/v1/models", api_key, timeout=30) as response:
            card = json.load(response)["data"][0]
        if not isinstance(card.get("granite_vision"), dict):
            raise KeyError
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            wrong = (
                "refused the API key given" if api_key else "wants an API key (--api-key or $GRANITE_VISION_API_KEY)"
            )
            raise UsageError(f"{where}: the server {wrong}") from None
        raise UsageError(f"{where}: HTTP {exc.code} from its /v1/models") from None
    except ServerGone as exc:
        raise UsageError(f"{where}: cannot reach it: {exc.reason}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise UsageError(f"{where}: not a granite-vision server (its /v1/models lacks our details)") from None
    return RemoteEngine(url, api_key, card)


def _streamed(response, out) -> Answer | Refused:
    """Read a server-sent event stream: each piece of text to `out` as it comes; the last chunk's
    `granite_vision` object is the answer itself."""
    last = None
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            return Refused(event["error"].get("message") or "the server failed")
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                try:
                    out.write(text)
                    out.flush()
                except OSError as exc:  # the reader of stdout went away: the output's failure
                    raise OutputError("stdout", exc) from None
        if "granite_vision" in event:
            last = event
    if last is None:
        raise ServerGone(response.url, "the stream ended before the answer")
    return openai_api.answer_of(last)


def _error(exc: urllib.error.HTTPError) -> dict:
    """The OpenAI error object of a failed request (empty if it has none)."""
    try:
        error = json.loads(exc.read())["error"]
        return error if isinstance(error, dict) else {}
    except (ValueError, KeyError, TypeError, OSError):
        return {}


def _retry_after(exc: urllib.error.HTTPError) -> float:
    try:
        return min(30.0, max(0.1, float(exc.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0
