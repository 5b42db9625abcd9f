"""Several prompts per picture (one encode), and prompts whose fields are filled per picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import noise, read_jsonl, text_pdf

QUESTIONS = ["What is shown?", "List three tags.", "What colour dominates?"]


@pytest.fixture
def counted(tiny_engine, monkeypatch):
    """The rows (pictures) the vision tower encodes, call by call."""
    rows: list[int] = []
    kind = type(tiny_engine.model.base_model)  # (every loaded copy of the tiny model)
    real = kind.get_image_features

    def spy(self, **kwargs):
        rows.append(kwargs["pixel_values"].shape[0])
        return real(self, **kwargs)

    monkeypatch.setattr(kind, "get_image_features", spy)
    return rows


def test_three_prompts_encode_each_picture_once_and_answer_as_three_runs(cli, mixed_images, counted):
    """Each picture goes through the vision tower once for all its prompts (counted), and each
    answer equals the one a run of that prompt alone gives, token for token."""
    pictures = [str(path) for path in mixed_images[:3]]
    alone = {}
    for question in QUESTIONS:
        counted.clear()
        alone[question] = [r["answer"] for r in cli("caption", *pictures, "--prompt", question).answered(3)]
        assert sum(counted) == 3
    counted.clear()
    options = [part for question in QUESTIONS for part in ("--prompt", question)]
    together = cli("caption", *pictures, *options).answered(9)
    assert sum(counted) == 3  # three pictures, three prompts: three encodes, not nine
    assert [(r["source"], r["prompt"], r["prompt_template"]) for r in together] == [
        (picture, question, question) for picture in pictures for question in QUESTIONS
    ]
    for index, question in enumerate(QUESTIONS):
        assert [r["answer"] for r in together[index::3]] == alone[question]


@pytest.mark.slow
def test_resume_sidecars_and_reports_track_picture_and_prompt(cli, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(2):
        noise(48, 32, seed=index).save(folder / f"p{index}.png")
    out = tmp_path / "out.jsonl"
    first = cli("caption", str(folder), "--prompt", "A?", "--prompt", "B?", "-o", str(out))
    assert first.exit_code == 0 and len(read_jsonl(out)) == 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("B?\n\nC?\n")
    more = cli("caption", str(folder), "--prompt", "A?", "--prompts", str(prompts), "-o", str(out), "--resume")
    assert more.exit_code == 0 and "4 answered before, 2 to run" in more.stderr
    records = read_jsonl(out)
    assert [(Path(r["source"]).name, r["prompt"]) for r in records] == [
        (name, prompt) for name in ("p0.png", "p1.png") for prompt in ("A?", "B?", "C?")
    ]
    again = cli("caption", str(folder), "--prompt", "A?", "--prompts", str(prompts), "-o", str(out), "--resume")
    assert again.exit_code == 0 and read_jsonl(out) == records  # nothing twice

    sidecars = cli("caption", str(folder), "--prompt", "A?", "--prompt", "B?", "--sidecar", ".txt")
    assert sidecars.exit_code == 0
    answers = {(r["source"], r["prompt"]): r["answer"] for r in sidecars.records()}
    for name in ("p0", "p1"):
        assert (folder / f"{name}.1.txt").read_text() == answers[(str(folder / f"{name}.png"), "A?")] + "\n"
        assert (folder / f"{name}.2.txt").read_text() == answers[(str(folder / f"{name}.png"), "B?")] + "\n"

    report = cli("caption", str(folder), "--prompt", "A?", "--prompt", "B?", "-f", "markdown").stdout
    assert report.count("## `") == 2 and report.count("**A?**") == 2 and report.count("**B?**") == 2
    assert report.index("**B?**") < report.index("p1.png")  # a picture's answers together
    html = tmp_path / "r.html"
    assert cli("caption", str(folder), "--prompt", "A?", "--prompt", "B?", "-o", str(html)).exit_code == 0
    text = html.read_text()
    assert text.count('<article class="card more') == 2 and text.count('<p class="prompt">B?</p>') == 2


def test_prompt_fields_are_filled_per_picture_and_text_is_the_pages_own(cli, tmp_path):
    pdf = text_pdf(tmp_path / "invoice.pdf", ["Invoice 0042", "Total due 4711 EUR"])
    noise(40, 30).save(tmp_path / "photo.png")
    template = "File {name} ({stem}, page {page} of {pages}) in {folder}: {{text}} is {text}"
    result = cli("caption", str(pdf), str(tmp_path / "photo.png"), "--prompt", template)
    records = result.answered(2)
    assert (
        records[0]["prompt"]
        == (f"File invoice.pdf (invoice, page 1 of 1) in {tmp_path}: {{text}} is Invoice 0042\nTotal due 4711 EUR")
        or "Total due 4711 EUR" in records[0]["prompt"]
    )
    assert records[0]["prompt"].startswith(f"File invoice.pdf (invoice, page 1 of 1) in {tmp_path}: {{text}} is ")
    assert "Total due 4711 EUR" in records[0]["prompt"] and records[0]["prompt_template"] == template
    assert records[1]["prompt"] == f"File photo.png (photo, page 1 of 1) in {tmp_path}: {{text}} is "


def test_text_is_cut_to_what_fits_the_context(cli, tmp_path):
    """A page whose text layer is longer than the context leaves: `{text}` is cut so that the
    picture, the prompt and the answer fit, and the picture is answered."""
    lines = [f"Line {index:03} of a long document with many words on it" for index in range(60)]
    pdf = text_pdf(tmp_path / "long.pdf", lines)
    record = cli("caption", str(pdf), "--prompt", "{text}" * 12, "--max-new-tokens", "8").answered(1)[0]
    assert 4096 - 8 - 400 < record["prompt_tokens"] <= 4096 - 8
    assert record["prompt"].startswith("Line 000")


def test_a_bad_field_is_a_usage_error_before_any_model_loads(cli, broken_model, tmp_path):
    noise(30, 30).save(tmp_path / "a.png")
    for prompt, said in (("{nam}", "unknown field {nam}"), ("a {", "Single '{' encountered"), ("{name!r}", "{name}")):
        result = cli("caption", str(tmp_path / "a.png"), "--prompt", prompt, model=broken_model)
        assert result.exit_code == 2 and said in result.stderr and "broken-model" not in result.stderr, prompt
    braces = cli("caption", str(tmp_path / "a.png"), "--prompt", 'JSON like {{"a": 1}}').answered(1)[0]
    assert braces["prompt"] == 'JSON like {"a": 1}' and "prompt_template" not in braces
    assert json.loads(cli("caption", str(tmp_path / "a.png")).stdout)["prompt"] == "Describe this image in detail."


def test_a_prompt_added_to_a_one_prompt_run_runs_alone_and_odd_names_fill_fields(cli, tmp_path):
    """A run of one plain prompt, resumed with a second: only the new prompt runs. A name whose
    bytes are not UTF-8 fills `{name}` as `\\xff` (a prompt is text): answered, not a crash."""
    folder = tmp_path / "pics"
    folder.mkdir()
    noise(40, 30).save(folder / "a.png")
    noise(40, 30, seed=1).save(folder / b"odd\xff.png".decode("utf-8", "surrogateescape"))
    out = tmp_path / "out.jsonl"
    assert cli("caption", str(folder), "--prompt", "A?", "-o", str(out)).exit_code == 0
    more = cli("caption", str(folder), "--prompt", "A?", "--prompt", "B?", "-o", str(out), "--resume")
    assert more.exit_code == 0 and "2 answered before, 2 to run" in more.stderr
    assert sorted(r["prompt"] for r in read_jsonl(out)) == ["A?", "A?", "B?", "B?"]
    named = cli("caption", str(folder), "--prompt", "This is {name}.").answered(2)
    assert [r["prompt"] for r in named] == ["This is a.png.", "This is odd\\xff.png."]
