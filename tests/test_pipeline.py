"""The producer: windows cut in whole batches after a small first one."""

from __future__ import annotations

from helpers import caption_with, noise

from granite_cli.engine import BatchLimits


def rows_run(engine, monkeypatch) -> list[int]:
    """The rows of every batch the engine runs, in order."""
    rows: list[int] = []
    real = engine.run

    def run(inputs, settings, stream=None):
        rows.append(int(inputs["input_ids"].shape[0]))
        return real(inputs, settings, stream)

    monkeypatch.setattr(engine, "run", run)
    return rows


def alike(tmp_path, count: int) -> list:
    """`count` pictures of one size: one prompt length, so the limits alone cut batches."""
    paths = []
    for i in range(count):
        noise(40, 40, seed=i).save(tmp_path / f"{i:03d}.png")
        paths.append(tmp_path / f"{i:03d}.png")
    return paths


# --------------------------------------------------------------------------- windows
def test_a_window_is_whole_batches():
    from granite_cli.pipeline import window_size

    # Four batches, up to 128 pictures; never a batch cut short by the window's end, one at least.
    assert [window_size(rows) for rows in (1, 8, 12, 32, 50, 106, 128, 200)] == [4, 32, 48, 128, 100, 106, 128, 200]
    # The rows a batch holds under a token budget: a budget too small for even one prompt still
    # makes batches of one (each such picture is tried alone), so windows of four pictures.
    assert [BatchLimits(8, tokens=budget).most_rows(60, 10) for budget in (10, 70, 139, 140, 10**6)] == [1, 1, 1, 2, 8]


def test_the_first_batch_is_small_and_the_others_are_whole(tiny_engine, tmp_path, monkeypatch):
    """40 pictures at --batch-size 12: eight first (the model starts as soon as they are read),
    then windows of four whole batches; only the run's end is short."""
    rows = rows_run(tiny_engine, monkeypatch)
    caption_with(tiny_engine, alike(tmp_path, 40), BatchLimits(12), max_new_tokens=1)
    assert rows == [8, 12, 12, 8]


def test_windows_follow_the_rows_a_token_budget_allows(tiny_engine, tmp_path, monkeypatch):
    """A budget that holds three of these prompts (as a GPU's memory plan holds 106 pages where
    --batch-size says 128): after the first window, windows of four batches of three, where a
    window of 32 pictures would cut a batch of two off every tenth."""
    paths = alike(tmp_path, 28)
    tokens = tiny_engine.tokens("Describe", 40, 40) + 1
    rows = rows_run(tiny_engine, monkeypatch)
    caption_with(tiny_engine, paths, BatchLimits(8, tokens=3 * tokens + 1), max_new_tokens=1)
    assert rows == [3, 3, 2] + [3] * 4 + [3, 3, 2]


def test_a_window_whose_pictures_all_fail_does_not_stop_a_budgeted_run(tiny_engine, tmp_path, monkeypatch):
    """The first window (8 pictures) all unreadable, under a token budget: the next window is
    still cut (for no prompt at all) and its pictures answered."""
    broken = []
    for i in range(8):
        (tmp_path / f"a{i}.png").write_text("not a picture")
        broken.append(tmp_path / f"a{i}.png")
    good = alike(tmp_path, 4)
    tokens = tiny_engine.tokens("Describe", 40, 40) + 1
    rows = rows_run(tiny_engine, monkeypatch)
    records = caption_with(tiny_engine, broken + good, BatchLimits(8, tokens=3 * tokens + 1), max_new_tokens=1)
    assert [r.ok for r in records] == [False] * 8 + [True] * 4
    assert rows == [3, 1]
