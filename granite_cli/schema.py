"""Structured output: `--schema` and `--json-object` turn answers into validated JSON data.

The model's decoding is constrained by xgrammar to the JSON Schema (whitespace-free JSON), so
every item's output is schema-shaped by construction — even a model with random weights
produces it. What can still go wrong is told per item: an answer cut by `--max-new-tokens`
before the JSON closed, or (for schema keywords a grammar cannot enforce) a value that fails
validation; such an item gets an error record with its raw text, and the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

COMPACT_TYPES = {"string", "number", "integer", "boolean"}
#: A field of the compact form: a name in any script (`émetteur`, `名前`), then `:type` or `:type[]`.
_COMPACT_FIELD = re.compile(r"^(?P<name>[^\W\d][\w\- ]*?)\s*(?::\s*(?P<type>[a-z]+)(?P<array>\[\])?)?$")
#: Whitespace-free JSON: no tokens spent on layout.
SEPARATORS = (",", ":")


@dataclass(frozen=True)
class OutputSchema:
    """A checked JSON Schema, ready to constrain decoding and validate answers."""

    schema: dict = field(hash=False)
    text: str
    """Canonical JSON of the schema: the key grammars are compiled and cached by."""

    @property
    def fingerprint(self) -> str:
        """Short and stable: what records carry so --resume never mixes two schemas."""
        return "sha256:" + hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def columns(self) -> list[str]:
        """Top-level properties, in schema order (the CSV columns)."""
        return list(self.schema.get("properties", {}))

    def default_prompt(self) -> str:
        """What to ask when the user gave no --prompt: the fields to extract, with descriptions."""
        properties = self.schema.get("properties") or {}
        if not properties:
            return "Describe this image as a JSON object."
        lines = []
        for name, spec in properties.items():
            spec = spec if isinstance(spec, dict) else {}  # `true` / `false` are schemas too
            kind = spec.get("type") or (
                "one of " + ", ".join(map(json.dumps, spec["enum"])) if "enum" in spec else "any"
            )
            description = f": {spec['description']}" if spec.get("description") else ""
            lines.append(f"- {name} ({kind if isinstance(kind, str) else '/'.join(kind)}){description}")
        title = f" ({self.schema['title']})" if self.schema.get("title") else ""
        return "Extract these fields from the image" + title + " and answer with a JSON object:\n" + "\n".join(lines)

    def check(self, text: str, finish_reason: str, max_new_tokens: int) -> tuple[Any, str | None]:
        """Parse and validate one answer: (data, None) or (None, the reason it is not data)."""
        import jsonschema

        try:
            # Control characters inside strings are allowed by the grammar; the data we write
            # back is re-encoded, so it is strict JSON again.
            data = json.loads(text, strict=False)
        except json.JSONDecodeError as exc:
            if finish_reason == "length":
                return None, f"the JSON did not close within --max-new-tokens {max_new_tokens}"
            return None, f"not valid JSON ({exc.msg} at character {exc.pos})"
        errors = sorted(jsonschema.Draft202012Validator(self.schema).iter_errors(data), key=lambda e: list(e.path))
        if errors:
            where = "/".join(map(str, errors[0].absolute_path)) or "(root)"
            return None, f"does not match the schema at {where}: {errors[0].message}"
        return data, None


def load(spec: str | None, json_object: bool = False) -> OutputSchema | None:
    """The schema named by --schema (file, inline JSON or compact form) or --json-object (the job
    has refused both at once), checked now — before any model loads — for validity and for what
    xgrammar can compile."""
    if spec is None and not json_object:
        return None
    schema = {"type": "object"} if json_object else parse(spec)
    _check(schema, spec or "--json-object")
    return OutputSchema(schema, json.dumps(schema))  # key order kept: it is the output field order


def parse(spec: str) -> dict:
    """A JSON Schema file, an inline JSON object, or the compact form
    `'title, total:number, date, paid:boolean, tags:string[]'` (fields default to string, all
    required, no other fields)."""
    text = spec.strip()
    path = Path(text)
    if not text.startswith("{") and (path.suffix.lower() == ".json" or path.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--schema {spec}: cannot read ({exc.strerror or exc})") from None
        return _json_object(text, spec)
    if text.startswith(("{", "[", '"')):
        return _json_object(text, "inline JSON")
    return compact(text)


def compact(text: str) -> dict:
    properties: dict[str, dict] = {}
    for part in text.split(","):
        match = _COMPACT_FIELD.match(part.strip())
        if not match:
            raise UsageError(
                f"--schema: cannot read field {part.strip()!r}; expected name or name:type, like total:number"
            )
        name, kind, array = match["name"].strip(), match["type"] or "string", match["array"]
        if kind not in COMPACT_TYPES:
            known = ", ".join(sorted(COMPACT_TYPES))
            raise UsageError(f"--schema: field {name!r} has unknown type {kind!r}; use one of {known}")
        if name in properties:
            raise UsageError(f"--schema: field {name!r} appears twice")
        properties[name] = {"type": "array", "items": {"type": kind}} if array else {"type": kind}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _json_object(text: str, where: str) -> dict:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--schema {where}: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"--schema {where}: a JSON Schema must be a JSON object")
    return schema


def _check(schema: dict, where: str) -> None:
    import jsonschema
    import xgrammar

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(map(str, exc.absolute_path)) or "(root)"
        raise UsageError(f"--schema {where}: invalid JSON Schema at {at}: {exc.message}") from None
    try:
        xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)
    except Exception as exc:  # noqa: BLE001 - xgrammar reports unsupported schemas as RuntimeError
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"^\[[\d:]+\] \S+: ", "", reason)
        raise UsageError(f"--schema {where}: xgrammar cannot constrain decoding to it ({reason})") from None
