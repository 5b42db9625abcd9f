"""What a run produces: one `Record` per item, and the `Job` that made it (what `--resume` must
find unchanged before it continues a file). Writers turn records into formats (`writers`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Record:
    """One answered (or failed) item. Field order is the JSONL key order."""

    source: str
    page: int | None
    prompt: str
    answer: str | None
    error: str | None
    model: str
    width: int | None = None
    """Width of the picture the model saw, in pixels (after EXIF rotation / PDF rendering)."""
    height: int | None = None
    prompt_tokens: int | None = None
    """Tokens in the model input for this item: image tokens plus the chat-formatted prompt."""
    answer_tokens: int | None = None
    finish_reason: str | None = None
    """"stop" when the model ended its answer, "length" when --max-new-tokens cut it, "repetition"
    when it looped (one turn of the loop is kept)."""
    data: Any = None
    """With --schema / --json-object: the answer parsed and validated (the raw text stays in
    `answer`, also when it could not be parsed, with `error` saying why)."""
    schema: str | None = None
    """With --schema / --json-object: a fingerprint of the schema ("sha256:..."), so that
    --resume never mixes answers to different schemas in one file."""
    prompt_template: str | None = None
    """With several prompts, or one with fields (`{name}`): the prompt as given, which `prompt`
    fills in; it says which prompt a record answers. Not written when None."""
    id: str | None = None
    """The request's id (`--requests`: `id`, or OpenAI's `custom_id`). Not written when None."""
    settings: dict[str, Any] | None = None
    """What else shaped the answer (`SETTINGS`: --revision, --temperature, --seed, --dpi,
    --max-tiles, --pdf-renderer, --quantize: how the weights were loaded), so that --resume never
    mixes answers made differently. None in records written before it existed (taken to match)."""
    token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """The answer's token ids, for library callers (benchmarks compare them); not written out."""
    thumbnail: bytes | None = field(default=None, repr=False, compare=False)
    """A small JPEG of the picture, while it goes to an HTML report that shows it (not written out)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        data = {entry.name: getattr(self, entry.name) for entry in fields(self) if entry.name not in _UNWRITTEN}
        for name in ("prompt_template", "id"):
            if data[name] is None:
                del data[name]  # (a run of one plain prompt writes what it always wrote)
        return dumps(data)

    @classmethod
    def from_json(cls, line: str) -> Record:
        """A record from one JSONL line; anything else (other JSON, missing fields, wrong
        types) raises ValueError, so a foreign file is never taken for ours."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError  # (every caller says in its own words what a line that is not ours means)
        names = {entry.name for entry in fields(cls)} - _UNWRITTEN
        record = cls(**{key: value for key, value in data.items() if key in names})
        if not all(isinstance(value, str) for value in (record.source, record.prompt, record.model)):
            raise ValueError
        if record.page is not None and not isinstance(record.page, int):
            raise ValueError
        return record


#: Record fields for the run's own use, never written out.
_UNWRITTEN = {"token_ids", "thumbnail"}
#: The options besides prompt, model and schema that change answers, as records keep them.
#: (--max-new-tokens is not one: `Job.reuses` keeps every answer it would not change.)
SETTINGS = ("revision", "temperature", "seed", "dpi", "max_tiles", "pdf_renderer", "repetition_stop", "quantize")
#: What a record written before a setting existed had: no record was quantized before --quantize.
#: (A setting not here that a record lacks is taken to match.)
BEFORE = {"quantize": None}
#: The settings that say how the model was loaded: with --server, the server's.
LOADED = ("revision", "max_tiles", "quantize")


@dataclass(frozen=True)
class Job:
    """What makes records belong to one run: `--resume` continues only the same job."""

    prompt: str
    model: str
    schema: str | None = None
    """Fingerprint of the --schema / --json-object schema (`OutputSchema.fingerprint`)."""
    settings: dict[str, Any] | None = None
    """`SETTINGS` as this run has them (None: not compared, for jobs that write no file)."""
    max_new_tokens: int | None = None
    prompts: tuple[str, ...] = ()
    """Several prompts, or one with fields: each as given (records name theirs in
    `prompt_template`). Then a record of another prompt is another item, not another job."""
    requests: bool = False
    """A request file: each item has its own prompt, schema and answer length, so only the model
    and the settings make the job."""

    def difference(self, record: Record) -> str | None:
        """How `record` was made differently from this job, in words; None if it was not."""
        if record.id is not None and not self.requests:
            return "another kind of run (a request file's; this run: a caption of sources)"
        if self.requests:
            return (
                self._settings_difference(record)
                if record.model == self.model
                else f"another model ({shown_briefly(record.model)}; this run: {shown_briefly(self.model)})"
            )
        prompt = record.prompt_template or record.prompt
        if not self.prompts:
            our_prompt = self.prompt
        elif record.prompt_template is not None or record.prompt in self.prompts:
            our_prompt = prompt  # (another of several prompts is another item; a one-prompt run, continued)
        else:  # a file of another prompt's answers, continued with several
            our_prompt = " | ".join(self.prompts)
        for what, theirs, ours in (
            ("prompt", prompt, our_prompt),
            ("model", record.model, self.model),
            ("schema", record.schema, self.schema),
        ):
            if theirs != ours:
                return f"another {what} ({shown_briefly(theirs)}; this run: {shown_briefly(ours)})"
        return self._settings_difference(record)

    def _settings_difference(self, record: Record) -> str | None:
        for name in SETTINGS if self.settings is not None and record.settings is not None else ():
            if name not in record.settings and name not in BEFORE:  # a setting newer than the record
                continue
            theirs, ours = record.settings.get(name, BEFORE.get(name)), self.settings.get(name)
            if theirs != ours:
                server = "; with --server, as that server was started" if name in LOADED else ""
                flag = name.replace("_", "-")
                return f"another --{flag} ({shown_briefly(theirs)}; this run: {shown_briefly(ours)}{server})"
        return None

    def reuses(self, record: Record) -> bool:
        """Whether an answer of an earlier run stands in this one: it is an answer, and this
        run's --max-new-tokens would not change it (an answer that ended within the limit is the
        same; one that was cut is the same only at the same limit)."""
        if not record.ok:
            return False
        if self.requests or self.max_new_tokens is None or record.answer_tokens is None:
            return True
        if record.finish_reason == "length":
            return record.answer_tokens == self.max_new_tokens
        return record.answer_tokens <= self.max_new_tokens


def dumps(value: Any) -> str:
    """JSON text that is valid UTF-8 whatever the strings hold: a file name that is not valid
    UTF-8 reaches Python with each undecodable byte as a lone surrogate (0xff -> U+DCFF), which
    no UTF-8 encoder takes; it is written as the escape `\\udcff`, which `json.loads` turns back
    into the same name (and `os.fsencode` into the same bytes)."""
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", json.dumps(value, ensure_ascii=False))


_SURROGATE = re.compile("[\ud800-\udfff]")


def shown_briefly(value: Any) -> str:
    """A value for a one-line message: text quoted and cut to 60 characters."""
    if value is None:
        return "none"
    if not isinstance(value, str):
        return str(value)
    return repr(value if len(value) <= 60 else value[:57] + "...")
