"""Generated mutants over the whole package, a score per module, and the survivors to triage.

    python3 tests/mutants.py                  # every module (hours on 2 cores; results are cached)
    python3 tests/mutants.py records sidecars # some modules (minutes each)
    python3 tests/mutants.py --report         # the table of the last runs, without running
    python3 tests/mutants.py --report --readme  # ... and into the README's development section
    python3 tests/mutants.py --survivors      # every surviving mutant's diff, to triage
    python3 tests/mutants.py --recheck        # the survivors again, once tests were added

mutmut (3.x) makes the mutants from the code itself, so nobody chooses them; it runs the fast test
lane once to learn which tests reach which function, then runs each mutant against only those
tests (a forked worker per mutant, torch imported once; a string literal gets one mutant, "XX"
around it, not three: see `mutmut`). It works in a copy of the tree under
`build/mutants/` (git-ignored), which keeps its results between runs: a function that did not
change is not mutated and tested again. Not part of `.ci/run`.

A surviving mutant that changes no behaviour a user can see is listed, with its reason, in
`tests/equivalent_mutants.toml` and counted apart; every other survivor is a missing test. The
score of a module is killed / (mutants - equivalent); timeouts count as killed (the tests noticed).
Targets: 90% for the modules that guard a user's files and records, 75% elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutants"
EQUIVALENTS = ROOT / "tests" / "equivalent_mutants.toml"
SLOW_LANE = ROOT / "tests" / "slow_lane_mutants.toml"
SLOW_VERDICTS = WORK / "slow-lane.json"
#: What the copy needs besides the package: the tests and what they read.
COPIED = ["granite_cli", "tests", "benchmarks", "examples", "docs", ".ci", "README.md", "LICENSE", "pyproject.toml"]
#: Modules that guard a user's files and records (and what was split out of them).
GUARDS = {
    "output", "ownership", "streamoutput", "journal", "writers", "writer_base", "htmlreport", "sidecars", "sources",
    "inputs", "readers", "pictures", "pipeline", "batching", "schema", "records",
}  # fmt: skip
TARGET = {True: 0.90, False: 0.75}
NOT_MUTATED = ["granite_cli/tiny_model.py"]  # test scaffolding: a model builder, not behaviour
KILLED = {1, 3, 36, 24, -24, 152, 255}  # a failing test, or one that never finished (a timeout)
SURVIVED = {0}
NO_TEST = {33}  # no test of the fast lane reaches its function in-process: a survivor too
#: Seconds one test may take under a mutant (the slowest fast-lane test takes 5): a mutant that
#: hangs a test is killed then, not after mutmut's limit for all its tests (up to 9 min).
TEST_LIMIT = 30
#: Where the tests' temporary folders go during these runs, emptied before and after each. Each
#: mutant's session ends in `os._exit`, so pytest never prunes its old folders: left under the
#: system's temp folder, thousands of sessions once filled a 250 GB disk.
TEMP_ROOT = WORK / "tmp"
SLOW_TEMP_ROOT = WORK / "tmp-slow"  # its own: a slow-lane run beside a mutmut run empties only its own
#: Which test killed which mutant (the conftest writes it): kept between runs, so that each
#: mutant runs first the tests that killed its function's other mutants.
KILLERS = WORK / "killers.tsv"
#: While a --recheck runs: the tests that existed when the survivors survived. The others, new
#: since, are the likeliest to kill them, and run first.
OLD_TESTS = WORK / "old-tests.json"
#: The tiny models every test session of these runs shares (built once: thousands of sessions).
MODELS = WORK / "models"


@dataclass
class Module:
    name: str
    seconds: float = 0.0
    """Wall time its timed mutants took, each from its submission to its verdict (one worker's
    time: with two at once, a run takes about half)."""
    timed: int = 0
    """Mutants whose time was measured (runs before the timing was added have none)."""
    survivor_seconds: float = 0.0
    survivors_timed: int = 0
    """Of those, the survivors: a survivor runs every test that reaches it, a killed mutant one."""
    killed: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    equivalent: list[str] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)
    """No test reaches its function: it survives by definition."""
    pending: list[str] = field(default_factory=list)
    """Not run (yet): a run was stopped, or is under way."""

    @property
    def counted(self) -> int:
        """Mutants that have a verdict and change behaviour: the score's denominator."""
        return len(self.killed) + len(self.survived) + len(self.untested)

    @property
    def score(self) -> float:
        return len(self.killed) / self.counted if self.counted else 1.0

    @property
    def guard(self) -> bool:
        return self.name.rpartition("/")[2].removesuffix(".py") in GUARDS


def module_path(name: str) -> str:
    """`records`, `engine/hf`, `granite_cli/records.py` -> `granite_cli/records.py`."""
    name = name.removeprefix("granite_cli/").removesuffix(".py").replace(".", "/")
    return f"granite_cli/{name}.py"


def source_of(module: str) -> str:
    """`granite_cli.engine.hf` -> `granite_cli/engine/hf.py`; a package -> its `__init__.py`."""
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def all_modules() -> list[str]:
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "granite_cli").rglob("*.py"))
    return [p for p in paths if p not in NOT_MUTATED and not p.endswith("__main__.py")]


def sync() -> None:
    """Copy the tree into the work folder (mutmut's own `mutants/` there is kept: its cache)."""
    WORK.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        replace(ROOT / name, WORK / name)


def replace(source: Path, target: Path) -> None:
    """`target` made a fresh copy of `source` (a folder without its bytecode, or a file)."""
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif source.exists():
        shutil.copy2(source, target)


def configure(modules: list[str], jobs: int) -> None:
    """mutmut's settings, in the copy's pyproject.toml (the real one stays as it is)."""
    lines = [
        "",
        "[tool.mutmut]",
        'source_paths = ["granite_cli/"]',
        f"only_mutate = {json.dumps(modules)}",
        f"do_not_mutate = {json.dumps(NOT_MUTATED)}",
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-q", "-x"]',
        'pytest_add_cli_args_test_selection = ["tests/"]',
        'also_copy = ["benchmarks/", "examples/", "docs/", ".ci/", "README.md", "LICENSE"]',
        'process_isolation = "forkserver"',
        "use_git_change_detection = false",
        "timeout_multiplier = 6.0",
    ]
    with open(WORK / "pyproject.toml", "a") as handle:
        handle.write("\n".join(lines) + "\n")


def run(modules: list[str], jobs: int, names: list[str] = ()) -> float:
    """mutmut over `modules`. Its map of which tests reach which function is made for the modules
    it instruments: a run over other modules than the last one makes the map afresh (else
    functions first instrumented now would keep a map made without them, and look untested).
    The verdicts of every module stay, so one module's run does not cost another's."""
    chosen = WORK / "modules.json"
    if chosen.exists() and json.loads(chosen.read_text()) != modules:
        (WORK / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    sync()
    for module in modules:  # mutmut takes a plain copy (left by a run over other modules) for "unmodified",
        copy = WORK / "mutants" / module  # and a mutated copy without its result file for done: made again,
        instrumented = mutated(module)
        lost = instrumented and not Path(f"{copy}.meta").exists()
        if lost:  # and the map made afresh: its mutants get new names the old map does not know
            (WORK / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        if lost or not instrumented:
            copy.unlink(missing_ok=True)
    chosen.write_text(json.dumps(modules))
    configure(modules, jobs)
    for family in ("llava_next", "granite4_vision"):
        if not (MODELS / family / "config.json").exists():
            subprocess.run([sys.executable, "-m", "granite_cli.tiny_model", str(MODELS / family), family], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    started = time.monotonic()
    env = {**test_env(), "GRANITE_TEST_LIMIT": str(TEST_LIMIT), "GRANITE_MUTANT_KILLERS": str(KILLERS)}
    command = [sys.executable, str(Path(__file__).resolve()), "--mutmut", "run", "--max-children", str(jobs), *names]
    with open(WORK / "mutmut.log", "wb") as log, fresh_temp_root():  # the log: its spinners, and why it stopped
        done = subprocess.run(command, cwd=WORK, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:  # e.g. "Failed to run clean test": a fast-lane test fails in the copy
        lines = (WORK / "mutmut.log").read_text(errors="replace").replace("\r", "\n").strip().splitlines()
        why = lines[-1] if lines else "?"
        raise SystemExit(f"mutmut stopped (exit {done.returncode}): {why}; see {WORK / 'mutmut.log'}")
    return time.monotonic() - started


def test_env(temp_root: Path = TEMP_ROOT) -> dict[str, str]:
    """The environment of every test session these runs start: the shared tiny models, and the
    temporary folders under `temp_root` (pytest's own setting for where they go)."""
    return {
        **os.environ, "PYTHONDONTWRITEBYTECODE": "1", "GRANITE_TEST_MODELS": str(MODELS),
        "PYTEST_DEBUG_TEMPROOT": str(temp_root),
    }  # fmt: skip


@contextlib.contextmanager
def fresh_temp_root(root: Path = TEMP_ROOT):
    """`root` empty while a run uses it, and gone after, however the run ends."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        yield
    finally:
        shutil.rmtree(root, ignore_errors=True)


def recheck(jobs: int) -> float:
    """The survivors again, once tests were added, and every mutant of a function that changed
    since (mutmut forgets their verdicts when it makes them again); every other verdict stays.
    The same selection of modules as the last run, and the map of tests made afresh."""
    chosen = json.loads((WORK / "modules.json").read_text())
    stats = WORK / "mutants" / "mutmut-stats.json"
    if stats.exists():  # the tests the survivors ran against: any other test is new, and runs first
        OLD_TESTS.write_text(json.dumps(sorted(json.loads(stats.read_text())["duration_by_test"])))
    stats.unlink(missing_ok=True)
    before, decided = function_hashes(), set(verdicts(WORK / "mutants"))
    slow = slow_lane_tests()  # their fast-lane verdict cannot change
    again = [
        name for m in results().values() for name in m.survived + m.untested if (m.name, function_of(name)) not in slow
    ]
    try:
        seconds = run(chosen, jobs, again)
    finally:
        OLD_TESTS.unlink(missing_ok=True)
    changed = {key for key, value in function_hashes().items() if before.get(key) != value}
    pending = [  # what mutmut forgot (it forgets a changed file's verdicts), and what changed
        name
        for name, code in verdicts(WORK / "mutants", everything=True).items()
        if code is None and (name in decided or function_key(name) in changed)
    ]
    if pending:
        seconds += run(chosen, jobs, pending)
    return seconds


def function_key(name: str) -> tuple[str, str]:
    """`granite_cli.records.xǁJobǁreuses__mutmut_3` -> (`granite_cli.records`, `xǁJobǁreuses`)."""
    module, _, mutant = name.rpartition(".")
    return module, mutant.rpartition("__mutmut_")[0]


def verdicts(folder: Path, everything: bool = False) -> dict[str, int | None]:
    """Every mutant's exit code in mutmut's result files (only those decided, unless `everything`)."""
    codes = {}
    for meta in (folder / "granite_cli").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if everything or code is not None:
                codes[name] = code
    return codes


def function_hashes() -> dict[tuple[str, str], str]:
    """(module, mangled function name) -> the hash mutmut keeps of its code."""
    hashes = {}
    for meta in (WORK / "mutants" / "granite_cli").rglob("*.py.meta"):
        module = ".".join(meta.relative_to(WORK / "mutants").with_suffix("").with_suffix("").parts)
        for function, value in json.loads(meta.read_text()).get("hash_by_function_name", {}).items():
            hashes[(module, function)] = value
    return hashes


def narrow_strings() -> None:
    """A string literal gets the one mutant that says whether its text matters at all ("XX"
    around it), not also its lower- and upper-case copies, which for messages only triple the
    count (and the hours) without telling more."""
    import mutmut.mutation.mutators as mutators

    def string_matters(node):
        yield from list(mutators.operator_string(node))[:1]

    mutators.mutation_operators[:] = [
        (kind, string_matters if operator is mutators.operator_string else operator)
        for kind, operator in mutators.mutation_operators
    ]


def instrument(paths: list[str]) -> None:
    """Put the mutants back into the copy of modules a later run left plain (it runs in the work
    folder, on the source mutmut's last run made their verdicts from). Only the code is written:
    the verdicts stay. If the source is not the one those verdicts were made on, their names
    would not line up: say so instead."""
    from mutmut.mutation.file_mutation import mutate_file_contents

    narrow_strings()
    for path in paths:
        code = mutate_file_contents(path, Path(path).read_text()).code
        meta = Path("mutants") / f"{path}.meta"
        names = json.loads(meta.read_text()).get("exit_code_by_key", {}) if meta.exists() else {}
        lost = [name for name in names if f"{name.rpartition('.')[2]}(" not in code]
        if lost or not names:
            raise SystemExit(f"{path} changed since its mutants were run: run `python3 tests/mutants.py {path}` first")
        (Path("mutants") / path).write_text(code)


def mutmut(argv: list[str]) -> None:
    """mutmut itself, its string operator narrowed (`narrow_strings`)."""
    from mutmut.__main__ import cli

    narrow_strings()
    fastest_first()
    warm_fork_server()
    atomic_results()
    sys.argv = ["mutmut", *argv]
    cli()


def atomic_results() -> None:
    """mutmut rewrites a module's result file after each mutant, in place: a run stopped while
    it writes (a kill, a full disk) left half a file, and every verdict of that module was lost.
    Written beside it and renamed over it, the file is always whole: the old one or the new."""
    from mutmut.mutation.data import SourceFileMutationData

    save = SourceFileMutationData.save

    def save_whole(self) -> None:
        final = self.meta_path
        self.meta_path = f"{final}.partial"
        try:
            save(self)
            os.replace(self.meta_path, final)
        finally:
            self.meta_path = final

    SourceFileMutationData.save = save_whole


def fastest_first() -> None:
    """Each mutant's tests in order: first those that killed another mutant of its function (in
    this run or an earlier one: `KILLERS`), then, in a --recheck, the tests added since the
    survivors survived, then by measured duration, the quickest first. pytest
    stops at the first failure (`-x`), so a killed mutant (most of them) costs one test that kills
    it instead of a random share of every test that reaches its function (mutmut hands them over
    in a set's order). A survivor still runs them all, and so would a listed equivalent, every run:
    one whose change is still the one listed for its function is answered "survived" without
    running (the report counts it as equivalent), unless $GRANITE_MUTANTS_EQUIVALENTS=run."""
    import mutmut.workers.isolation as isolation
    from mutmut.state import state

    equivalents = [] if os.environ.get("GRANITE_MUTANTS_EQUIVALENTS") == "run" else load_equivalents()
    listed = {(e["file"], e["function"]) for e in equivalents}

    def ordered(submit):
        def submit_ordered(self, mutant_name, tests, *args, **kwargs):
            path = source_of(mutant_name.rpartition(".")[0])
            if (path, function_of(mutant_name)) in listed and is_equivalent(mutant_name, path, equivalents):
                self._no_tests_results.append(isolation.MutantResult(mutant_name=mutant_name, exit_code=0, duration=0))
                return None
            durations, killers = state().duration_by_test, killers_of(function_key(mutant_name))
            tests = sorted(
                tests, key=lambda test: (test not in killers, test in old, durations.get(test, float("inf")), test)
            )
            started[mutant_name] = time.monotonic()
            return submit(self, mutant_name, tests, *args, **kwargs)

        return submit_ordered

    def timed(wait):
        def wait_timed(self, *args, **kwargs):
            result = wait(self, *args, **kwargs)
            begun = started.pop(result.mutant_name, None)
            if not result.duration and begun is not None:
                result.duration = time.monotonic() - begun
            return result

        return wait_timed

    started: dict[str, float] = {}  # mutmut's fork-server runner reports no time: measured here
    old = set(json.loads(OLD_TESTS.read_text())) if OLD_TESTS.exists() else set()
    seen = {"size": -1, "table": {}}  # KILLERS as last read

    def killers_of(function: tuple[str, str]) -> set[str]:
        """The tests that killed a mutant of `function`, from `KILLERS` (read again when it grew)."""
        size = KILLERS.stat().st_size if KILLERS.exists() else 0
        if seen["size"] != size:
            table: dict[tuple[str, str], set[str]] = {}
            for line in KILLERS.read_text(encoding="utf-8").splitlines() if size else ():
                mutant, _, test = line.partition("\t")
                table.setdefault(function_key(mutant), set()).add(test)
            seen.update(size=size, table=table)
        return seen["table"].get(function, set())

    for runner in vars(isolation).values():
        if isinstance(runner, type) and "submit" in vars(runner):
            runner.submit = ordered(runner.submit)
            runner.wait_for_result = timed(runner.wait_for_result)


def warm_fork_server() -> None:
    """Each mutant's tests run in a child forked from mutmut's fork server, which has imported the
    tests (torch with them) and nothing more: every child paid again for transformers' lazy
    imports and first model load (3 s) and, its garbage collector walking the inherited objects,
    for copying their pages (0.4 s). Here the server also loads and runs both tiny models once,
    through transformers alone (no code of the package, so no mutant's state is inherited), and
    freezes what it holds out of the collector. Measured on a child running one `ask` test: 4.6 s
    before, 0.6 s after. The server keeps one thread for torch: OpenMP's pool does not survive a
    fork (a child hangs), and two children on two cores want one each anyway."""
    import mutmut.runners.harness as harness

    collect = harness.PytestRunner.warm_up

    def warm_up(self) -> None:
        collect(self)
        import gc

        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging

        torch.set_num_threads(1)
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "warm up"}]}]
        for folder in sorted(Path(os.environ["GRANITE_TEST_MODELS"]).iterdir()):
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModelForImageTextToText.from_pretrained(folder)
            text = processor.apply_chat_template(message, add_generation_prompt=True)
            batch = processor(images=[Image.new("RGB", (64, 48))], text=[text], return_tensors="pt")
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=2, do_sample=False)
        logging.warning_once.cache_clear()  # a warning the tests look for is not "already said"
        logging.info_once.cache_clear()
        gc.freeze()

    harness.PytestRunner.warm_up = warm_up


def slow_lane(jobs: int) -> float:
    """The survivors of the functions that only a real process shows (signals, exit codes,
    several processes: `tests/slow_lane_mutants.toml` names them and the slow tests that reach
    them), each against those tests. mutmut's map is made in-process and cannot see them; here
    each mutant is switched on by its name in the environment (`MUTANT_UNDER_TEST`, which mutmut's
    trampolines read in every process), and the processes the tests start import the mutated copy
    (`PYTHONPATH`). The tests must pass without a mutant first. A verdict is kept (in
    `build/mutants/slow-lane.json`) while its function's code stays the same."""
    from concurrent.futures import ThreadPoolExecutor

    slow, hashes, kept = slow_lane_tests(), function_hashes(), slow_verdicts()
    todo = []
    for module in results().values():
        for name in module.survived + module.untested:
            tests = slow.get((module.name, function_of(name)), [])
            if tests and kept.get(name, {}).get("code") not in KILLED:  # (a survivor again: tests may be new)
                todo.append((name, tests))
    plain = sorted({module for module in results() if not mutated(module) and any(
        name.startswith(module.removesuffix(".py").replace("/", ".") + ".") for name, _ in todo)})  # fmt: skip
    if plain:  # a later run over other modules left them plain: the tests would run the real code
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--instrument", *plain], cwd=WORK, check=True)
    env = test_env(SLOW_TEMP_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORK / "mutants"), env.get("PYTHONPATH")]))

    def verdict(name: str, tests: list[str]) -> tuple[str, int]:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
        try:
            done = subprocess.run(command, cwd=WORK / "mutants", env={**env, "MUTANT_UNDER_TEST": name},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)  # fmt: skip
        except subprocess.TimeoutExpired:
            return name, 24  # never finished: the tests noticed (as for mutmut's timeouts)
        # The same tests passed without a mutant, so any failure is the mutant's: a failed test (1),
        # or a package that no longer imports (2: the tests could not even be collected). Only
        # "no tests ran" (5) says nothing.
        return name, 0 if done.returncode in (0, 5) else 1

    started = time.monotonic()
    replace(ROOT / "tests", WORK / "mutants" / "tests")  # the tests as they are now (mutmut's copy: its run's start)
    with fresh_temp_root(SLOW_TEMP_ROOT):
        for tests in {tuple(t) for _, t in todo}:  # the tests pass as they are, or no verdict means anything
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
            clean = subprocess.run(command, cwd=WORK / "mutants", env={**env, "MUTANT_UNDER_TEST": ""},
                                   capture_output=True)  # fmt: skip
            if clean.returncode != 0:
                raise SystemExit(f"the slow-lane tests fail without a mutant: {' '.join(tests)}")
        with ThreadPoolExecutor(jobs) as pool:
            for name, code in pool.map(lambda job: verdict(*job), todo):
                kept[name] = {"code": code, "hash": hashes.get(function_key(name))}
                SLOW_VERDICTS.write_text(json.dumps(kept, indent=1, ensure_ascii=False))
                print(f"{'killed' if code else 'SURVIVED'}: {name}", file=sys.stderr)
    return time.monotonic() - started


def slow_lane_tests() -> dict[tuple[str, str], list[str]]:
    """`tests/slow_lane_mutants.toml`: (file, function) of each function only a real process
    shows -> the tests that reach it."""
    entries = tomllib.loads(SLOW_LANE.read_text()).get("function", []) if SLOW_LANE.exists() else []
    tests: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        tests.setdefault((entry["file"], entry["function"]), []).extend(entry["tests"])
    return tests


def slow_verdicts() -> dict[str, dict]:
    """The slow lane's verdicts whose function is still the code they were made on."""
    if not SLOW_VERDICTS.exists():
        return {}
    hashes = function_hashes()
    kept = json.loads(SLOW_VERDICTS.read_text())
    return {name: v for name, v in kept.items() if v["hash"] == hashes.get(function_key(name))}


def results() -> dict[str, Module]:
    """Every mutant's verdict, by module, from mutmut's result files (and the slow lane's, for
    the mutants mutmut's fast lane cannot reach)."""
    modules: dict[str, Module] = {}
    equivalents = load_equivalents()
    slow = {name: v["code"] for name, v in slow_verdicts().items()}
    for meta in sorted((WORK / "mutants" / "granite_cli").rglob("*.py.meta")):
        path = str(meta.relative_to(WORK / "mutants")).removesuffix(".meta")
        if path in NOT_MUTATED:
            continue
        data = json.loads(meta.read_text())
        module = modules.setdefault(path, Module(path))
        durations = {name: seconds for name, seconds in data.get("durations_by_key", {}).items() if seconds}
        module.seconds, module.timed = sum(durations.values()), len(durations)
        lived = [seconds for name, seconds in durations.items() if data["exit_code_by_key"].get(name) in SURVIVED]
        module.survivor_seconds, module.survivors_timed = sum(lived), len(lived)
        for name, code in data.get("exit_code_by_key", {}).items():
            code = slow.get(name) if code in SURVIVED | NO_TEST and name in slow else code
            if code in KILLED:
                module.killed.append(name)
            elif code in SURVIVED or code in NO_TEST:
                if is_equivalent(name, path, equivalents):
                    module.equivalent.append(name)
                else:
                    (module.survived if code in SURVIVED else module.untested).append(name)
            else:
                module.pending.append(name)
    return modules


def load_equivalents() -> list[dict]:
    if not EQUIVALENTS.exists():
        return []
    return tomllib.loads(EQUIVALENTS.read_text()).get("equivalent", [])


def diff(name: str, path: str) -> str:
    """The mutant as a diff of its function (mutmut's own rendering)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = os.getcwd()
    os.chdir(WORK)
    try:
        return get_diff_for_mutant(name, path=Path(path))
    finally:
        os.chdir(here)


def changed_lines(text: str) -> tuple[str, str]:
    """The lines a mutant removed and added, whitespace-trimmed: what an equivalence names."""
    lines = text.splitlines()[2:]
    removed = "\n".join(line[1:].strip() for line in lines if line.startswith("-"))
    added = "\n".join(line[1:].strip() for line in lines if line.startswith("+"))
    return removed, added


def function_of(name: str) -> str:
    """`granite_cli.records.xǁJobǁreuses__mutmut_3` -> `Job.reuses`; `...x_dumps__mutmut_8` -> `dumps`."""
    base = name.rpartition(".")[2].rpartition("__mutmut_")[0]
    if base.startswith("xǁ"):
        return ".".join(base[2:].split("ǁ"))
    return base.removeprefix("x_")


def mutated(path: str) -> bool:
    """Whether the copy still holds the module's mutants: a later run over other modules leaves a
    plain copy, whose survivors can no longer be shown (or matched with their equivalents), so
    its row in the README is kept from the run that had them."""
    copy = WORK / "mutants" / path
    return copy.exists() and "__mutmut_" in copy.read_text()


def is_equivalent(name: str, path: str, equivalents: list[dict]) -> bool:
    candidates = [e for e in equivalents if e["file"] == path and e["function"] == function_of(name)]
    if not candidates:
        return False
    try:
        removed, added = changed_lines(diff(name, path))
    except FileNotFoundError:  # the file changed since that run (its verdicts wait for a --recheck)
        return False
    return any(e["before"].strip() == removed and e["after"].strip() == added for e in candidates)


HEADER = [
    "| module | killed / counted | score | target | survivors | no test | equivalent | not run | time (timed) |",
    "|---|---|---|---|---|---|---|---|---|",
]


def row(module: Module) -> str:
    target = TARGET[module.guard]
    mark = "" if module.score >= target else " **below**"
    score = f"{module.score:.0%}{mark}" if module.counted else "–"
    name = module.name.removeprefix("granite_cli/")
    return (
        f"| {name} | {len(module.killed)} / {module.counted} | {score} | {target:.0%}"
        f" | {len(module.survived)} | {len(module.untested)} | {len(module.equivalent)} | {len(module.pending)}"
        f" | {f'{module.seconds / 60:.1f} min ({module.timed})' if module.timed else '–'} |"
    )


def full_run_hours(modules: dict[str, Module], jobs: int = 2) -> float | None:
    """A whole run's hours, `jobs` at once: every mutant that must run (not the listed
    equivalents, not those no test reaches), a killed one at its module's measured mean for a
    killed mutant and a survivor at the mean survivor's time (it runs every test that reaches it);
    where a module has none timed, the means of all; a mutant not run yet counts as killed, as
    most are."""
    killed_timed = sum(m.timed - m.survivors_timed for m in modules.values())
    survivors_timed = sum(m.survivors_timed for m in modules.values())
    if not killed_timed:
        return None
    killed_mean = sum(m.seconds - m.survivor_seconds for m in modules.values()) / killed_timed
    survivor_mean = sum(m.survivor_seconds for m in modules.values()) / max(survivors_timed, 1)
    seconds = 0.0
    for m in modules.values():
        own = m.timed - m.survivors_timed
        kill = (m.seconds - m.survivor_seconds) / own if own else killed_mean
        seconds += (len(m.killed) + len(m.pending)) * kill + len(m.survived) * survivor_mean
    return seconds / jobs / 3600


def table_hours(lines: list[str], jobs: int = 2) -> float:
    """A run's hours over modules known only by their table rows (an earlier run's, kept in the
    README): each counted mutant at its module's measured minutes per timed mutant, or, where a
    row has no time, at the mean of the rows that have one."""
    timed = []  # (counted, minutes per mutant or None)
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        counted = int(cells[1].split("/")[1]) + int(cells[7])
        minutes, _, mutants = cells[8].partition(" min (")
        timed.append((counted, float(minutes) / int(mutants.rstrip(")")) if mutants else None))
    known = [each for _, each in timed if each is not None]
    mean = sum(known) / len(known) if known else 0.0
    return sum(counted * (mean if each is None else each) for counted, each in timed) / jobs / 60


def table(modules: dict[str, Module], earlier: dict[str, str] | None = None) -> str:
    """The score table; `earlier` rows (module -> its row in an earlier table) stand for the
    modules this copy holds no results of (the copy is local, a README's table is not)."""
    own = {module.name.removeprefix("granite_cli/"): row(module) for module in modules.values()}
    rows = {**(earlier or {}), **own}
    killed = counted = pending = 0
    for line in rows.values():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        done, total = (int(n) for n in cells[1].split("/"))
        killed, counted, pending = killed + done, counted + total, pending + int(cells[7])
    hours = (full_run_hours(modules) or 0.0) + table_hours([rows[name] for name in set(rows) - set(own)])
    whole = f"a full run ≈ {hours:.1f} h, 2 at once" if hours else ""
    total_row = f"| **all** | {killed} / {counted} | {killed / max(counted, 1):.0%} | | | | | {pending} | {whole} |"
    return "\n".join([*HEADER, *(rows[name] for name in sorted(rows)), total_row])


def readme_parts(text: str) -> tuple[str, str, str]:
    """The README before its table, the table, and after it."""
    head, _, rest = text.partition("<!-- mutants:begin -->\n")
    inside, _, tail = rest.partition("<!-- mutants:end -->")
    return head, inside, tail


def readme_rows(inside: str) -> dict[str, str]:
    """The module rows of the README's table, by module."""
    lines = [line for line in inside.splitlines()[2:] if line.startswith("| ") and not line.startswith("| **all**")]
    return {line.split("|")[1].strip(): line for line in lines}


def survivors(modules: dict[str, Module]) -> str:
    parts = []
    for module in sorted(modules.values(), key=lambda m: m.name):
        for name in module.survived + module.untested:
            parts.append(f"## {name}\n```diff\n{diff(name, module.name)}\n```\n")
    return "\n".join(parts)


def main() -> int:
    if sys.argv[1:2] == ["--mutmut"]:
        mutmut(sys.argv[2:])
        return 0
    if sys.argv[1:2] == ["--instrument"]:
        instrument(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python3 tests/mutants.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (records, engine/hf, ...); default: all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants run at once")
    parser.add_argument("--report", action="store_true", help="only print the table of earlier runs")
    parser.add_argument("--survivors", action="store_true", help="print every survivor's diff")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--readme", action="store_true", help="put the table in the README's development section")
    parser.add_argument(
        "--slow", action="store_true", help="run the survivors that only slow tests reach against them (after a run)"
    )
    parser.add_argument(
        "--recheck", action="store_true", help="run the survivors again (after adding tests), keeping other results"
    )
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    if args.slow:
        seconds = slow_lane(args.jobs)
        print(f"the slow lane checked its survivors in {seconds / 60:.1f} min", file=sys.stderr)
    elif args.recheck:
        seconds = recheck(args.jobs)
        print(f"mutmut checked the survivors and the changed functions in {seconds / 60:.1f} min", file=sys.stderr)
    elif not (args.report or args.survivors):
        chosen = [module_path(name) for name in args.modules] or all_modules()
        seconds = run(chosen, args.jobs)
        print(f"mutmut ran {len(chosen)} module(s) in {seconds / 60:.1f} min", file=sys.stderr)
    modules = results()
    # A module the copy holds no mutants of now (a later run was over others) keeps the README's
    # row: its survivors can no longer be matched with their equivalents here.
    readme = ROOT / "README.md"
    head, inside, tail = readme_parts(readme.read_text())
    earlier = readme_rows(inside)
    modules = {
        path: m for path, m in modules.items() if mutated(path) or path.removeprefix("granite_cli/") not in earlier
    }
    if args.modules:
        modules = {path: m for path, m in modules.items() if path in {module_path(n) for n in args.modules}}
    if args.survivors:
        print(survivors(modules))
        return 0
    report = table(modules, None if args.modules else earlier)
    (WORK / "report.md").write_text(report + "\n")
    print(report)
    if args.readme:
        merged = table(modules, earlier)
        readme.write_text(f"{head}<!-- mutants:begin -->\n{merged}\n<!-- mutants:end -->{tail}")
    failing = [m.name for m in modules.values() if m.score < TARGET[m.guard]]
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
