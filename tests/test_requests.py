"""`caption --requests`: request files in our shape and in OpenAI's batch input format, and
`--format openai-batch` output read back with the `openai` package's own types."""

from __future__ import annotations

import base64
import json

import pytest
from helpers import noise, read_jsonl, text_pdf

openai_types = pytest.importorskip("openai.types.chat")


@pytest.fixture
def requests_file(tmp_path):
    noise(50, 40, 1).save(tmp_path / "a.png")
    noise(40, 60, 2).save(tmp_path / "b.png")
    text_pdf(tmp_path / "doc.pdf", ["Invoice 77", "Total 12.50"])
    picture = "data:image/png;base64," + base64.b64encode((tmp_path / "b.png").read_bytes()).decode()
    lines = [
        {"source": str(tmp_path / "a.png"), "prompt": "What is shown?", "id": "one"},
        {"source": str(tmp_path / "doc.pdf"), "page": 1, "prompt": "Read: {text}", "max_new_tokens": 3, "id": "two"},
        "this line is no JSON",
        {"source": str(tmp_path / "a.png"), "schema": "title", "max_new_tokens": 40, "id": "three"},
        {
            "custom_id": "four",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": picture}},
                            {"type": "text", "text": "Hi?"},
                        ],
                    }
                ],
            },
        },
        {"source": str(tmp_path / "missing.png"), "id": "five"},
        {"source": str(tmp_path / "a.png"), "prompt": "{nope}", "id": "six"},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_each_request_is_answered_with_its_own_prompt_schema_and_length(cli, requests_file, tmp_path):
    result = cli("caption", "--requests", str(requests_file), "--max-new-tokens", "6")
    assert result.exit_code == 1
    records = result.records()
    assert [record.get("id") for record in records] == ["one", "two", None, "three", "four", "five", "six"]
    one, two, bad, three, four, five, six = records
    assert one["prompt"] == "What is shown?" and one["answer_tokens"] == 6
    assert two["prompt"] == "Read: Invoice 77\nTotal 12.50" and two["answer_tokens"] == 3 and two["page"] == 1
    assert bad["source"] == f"{requests_file}:3" and bad["error"].startswith("not JSON")
    assert three["schema"].startswith("sha256:") and three["answer"].startswith('{"title":')
    assert four["prompt"] == "Hi?" and four["answer_tokens"] == 5
    assert five["error"] == "no such file"
    assert six["source"] == f"{requests_file}:7" and "unknown field {nope}" in six["error"]
    # the same answers as separate runs of each request
    alone = cli("caption", str(tmp_path / "a.png"), "--prompt", "What is shown?", "--max-new-tokens", "6").answered(1)
    assert alone[0]["answer"] == one["answer"]
    via_stdin = cli("caption", "--requests", "-", "--max-new-tokens", "6", input=requests_file.read_bytes()).records()
    assert via_stdin[2]["source"] == "<stdin>:3"
    assert [(r.get("id"), r["answer"], r["error"]) for r in via_stdin] == [
        (r.get("id"), r["answer"], r["error"]) for r in records
    ]


def test_openai_batch_output_parses_with_openai_types_and_resumes_exactly_once(cli, requests_file, tmp_path):
    out = tmp_path / "batch_output.jsonl"
    first = cli(
        "caption", "--requests", str(requests_file), "-f", "openai-batch", "-o", str(out), "--max-new-tokens", "6"
    )
    assert first.exit_code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["one", "two", f"{requests_file}:3", "three", "four", "five", "six"]
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        if line["response"]["status_code"] == 200:
            completion = openai_types.ChatCompletion.model_validate(line["response"]["body"])
            assert completion.choices[0].message.content is not None and completion.usage.completion_tokens > 0
        else:
            assert line["response"]["status_code"] == 400 and line["response"]["body"]["error"]["message"]
    answered = {line["custom_id"] for line in lines if line["response"]["status_code"] == 200}
    assert {"one", "two", "four"} <= answered
    kept = sum(
        line["response"]["status_code"] == 200 and not line["response"]["body"]["granite_vision"]["error"]
        for line in lines
    )
    again = cli(
        "caption",
        "--requests",
        str(requests_file),
        "-f",
        "openai-batch",
        "-o",
        str(out),
        "--resume",
        "--max-new-tokens",
        "6",
    )
    assert f"{kept} answered before, {7 - kept} to run" in again.stderr
    journal = read_jsonl(out.with_name(out.name + ".jsonl"))
    ids = [record.get("id") for record in journal]
    assert len(ids) == len(set(ids)) == 7  # each request once


def test_requests_and_sources_together_are_a_usage_error(cli, requests_file, tmp_path):
    result = cli("caption", str(tmp_path / "a.png"), "--requests", str(requests_file))
    assert result.exit_code == 2 and "--requests and SOURCE: give one" in result.stderr
    twice = tmp_path / "twice.jsonl"
    a, b = json.dumps(str(tmp_path / "a.png")), json.dumps(str(tmp_path / "b.png"))
    twice.write_text(f'{{"source": {a}, "id": "x"}}\n{{"source": {b}, "id": "x"}}\n')
    result = cli("caption", "--requests", str(twice))
    assert result.exit_code == 2 and "lines 1 and 2 ask id 'x'; each must differ" in result.stderr
    twice.write_text(f'{{"source": {a}, "prompt": "A"}}\n{{"source": {a}, "prompt": "A"}}\n')
    result = cli("caption", "--requests", str(twice))
    assert result.exit_code == 2 and "lines 1 and 2 ask the same of one picture (give them ids)" in result.stderr

    # without ids, a request is known by its picture and prompt: none lost, and --resume finds each
    lines = tmp_path / "no-ids.jsonl"
    lines.write_text(f'{{"source": {a}, "prompt": "A"}}\n{{"source": {a}, "prompt": "B"}}\n{{"source": {b}}}\n')
    out = tmp_path / "no-ids.out.jsonl"
    assert cli("caption", "--requests", str(lines), "-o", str(out)).exit_code == 0 and len(read_jsonl(out)) == 3
    again = cli("caption", "--requests", str(lines), "-o", str(out), "--resume")
    assert "3 answered before, 0 to run" in again.stderr and len(read_jsonl(out)) == 3

    # OpenAI's text is literal: braces are no fields
    literal = tmp_path / "literal.jsonl"
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}},
        {"type": "text", "text": 'Answer like {"total": 0}'},
    ]}]}  # fmt: skip
    literal.write_text(json.dumps({"custom_id": "q", "body": body}) + "\n")
    record = cli("caption", "--requests", str(literal)).answered(1)[0]
    assert record["prompt"] == 'Answer like {"total": 0}' and record["id"] == "q"
