"""What a run produces: one `Record` per item, and the `Job` that made it (what `--resume` must
find unchanged before it continues a file). Writers turn records into formats (`writers`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
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
    """"stop" when the model ended its answer, "length" when --max-new-tokens cut it."""
    data: Any = None
    """With --schema / --json-object: the answer parsed and validated (the raw text stays in
    `answer`, also when it could not be parsed, with `error` saying why)."""
    schema: str | None = None
    """With --schema / --json-object: a fingerprint of the schema ("sha256:..."), so that
    --resume never mixes answers to different schemas in one file."""
    token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """The answer's token ids, for library callers (benchmarks compare them); not written out."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        data = asdict(self)
        del data["token_ids"]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Record:
        """A record from one JSONL line; anything else (other JSON, missing fields, wrong
        types) raises ValueError, so a foreign file is never taken for ours."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        names = {entry.name for entry in fields(cls)} - {"token_ids"}
        record = cls(**{key: value for key, value in data.items() if key in names})
        if not all(isinstance(value, str) for value in (record.source, record.prompt, record.model)):
            raise ValueError("not a granite-vision record")
        if record.page is not None and not isinstance(record.page, int):
            raise ValueError("not a granite-vision record")
        return record


@dataclass(frozen=True)
class Job:
    """What makes records belong to one run: `--resume` continues only the same job."""

    prompt: str
    model: str
    schema: str | None = None
    """Fingerprint of the --schema / --json-object schema (`OutputSchema.fingerprint`)."""

    def difference(self, record: Record) -> str | None:
        """How `record` was made differently from this job, in words; None if it was not."""
        for what, theirs, ours in (
            ("prompt", record.prompt, self.prompt),
            ("model", record.model, self.model),
            ("schema", record.schema, self.schema),
        ):
            if theirs != ours:
                return f"another {what} ({_shown(theirs)}; this run: {_shown(ours)})"
        return None


def _shown(value: str | None) -> str:
    if value is None:
        return "none"
    return repr(value if len(value) <= 60 else value[:57] + "...")
