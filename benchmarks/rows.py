#!/usr/bin/env python3
"""A benchmark run as rows, each saved the moment it ends, and the table made of them.

The GPU lane runs once, on a lent machine, under a hard time limit, and comes back with only
what it wrote: whatever it measured must survive a run cut short. So each row (the setup, each
path, each variant) runs through a `Journal`, which records it as ok, failed (with a one-line
reason) or out of time, appends it to PREFIX.rows.jsonl and rewrites PREFIX.json and PREFIX.md
at once. A failing row never stops the next one.

    python3 benchmarks/rows.py PREFIX "out of time"

settles the files of a run that was killed (the row then running: killed; rows never started:
skipped) and prints its table. Nothing here imports torch, so that this last step is quick.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

#: Each row's name in the table, by key (variants and --max-tiles rows add theirs).
LABELS = {
    "setup": "setup (model, workload, warm-up)",
    "card": "(a) model card loop",
    "batched": "(b) batched generate",
    "engine": "(c) granite-vision",
    "schema": "(c) --schema",
}
#: Statuses a row can end with; "pending" and "running" are on the way there.
SETTLED = ("ok", "failed", "killed", "skipped")
OUT_OF_TIME = "out of time"


class OutOfTime(BaseException):
    """Raised in the main thread at the deadline. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way (the engine's per-item error handling) takes it for an
    item's own error and carries on."""


def empty_report() -> dict:
    """The report's shape (throughput.py's JSON) before any row has run: every part absent."""
    return {
        "setup": None,
        "card": None,
        "batched": None,
        "engine": None,
        "ratio_engine_vs_card": None,
        "ratio_engine_vs_batched": None,
        "agreement_engine_vs_batched": None,
        "agreement_engine_vs_card": None,
        "variants": [],
        "schema": None,
        "max_tiles_sweep": [],
        "quantize_sweep": [],
        "rows": [],
    }


def one_line(error: BaseException) -> str:
    """Why a row failed, on one line: the exception's type and its message's first line."""
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


class Journal:
    """Runs the rows of one report and saves it after each. `deadline` (time.time() seconds):
    rows not started by then are skipped, and the one running then is interrupted (SIGALRM)."""

    def __init__(self, report: dict, prefix: Path | None = None, deadline: float | None = None) -> None:
        self.report = report
        self.prefix = prefix
        self.deadline = deadline
        self.out_of_time = False

    @property
    def rows(self) -> list[dict]:
        return self.report["rows"]

    @property
    def ok(self) -> bool:
        return all(row["status"] == "ok" for row in self.rows)

    def plan(self, rows: list[tuple[str, str]]) -> None:
        """Every row this run means to make, as (key, label), so the files show from the start
        which rows are still to come."""
        self.rows[:] = [{"key": key, "label": label, "status": "pending"} for key, label in rows]
        self.save()

    def run(self, key: str, measure: Callable[[], None], needs: str | None = None) -> bool:
        """Run one row: `measure` fills the report. Returns whether it ended ok."""
        row = self.row(key)
        if self.out_of_time or (self.deadline is not None and time.time() >= self.deadline):
            self.out_of_time = True
            return self.settle(row, "skipped", OUT_OF_TIME)
        if needs is not None and self.row(needs)["status"] != "ok":
            return self.settle(row, "skipped", f"needs {needs}, which did not end ok")
        row.update(status="running", started=round(time.time(), 3))
        self.save(event=row)
        began = time.perf_counter()
        try:
            with self._alarm():
                measure()
        except OutOfTime:
            self.out_of_time = True
            return self.settle(row, "killed", OUT_OF_TIME, began)
        except (Exception, SystemExit) as error:  # SystemExit: run_engine's "engine run failed"
            traceback.print_exc()
            return self.settle(row, "failed", one_line(error), began)
        return self.settle(row, "ok", None, began)

    def row(self, key: str) -> dict:
        return next(row for row in self.rows if row["key"] == key)

    def settle(self, row: dict, status: str, reason: str | None, began: float | None = None) -> bool:
        """Record how a row ended and save at once (a later kill loses nothing of it)."""
        row.pop("started", None)
        row.update(status=status, reason=reason)
        if began is not None:
            row["seconds"] = round(time.perf_counter() - began, 3)
        if status != "ok":
            print(f"row {row['label']}: {status}: {reason}", file=sys.stderr, flush=True)
        self.save(event=row)
        return status == "ok"

    @contextlib.contextmanager
    def _alarm(self) -> Iterator[None]:
        """Interrupt the row at the deadline. Python runs the handler between bytecodes of the main
        thread, so a row blocked for good inside one C call is left to the outer `timeout`."""
        if self.deadline is None:
            yield
            return

        def expire(signum, frame):
            raise OutOfTime

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, max(self.deadline - time.time(), 0.001))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def save(self, event: dict | None = None) -> None:
        """Append `event` (a row as it stands, with its data) to PREFIX.rows.jsonl, and rewrite
        PREFIX.json and PREFIX.md whole, each by an atomic rename."""
        if self.prefix is not None:
            save(self.report, self.prefix, event)


# --------------------------------------------------------------------------- files
def paths(prefix: Path) -> dict[str, Path]:
    """The files of a run: PREFIX.json (the report), .md (its table), .rows.jsonl (one line per
    row event). Few on purpose: the GPU machine hands back at most 8 files."""
    return {kind: prefix.with_name(prefix.name + suffix) for kind, suffix in
            (("json", ".json"), ("md", ".md"), ("rows", ".rows.jsonl"))}  # fmt: skip


def save(report: dict, prefix: Path, event: dict | None = None) -> None:
    files = paths(prefix)
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    if event is not None:
        line = {**event, "time": round(time.time(), 3), "data": data_for(report, event["key"])}
        with files["rows"].open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(line) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
    _replace(files["json"], json.dumps(report, indent=2))
    _replace(files["md"], render(report) + "\n")


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def data_for(report: dict, key: str) -> dict | None:
    """A row's measurements in the report, by the row's key."""
    if key in LABELS:
        return report.get(key)
    rows = report["variants"] + report["max_tiles_sweep"] + report.get("quantize_sweep", [])
    return next((row for row in rows if row.get("key") == key), None)


def finish(prefix: Path, why: str) -> bool:
    """Settle the rows of a run that ended without doing so itself (killed at the deadline, or
    died): the row then running is "killed", rows never started "skipped", both for `why`.
    Prints the table when anything was left to settle, or when no table was written yet."""
    files = paths(prefix)
    if not files["json"].exists():
        print(f"no row was recorded ({why}): {files['json']} is missing", file=sys.stderr)
        return False
    report = json.loads(files["json"].read_text(encoding="utf-8"))
    open_rows = [row for row in report["rows"] if row["status"] not in SETTLED]
    for row in open_rows:
        row.pop("started", None)
        row.update(status="killed" if row["status"] == "running" else "skipped", reason=why)
        save(report, prefix, event=row)
    if open_rows or not files["md"].exists():
        save(report, prefix)
        print(render(report))
    return True


# --------------------------------------------------------------------------- the table
def _cells(label: str, row: dict) -> str:
    peak = "-" if row.get("peak_gpu_gib") is None else row["peak_gpu_gib"]
    return (
        f"| {label} | {row['items']} | {row['images_per_s']} | {row['new_tokens_per_s']} | {row['first_result_s']}"
        f" | {peak} |"
    )


def _unfinished(row: dict) -> str:
    reason = f": {row['reason']}" if row.get("reason") else ""
    text = f"{row['label']} — {row['status']}{reason}".replace("|", "\\|")
    return f"| {text} | - | - | - | - | - |"


def _ok_line(report: dict, row: dict) -> str | None:
    """A finished row's line, with what it adds to its label (answered, valid, tokens/page)."""
    data = data_for(report, row["key"])
    if row["key"] == "setup" or data is None:
        return None
    label = row["label"]
    if "quantize" in data:
        agreement = data.get("agreement_vs_batched")
        first = f", first tokens {agreement['first_token']:.0%} as bf16 (b)" if agreement else ""
        label += f" (weights {data['weights_gib']} GiB{first})"
    elif "answered" in data:
        agreement = data.get("agreement_vs_batched")
        first = f", first tokens {agreement['first_token']:.0%}" if agreement else ""
        label += f" ({data['answered']}/{data['items']} answered{first})"
    elif "max_tiles" in data:
        label += f" (~{data['prompt_tokens_per_page']} tok/page)"
    elif "valid" in data:
        label += f" ({data['valid']}/{data['items']} valid)"
    return _cells(label, data)


def _header(report: dict) -> str:
    setup = report["setup"]
    if setup is None:
        return "no setup recorded (its row says why)"
    budget = f", engine rows <= {setup['engine_rows']}" + (
        f", <= {setup['engine_tokens']:,} tokens" if setup["engine_tokens"] else ""
    )
    return (
        f"model {setup['model']} ({setup['dtype']}, {setup['device']}{', ' + setup['gpu'] if setup['gpu'] else ''}),"
        f" {setup['items']} items ({setup['pages']} pages, {setup['photos']} photos), (b) batch"
        f" {setup['baseline_batch']}{budget}, {setup['new_tokens']} new tokens, ~{setup['prompt_tokens_per_page']}"
        " prompt tokens/page"
    )


def _footer(report: dict) -> list[str]:
    lines = []
    ratios = [
        f"c/{path} = {report[f'ratio_engine_vs_{name}']}x"
        for path, name in (("a", "card"), ("b", "batched"))
        if report[f"ratio_engine_vs_{name}"] is not None
    ]
    if ratios:
        lines.append(", ".join(ratios))
    agreements = []
    for path, name in (("b", "batched"), ("a", "card")):
        agreement = report[f"agreement_engine_vs_{name}"]
        if agreement:
            agreements.append(f"(c) vs ({path}): first token {agreement['first_token']:.1%},"
                              f" all tokens {agreement['all_tokens']:.1%}")  # fmt: skip
    if agreements:
        lines.append("agreement " + "; ".join(agreements))
    row = report.get("schema")
    if row:
        lines.append(
            f"schema slowdown vs free text of the same length ({row['answer_tokens_mean']} tokens, same limits):"
            f" {row['slowdown']:.1%} ({row['free_text_same_length']['images_per_s']} -> {row['images_per_s']} images/s)"
        )
    return lines


def render(report: dict) -> str:
    """The markdown table of whatever rows there are: a finished row's numbers, or the row's
    status and reason (failed, killed, skipped, pending, running)."""
    lines = [
        _header(report),
        "",
        "| path | items | images/s | new tokens/s | first result s | peak GPU GiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["status"] == "ok":
            line = _ok_line(report, row)
            if line:
                lines.append(line)
        else:
            lines.append(_unfinished(row))
    footer = _footer(report)
    return "\n".join(lines + ([""] + footer if footer else []))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} PREFIX WHY")
    sys.exit(0 if finish(Path(sys.argv[1]), sys.argv[2]) else 1)
