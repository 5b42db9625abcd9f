"""What the tests share besides fixtures (those are in conftest.py): pictures and PDFs made on
the spot, the CLI's result as a test reads it, a subprocess runner, and small checks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MAX_NEW = "6"
"""Answer length of most tests: long enough to be an answer, short enough to be quick."""
MIXED_SIZES = [(640, 480), (300, 900), (1000, 250), (56, 56), (1275, 1650), (800, 600), (120, 1200)]


@contextlib.contextmanager
def c_locale() -> Iterator[None]:
    """The C (ASCII) locale for what runs inside: where files opened without an encoding would
    stop being UTF-8."""
    import locale

    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def disk_full(*args, **kwargs):
    """A stand-in for any write that meets a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with content (so the model sees something different for each seed)."""
    import random

    rng = random.Random(seed)
    image = Image.effect_noise((width, height), 20 + rng.randint(0, 80)).convert("RGB")
    tint = Image.new("RGB", (width, height), (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    return Image.blend(image, tint, 0.5)


def make_pdf(path: Path, pages: int, seed: int = 0) -> Path:
    images = [noise(612, 792, seed + i) for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


class Collect(list):
    """A writer that keeps the records it is given, for driving `pipeline.caption` directly."""

    def write(self, record) -> None:
        self.append(record)

    def close(self) -> None:
        pass


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def answered(self, count: int) -> list[dict]:
        """The records of a run that must have succeeded: exit 0, `count` records, each answered.
        Every comparison between runs starts here, so that two failed runs never compare equal."""
        assert self.exit_code == 0, self.stderr
        records = self.records()
        assert len(records) == count and all(r["answer"] is not None for r in records), records
        return records

    def ok(self) -> Result:
        """A run that must have succeeded (exit 0), whatever it wrote where."""
        assert self.exit_code == 0, self.stderr
        return self

    def record(self) -> dict:
        """The one JSON record of a successful `ask --json`."""
        assert self.exit_code == 0, self.stderr
        record = json.loads(self.stdout)
        assert record["answer"] is not None and record["error"] is None, record
        return record


def run_process(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None):
    """Run `python -m granite_cli ...` as a real subprocess (real stdin/stdout pipes, no TTY)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "granite_cli", *args],
        input=input,
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


def minimal_pdf(page_sizes: list[tuple[float, float]]) -> bytes:
    """A valid PDF with empty pages of the given sizes in points (zero pages allowed)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(len(page_sizes)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(page_sizes)} >>".encode())
    for width, height in page_sizes:
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] >>".encode())
    return pdf_bytes(objects)


def text_pdf(path: Path, lines: list[str]) -> Path:
    """A one-page letter PDF whose text layer holds `lines` (Helvetica, one a line)."""
    stream = "".join(f"BT /F1 10 Tf 20 {780 - 12 * i} Td ({line}) Tj ET\n" for i, line in enumerate(lines)).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    path.write_bytes(pdf_bytes(objects))
    return path


def pdf_bytes(objects: list[bytes]) -> bytes:
    """A PDF file of these objects (numbered from 1, the first the catalog), with its xref table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def many_images(root: Path, count: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"img{i:04d}.png"
        Image.new("RGB", (24 + i % 40, 24 + (i * 7) % 40), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(path)
        paths.append(str(path))
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tree_hashes(root: Path) -> dict[str, str]:
    """Every entry under `root` with what it is: a file's bytes, a link's target, a special
    file's type. Equal before and after a run means the run touched none of them."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[str(path)] = "link:" + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif not stat.S_ISDIR(info.st_mode):
            found[str(path)] = f"special:{stat.S_IFMT(info.st_mode)}"
    return found


class deadline:
    """Fail the test, instead of hanging it, if the block takes longer than `seconds`."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def expired(signum, frame):
            raise TimeoutError(f"blocked for {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(self.seconds)

    def __exit__(self, *exc_info) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def model_card_answers(model_dir, image_paths, question, max_new_tokens, token_ids=False):
    """The model card's sample, one image per `generate`, as a user would run it by hand: the
    answers' text, or (`token_ids`) their token ids up to the end-of-text token."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    answers = []
    for path in image_paths:
        conversation = [
            {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": question}]}
        ]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0][inputs["input_ids"].shape[1] :].tolist()
        if token_ids:
            eos = model.generation_config.eos_token_id
            answers.append(tuple(new[: new.index(eos)] if eos in new else new))
        else:
            answers.append(processor.decode(new, skip_special_tokens=True).strip())
    return answers


def seen_picture(source, engine, *, page: int | None = None, **read):
    """The picture the model is handed for `source` (after shrinking while decoding, or rendering
    a PDF page at the size the model uses), as the pipeline loads it."""
    from granite_cli.pipeline import load_item
    from granite_cli.readers import OpenDocuments, ReadOptions
    from granite_cli.sources import resolve

    items = [item for item in resolve([str(source)], read=ReadOptions(**read)).items if item.page == page]
    loaded = load_item(0, items[0], OpenDocuments(ReadOptions(**read)), engine.fit if engine else None)
    assert loaded.image is not None, loaded.error
    return loaded.image


def seen_size(source, engine, *, page: int | None = None, **read) -> tuple[int, int]:
    return seen_picture(source, engine, page=page, **read).size


def force_tokens(monkeypatch, model, processor) -> None:
    """Every `generate` of this model's class (every engine of it, the CLI's too) runs `processor`
    after its own logits processors: a test's way to make rows say what it needs (a loop, an end)."""
    model_class = type(model)
    real = model_class.generate

    def generate(self, *args, **kwargs):
        kwargs["logits_processor"] = [*kwargs.get("logits_processor", []), processor]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "generate", generate)


def caption_with(engine, paths, limits, max_new_tokens: int = 4, **settings) -> list:
    """The pipeline over `paths` with a loaded engine (no CLI, no output file): the records, after
    checking every item came back once, in input order."""
    from granite_cli import pipeline
    from granite_cli.engine import GenerationSettings
    from granite_cli.records import Job
    from granite_cli.sources import resolve

    records = Collect()
    job, settings = Job("Describe", engine.name), GenerationSettings(max_new_tokens=max_new_tokens, **settings)
    pipeline.caption(resolve([str(p) for p in paths]).items, engine, records, job=job, settings=settings, limits=limits)
    assert [r.source for r in records] == [str(p) for p in paths]  # every item once, in input order
    return records
