"""The floor lane's helper: what pyproject.toml declares as each dependency's minimum, whether an
environment holds exactly those versions, and the tiny models' greedy answers (token ids) in that
environment, to compare with the newest versions' answers.

    python3 .ci/floors.py pins                 # "name==floor", one a line, from pyproject.toml
    python3 .ci/floors.py check                # exit 1 unless every dependency is at its floor
    python3 .ci/floors.py answers OUT MODEL... # token ids of greedy fp32 answers, as JSON

Run by `.ci/floors`; see the README's "Supported versions".
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors() -> dict[str, str]:
    """Every runtime dependency of pyproject.toml with the version its `>=` names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    result = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:,[^;]*)?(?:;.*)?", requirement)
        if match is None:
            raise SystemExit(f"pyproject.toml: {requirement!r} has no '>=' floor; every dependency needs one")
        result[match.group(1)] = match.group(2)
    return result


def check() -> int:
    """Print each dependency's installed version beside its floor; 1 if any differs."""
    wrong = 0
    for name, floor in floors().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        same = installed.split("+")[0] == floor
        wrong += not same
        print(f"{name:16} floor {floor:10} installed {installed}{'' if same else '   <-- not the floor'}")
    return 1 if wrong else 0


def answers(out: Path, models: list[str]) -> int:
    """Greedy fp32 answers of each model, through `caption`'s own path, at two batch sizes and
    with the prefill whole and in chunks of 16 tokens (chunking is what an older transformers
    got silently wrong): every answer's token ids, keyed by how it was made."""
    sys.path.insert(0, str(ROOT))
    from granite_cli.api import CaptionJob, run_caption
    from granite_cli.engine import EngineOptions, load_engine

    sources = [str(ROOT / "examples")]
    result = {}
    for model in models:
        for chunk in (0, 16):
            engine = load_engine(model, device="cpu", dtype="float32", options=EngineOptions(prefill_chunk=chunk))
            for rows in (1, 3):
                job = CaptionJob(sources=sources, model=model, max_new_tokens=12, batch_size=rows, dpi=72)
                records = run_caption(job, engine=engine).records
                key = f"{Path(model).name} chunk={chunk} rows={rows}"
                result[key] = [[r.source, r.page, r.error, list(r.token_ids)] for r in records]
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{out}: {sum(len(v) for v in result.values())} answers from {len(models)} model(s)", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["pins"]:
        print("\n".join(f"{name}=={version}" for name, version in floors().items()))
        return 0
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["answers"] and len(argv) >= 3:
        return answers(Path(argv[1]), argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
