"""--schema / --json-object: schema-valid JSON per picture, by construction, in batches."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import jsonschema
import pytest
from helpers import make_pdf, noise

from granite_cli.errors import UsageError
from granite_cli.schema import compact, load

BOUNDED = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 50},
        "paid": {"type": "boolean"},
        "kind": {"enum": ["invoice", "receipt", "chart"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["count", "paid", "kind", "score"],
    "additionalProperties": False,
}
SCHEMAS = {
    "bounded": BOUNDED,
    "strings": {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 12, "description": "the document title"}},
        "required": ["title"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "vendor": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "vat": {"type": "boolean"}},
                "required": ["name", "vat"],
                "additionalProperties": False,
            },
            "lines": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 3},
        },
        "required": ["vendor", "lines"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i, size in enumerate([(640, 480), (300, 900), (120, 120), (1000, 250)]):
        noise(*size, seed=200 + i).save(tmp_path / f"pic{i}.png")
        paths.append(str(tmp_path / f"pic{i}.png"))
    make_pdf(tmp_path / "doc.pdf", 2)
    return [*paths, str(tmp_path / "doc.pdf")]


def test_compact_form():
    assert compact("title, total:number, date, paid:boolean, tags:string[]") == {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "total": {"type": "number"},
            "date": {"type": "string"},
            "paid": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "total", "date", "paid", "tags"],
        "additionalProperties": False,
    }
    for bad in ("total:money", "a, a", "9lives", "x:string[][]"):
        with pytest.raises(UsageError):
            compact(bad)


def test_schema_sources_file_inline_compact(tmp_path):
    path = tmp_path / "invoice.json"
    path.write_text(json.dumps(BOUNDED))
    assert load(str(path)).schema == BOUNDED
    assert load(json.dumps(BOUNDED)).schema == BOUNDED
    assert load("a, b:integer").columns == ["a", "b"]
    assert load(None, json_object=True).schema == {"type": "object"}
    assert load(None) is None


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_answer_parses_and_validates(cli, pictures, name):
    schema = SCHEMAS[name]
    result = cli("caption", *pictures, "--schema", json.dumps(schema), "--batch-size", "3", "--max-new-tokens", "120")
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert len(records) == 6
    for record in records:
        jsonschema.validate(record["data"], schema)
        assert json.loads(record["answer"], strict=False) == record["data"]
        assert not record["answer"][:1].isspace()
    if name == "bounded":  # no strings: the raw text is exactly the compact JSON
        assert all(r["answer"] == json.dumps(r["data"], separators=(",", ":")) for r in records)
    if name != "bounded":  # free text inside the structure still depends on the picture
        assert len({json.dumps(r["data"]) for r in records}) > 1


def test_json_object_mode(cli, pictures):
    for record in cli("caption", *pictures[:2], "--json-object", "--max-new-tokens", "40").answered(2):
        assert isinstance(record["data"], dict) and record["data"] == json.loads(record["answer"], strict=False)
        assert record["answer"].startswith("{") and record["finish_reason"] == "stop"


def test_a_schema_and_any_json_object_at_once_are_refused_in_the_callers_words(cli, pictures, tiny_model):
    import granite_cli
    from granite_cli.errors import UsageError

    both = cli("caption", str(pictures[0]), "--schema", "title", "--json-object")
    assert (both.exit_code, both.stdout) == (2, "")
    assert both.stderr == "error: --schema and --json-object: give one of them\n"
    with pytest.raises(UsageError) as refused:
        granite_cli.ask(pictures[0], "Fields?", schema="title", json_object=True, model=str(tiny_model))
    assert str(refused.value) == "schema and json_object: give one of them"


def test_batched_structured_answers_equal_one_by_one(cli, pictures):
    schema = json.dumps(SCHEMAS["nested"])
    one = cli("caption", *pictures, "--schema", schema, "--batch-size", "1", "--max-new-tokens", "120").answered(6)
    batched = cli("caption", *pictures, "--schema", schema, "--batch-size", "6", "--max-new-tokens", "120").answered(6)
    assert [r["answer"] for r in one] == [r["answer"] for r in batched]
    assert all(r["data"] is not None for r in batched)


def test_output_cut_by_max_new_tokens_is_an_error_with_its_raw_text(cli, pictures):
    result = cli("caption", *pictures[:2], "--schema", json.dumps(SCHEMAS["nested"]), "--max-new-tokens", "4")
    assert result.exit_code == 1
    for record in result.records():
        assert record["error"] == "the JSON did not close within --max-new-tokens 4"
        assert record["answer"] and record["data"] is None
    assert result.stderr.count("did not close") == 2


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "object", "properties": {"a": {"type": "strin"}}}', "invalid JSON Schema at properties/a/type"),
        (
            '{"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}',
            "xgrammar cannot constrain decoding to it (Regex parsing error at position 3: Lookbehind is not"
            " supported yet.)",
        ),
        ("{not json", "not JSON"),
        ("[1, 2]", "--schema inline JSON: a JSON Schema must be a JSON object"),
        (
            "total:money",
            "--schema: field 'total' has unknown type 'money'; use one of boolean, integer, number, string",
        ),
        ("total, Total:number, total", "--schema: field 'total' appears twice"),
        ("total, 9lives", "--schema: cannot read field '9lives'; expected name or name:type, like total:number"),
    ],
)
def test_bad_schemas_are_usage_errors_before_the_model_loads(cli, pictures, tmp_path, schema, message):
    result = cli("caption", pictures[0], "--schema", schema, model=tmp_path / "no-model-here")
    assert result.exit_code == 2
    assert message in result.stderr and "model" not in result.stderr.split(":", 1)[0]
    assert len(result.stderr.strip().splitlines()) == 1
    ask = cli("ask", pictures[0], "What?", "--schema", schema, model=tmp_path / "no-model-here")
    assert ask.exit_code == 2 and message in ask.stderr
    both = cli("caption", pictures[0], "--schema", "a", "--json-object")
    assert both.exit_code == 2


def test_default_prompt_comes_from_the_schema_and_prompt_overrides_it(cli, pictures):
    schema = json.dumps(SCHEMAS["strings"])
    record = cli("caption", pictures[0], "--schema", schema, "--max-new-tokens", "60").records()[0]
    assert "title (string): the document title" in record["prompt"]
    record = cli("caption", pictures[0], "--schema", schema, "--prompt", "Title?", "--max-new-tokens", "60").records()[
        0
    ]
    assert record["prompt"] == "Title?"


def test_a_schema_without_the_repetition_stop_still_answers_valid_json(cli, pictures):
    """--no-repetition-stop leaves --schema's own stopping criterion alone (the one that copies
    each sampled token to the host for the grammar): the answer is still valid JSON."""
    schema = json.dumps(SCHEMAS["strings"])
    record = cli("caption", pictures[0], "--schema", schema, "--no-repetition-stop", "--max-new-tokens", "60")
    record = record.records()[0]
    assert record["error"] is None and record["data"] == json.loads(record["answer"])


def test_an_xgrammar_failure_without_words_is_named_by_its_kind(monkeypatch):
    import xgrammar

    def fails(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(xgrammar.Grammar, "from_json_schema", fails)
    with pytest.raises(UsageError) as refused:
        load("total:number")
    assert str(refused.value) == "--schema total:number: xgrammar cannot constrain decoding to it (RuntimeError)"


def test_the_default_prompt_names_the_schemas_title_and_each_field():
    invoice = {"title": "Invoice", "type": "object", "properties": {"total": {"type": "number"}, "paid": True}}
    assert load(json.dumps(invoice)).default_prompt() == (
        "Extract these fields from the image (Invoice) and answer with a JSON object:\n- total (number)\n- paid (any)"
    )
    untitled = {key: value for key, value in invoice.items() if key != "title"}
    assert load(json.dumps(untitled)).default_prompt().startswith("Extract these fields from the image and answer")


def test_an_answer_that_does_not_match_says_where_first(tmp_path):
    """What a record's error says when a (valid JSON) answer breaks the schema: the first place,
    in document order, with jsonschema's words; the whole answer when the answer is the problem."""
    schema = load("total:number, lines:string[]")
    assert schema.check('{"total": 3, "lines": ["a", 7, 8]}', "stop", 99) == (
        None,
        "does not match the schema at lines/1: 7 is not of type 'string'",
    )
    assert schema.check('{"total": "3", "lines": [5]}', "stop", 99) == (
        None,
        "does not match the schema at lines/0: 5 is not of type 'string'",
    )
    assert schema.check("[1, 2]", "stop", 99) == (
        None,
        "does not match the schema at (root): [1, 2] is not of type 'object'",
    )
    assert schema.check('{"total": 3, "lines": []}', "stop", 99) == ({"total": 3, "lines": []}, None)


def test_ask_with_schema(cli, pictures):
    result = cli("ask", pictures[0], "Extract", "--schema", json.dumps(BOUNDED), "--json", "--max-new-tokens", "60")
    assert result.exit_code == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout)["data"], BOUNDED)
    streamed = cli("ask", pictures[0], "Extract", "--schema", json.dumps(BOUNDED), "--max-new-tokens", "60")
    assert json.loads(streamed.stdout) == json.loads(result.stdout)["data"]


def test_markdown_table_and_csv(cli, pictures, tmp_path):
    schema = json.dumps(SCHEMAS["nested"])
    args = (*pictures[:2], str(tmp_path / "missing.png"), "--schema", schema, "--max-new-tokens", "120")
    report = cli("caption", *args, "-f", "markdown").stdout
    assert report.count("| field | value |") == 2 and "| vendor | `{" in report and "| lines | `[" in report
    out = tmp_path / "out.csv"
    result = cli("caption", *args, "-f", "csv", "-o", str(out))
    assert result.exit_code == 1
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["source", "page", "prompt", "answer", "vendor", "lines", "error"]
    assert [row[0] for row in rows[1:]] == [pictures[0], pictures[1], str(tmp_path / "missing.png")]
    assert json.loads(rows[1][4])["name"] is not None and rows[1][6] == ""
    assert json.loads(rows[1][3]) == {"vendor": json.loads(rows[1][4]), "lines": json.loads(rows[1][5])}
    assert rows[3][6] == "no such file"
    streamed = cli("caption", *args, "-f", "csv").stdout
    assert streamed.replace("\r\n", "\n") == out.read_text().replace("\r\n", "\n")
    resumed = cli("caption", *args, "-f", "csv", "-o", str(out), "--resume")
    assert "2 answered before, 1 to run" in resumed.stderr
    assert out.read_text() == streamed
    done = tmp_path / "done.csv"  # a finished run's report, deleted: --resume rebuilds it, columns and all
    both = (*pictures[:2], "--schema", schema, "--max-new-tokens", "120", "-f", "csv", "-o", str(done))
    assert cli("caption", *both).exit_code == 0
    whole = done.read_text()
    done.unlink()
    assert cli("caption", *both, "--resume").exit_code == 0 and done.read_text() == whole
    plain = cli("caption", pictures[0], "-f", "csv")  # without a schema: the plain columns
    assert plain.exit_code == 0 and plain.stdout.startswith("source,page,prompt,answer,error")


def test_html_cards_show_each_field_as_people_read_it(cli, pictures, tmp_path):
    """Text fields as their text (no JSON quotes), other values as JSON."""
    from html import escape

    report = tmp_path / "fields.html"
    schema = json.dumps({"type": "object", "properties": {"title": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["title", "count"]})  # fmt: skip
    result = cli("caption", pictures[0], "--schema", schema, "--max-new-tokens", "60", "-o", str(report))
    data = json.loads((tmp_path / "fields.html.jsonl").read_text())["data"]
    assert result.exit_code == 0 and isinstance(data["title"], str) and isinstance(data["count"], int)
    page = report.read_text()
    title = f"<tr><th>title</th><td>{escape(data['title'])}</td></tr>"
    assert f"<table>{title}<tr><th>count</th><td>{data['count']}</td></tr></table>" in page


def report_of(cli, picture: str, path: Path, data: dict, *fmt: str) -> str:
    """The report of a --schema run whose answer holds `data`: written into the journal after a
    real run, and the report rebuilt from it by --resume (the tiny model's values are random).
    The schema names `data`'s fields (the model answers them with booleans: quick to generate)."""
    fields = {"title": {"type": "string", "maxLength": 12}} | {name: {"type": "boolean"} for name in data}
    schema = json.dumps({"type": "object", "properties": fields})
    command = ("caption", picture, "--schema", schema, "--max-new-tokens", "90", "-o", str(path), *fmt)
    assert cli(*command).exit_code == 0
    journal = path.with_name(path.name + ".jsonl")
    journal.write_text(json.dumps(json.loads(journal.read_text()) | {"data": data}) + "\n")
    path.unlink()
    assert cli(*command, "--resume").exit_code == 0
    return path.read_text()


def test_html_cards_show_a_list_field_in_its_own_script(cli, pictures, tmp_path):
    """A field that is not text (a list of names) is shown as JSON with its characters as they
    are, not as \\u escapes."""
    page = report_of(cli, pictures[0], tmp_path / "tags.html", {"tags": ["café", "東京"]})
    assert "<tr><th>tags</th><td>[&quot;café&quot;, &quot;東京&quot;]</td></tr>" in page


def test_markdown_shows_each_field_as_a_row_people_read(cli, pictures, tmp_path):
    """Text as its text (markup characters escaped), numbers as written, true/false/null as
    JSON spells them, lists and objects as inline JSON code in their own script."""
    data = {"title": "a|b *c*", "pages": 3, "signed": True, "stamp": False, "date": None,
            "tags": ["café", "東京"], "to": {"名前": "Ann"}}  # fmt: skip
    text = report_of(cli, pictures[0], tmp_path / "fields.md", data)
    assert text.endswith(
        "| field | value |\n|---|---|\n| title | a\\|b \\*c\\* |\n| pages | 3 |\n| signed | true |\n"
        '| stamp | false |\n| date | null |\n| tags | `["café", "東京"]` |\n| to | `{"名前": "Ann"}` |\n'
    ), text


def test_csv_shows_each_field_in_its_column_as_a_spreadsheet_reads_it(cli, pictures, tmp_path):
    """A missing or null field is an empty cell, true/false and lists as JSON in their own
    script, numbers and text as they are."""
    data = {"pages": 3, "signed": True, "date": None, "tags": ["café", "東京"], "note": "a, b"}
    text = report_of(cli, pictures[0], tmp_path / "fields.csv", data)
    header, row = csv.reader(io.StringIO(text))
    cells = dict(zip(header, row, strict=True))
    assert header[4:-1] == ["title", "pages", "signed", "date", "tags", "note"]
    assert [cells[name] for name in header[4:-1]] == ["", "3", "true", "", '["café", "東京"]', "a, b"]


def test_compact_field_names_in_any_script(cli, pictures):
    schema = compact("émetteur, 名前, Größe:integer")
    assert list(schema["properties"]) == ["émetteur", "名前", "Größe"]
    record = cli(
        "caption", pictures[0], "--schema", "émetteur:boolean, 名前:boolean", "--max-new-tokens", "60"
    ).answered(1)[0]
    assert set(record["data"]) == {"émetteur", "名前"}


def test_ask_answers_a_json_object_too_from_the_cli_and_the_library(cli, pictures, tiny_model, capfd):
    """`ask --json-object` / `ask(..., json_object=True)`: the answer is a JSON object, as in
    `caption`; the library says nothing on stderr while it works (seed at temperature 0 included)."""
    import granite_cli

    line = cli("ask", str(pictures[0]), "Fields?", "--json-object", "--json", "--max-new-tokens", "40").stdout
    record = json.loads(line)
    assert isinstance(record["data"], dict) and record["data"] == json.loads(record["answer"], strict=False)
    capfd.readouterr()
    asked = granite_cli.ask(
        str(pictures[0]), "Fields?", json_object=True, max_new_tokens=40, seed=3, model=str(tiny_model)
    ).record
    assert isinstance(asked.data, dict) and asked.answer == record["answer"]
    assert capfd.readouterr().err == ""
    schema = '{"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}'
    structured = json.loads(cli("ask", str(pictures[0]), "Fields?", "--schema", schema, "--json").stdout)
    assert record["schema"] == "json-object" or record["schema"].startswith("sha256:")  # what the answer obeyed
    assert structured["schema"].startswith("sha256:") and structured["schema"] != record["schema"]


def test_a_model_whose_logits_are_wider_than_its_vocabulary_still_answers_valid_json(
    loaded_engines, monkeypatch, tiny_model, pictures
):
    """Models pad their output layer past the tokenizer's last token (to a multiple of 64, say).
    Those columns are no text: the grammar must forbid them too, even where the model favours
    them (here by a wide margin), and the answer is still schema-valid JSON."""
    import torch

    import granite_cli

    def padded(model: str, **options):
        engine = loaded_engines.real(model, **options)
        words = engine.model.get_output_embeddings().weight.shape[0]
        engine.model.resize_token_embeddings(words + 64)

        def favour_padding(module, inputs, logits):
            logits[..., words:] += 1e4  # the padding would win every step unless masked
            return logits

        engine.model.get_output_embeddings().register_forward_hook(favour_padding)
        return engine

    monkeypatch.setattr("granite_cli.engine.load_engine", padded)
    with torch.no_grad():
        records = granite_cli.caption(
            pictures[:1], model=str(tiny_model), schema=json.dumps(BOUNDED), max_new_tokens=60
        ).records
    assert [r.error for r in records] == [None]
    for record in records:
        jsonschema.validate(record.data, BOUNDED)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_grammar_never_reads_the_tokens_on_the_device_at_the_mask_step(monkeypatch, tiny_model, pictures, device):
    """A logits processor runs once `generate` has queued the step's forward: reading `input_ids`
    there (`.tolist()`) waits for that forward, and the GPU idles while the matchers work. The
    matchers get each step's tokens from the copy a stopping criterion started right after
    sampling; the processor touches `input_ids` not at all. The answers are those of the old
    synchronous read, token for token, rows ending at different steps included; on CUDA the
    host buffers are pinned (so the copies need no wait)."""
    import torch
    import xgrammar
    from torch.overrides import TorchFunctionMode

    import granite_cli
    from granite_cli.engine import grammar

    class Reads(TorchFunctionMode):
        """Every torch call, inside the processor, on a tensor sharing `input_ids`' memory."""

        def __init__(self, input_ids, calls: list):
            super().__init__()
            self.memory, self.calls = input_ids.untyped_storage().data_ptr(), calls

        def __torch_function__(self, func, types, args=(), kwargs=None):
            for arg in (*args, *(kwargs or {}).values()):
                if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == self.memory:
                    self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    mask_step, accept, start = (
        grammar.GrammarMask.__call__,
        xgrammar.BatchGrammarMatcher.batch_accept_token,
        grammar.GrammarMask.__init__,
    )

    def run(synchronous: bool):
        """The answers; what the processor did with `input_ids`; the tokens the matchers took,
        step by step; the processors."""
        reads, accepted, masks = [], [], []

        def watched(self, input_ids, scores):
            with Reads(input_ids, reads):
                return mask_step(self, input_ids, scores)

        def kept(self, *args, **kwargs):
            start(self, *args, **kwargs)
            masks.append(self)

        with monkeypatch.context() as patch:
            patch.setattr(grammar.GrammarMask, "__call__", watched)
            patch.setattr(grammar.GrammarMask, "__init__", kept)
            if synchronous:  # the old way: no copy under way, so `input_ids` is read at the mask step
                patch.setattr(grammar.SampledTokens, "__call__", lambda self, input_ids, scores, **kwargs: False)
            patch.setattr(
                xgrammar.BatchGrammarMatcher, "batch_accept_token", lambda m, t: accepted.append(t) or accept(m, t)
            )
            records = granite_cli.caption(
                pictures, model=str(tiny_model), schema=json.dumps(SCHEMAS["nested"]), max_new_tokens=60,
                batch_size=6, device=device, dtype="float32",
            ).records  # fmt: skip
        return [r.answer for r in records], reads, accepted, masks

    answers, reads, accepted, masks = run(synchronous=False)
    assert reads == [] and len(accepted) > 10
    assert len({len(step) for step in accepted}) > 1  # rows left their grammar at different steps
    if device == "cuda":
        assert masks[0].masks[0].tensor.is_pinned() and masks[0].sampled.tokens.tensor.is_pinned()
    old_answers, old_reads, old_accepted, _ = run(synchronous=True)
    assert (old_answers, old_accepted) == (answers, accepted)
    assert "tolist" in old_reads  # (the watch does see a read)
