"""Fold × seed × grid sweeps of an experiment script, resumable (``tools/sweep.py``).

Usage::

    python tools/sweep.py SCRIPT --folds 1 2 3 4 5 --seeds 0 1 2 --out DIR \\
        [--grid KEY=V1,V2 ...] [--teachers DIR] [--dry-run | --status] \\
        [--launcher local [--parallel N --devices D1,...] | --launcher slurm [...]] -- [sacred overrides ...]

By default every combination runs sequentially as a subprocess (``sys.executable SCRIPT
with _folder=F seed=S KEY=V ... <overrides> _save_folder=DIR/<name>``) into its
own save folder ``DIR/fold<F>-seed<S>[-KEY=V...]``. The child's output goes to
``<save folder>/sweep.log``; the terminal shows one progress line per run.
``--parallel N --devices ...`` runs N at a time, one per device, and ``--launcher slurm``
submits them as a SLURM job array (:mod:`raug.run.launchers`, docs/cluster.md);
``--status`` prints each cell's state. The command line itself is :mod:`raug.run.sweep_cli`.

Rerunning the same command finishes an interrupted sweep. Per save folder
(:func:`folder_state`):

* ``COMPLETED`` marker whose Sacred run is COMPLETED -> skipped;
* a last checkpoint -> resumed with ``_resume=True``;
* checkpoints/marker but no last checkpoint (the engine would refuse a new run
  there and a resume is impossible) -> the folder is moved to
  ``DIR/_stale/<name>-<UTC time>`` and the run starts afresh;
* otherwise (nothing, or only failed attempts) -> a new run.

Never two writers in one folder. A save folder whose lock (:mod:`raug.files.runlock`) is
held by a live run (started by hand, or an orphan of a sweep killed on a system without
parent-death signals) is ``busy``: the sweep waits up to :data:`BUSY_WAIT_S` for it to
end, then leaves the combination alone (reported, exit 1; rerun the sweep later). A
combination that became free is re-examined first (it may be COMPLETED by now). The
sweep itself holds the lock of ``--out``: a second sweep into the same folder is refused.

The runs die with the sweep: on Linux each child asks the kernel for SIGTERM when the
sweep dies (``PR_SET_PDEATHSIG``), which covers even ``kill -9`` of the sweep; a SIGTERM
or Ctrl-C of the sweep also stops the current run (everywhere). The killed run resumes
from its last checkpoint when the sweep is rerun.

Grid values are parsed like Sacred parses ``with`` values (a Python literal,
else a plain string) and passed back as Python literals, so
``--grid _kd_method=none,d_kd`` needs no shell quoting. ``--teachers DIR``
(KD scripts) passes the best checkpoint of the COMPLETED ``isic.py`` run on the
same fold found below ``DIR`` (same seed if there is one, else the lowest seed).
"""

from __future__ import annotations

import ast
import ctypes
import functools
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from raug.files import runlock
from raug.files.paths import COMPLETED_MARKER, REPO_ROOT
from raug.report.runs import find_run_dirs, load_runs
from raug.run.config import finished_run_markers

EXPERIMENT_DIR = REPO_ROOT / "experiment" / "isic"
TEACHER_SCRIPT = "isic"  # Sacred experiment name of the teacher script
KD_SCRIPTS = ("isic_d_kd.py", "isic_ssd_kd.py")
RESERVED_KEYS = ("_folder", "seed", "_save_folder", "_resume")
LAST_CHECKPOINT = Path("last-checkpoint") / "last-checkpoint.pth"
BEST_CHECKPOINT = Path("best-checkpoint") / "best-checkpoint.pth"
LOG_NAME = "sweep.log"
STALE_DIR = "_stale"
BUSY_WAIT_S = 10.0  # how long a busy save folder is waited for (a dying orphan needs a moment)
STOP_GRACE_S = 10.0  # a stopped run's time to record itself before SIGKILL
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepError(ValueError):
    """A bad sweep request (unknown script, bad grid, missing teacher, ...)."""


# ----------------------------------------------------------------------------- values and names


def resolve_script(script: str | Path) -> Path:
    """Absolute path of an experiment script: a path, or a bare name in ``experiment/isic/``.

    A relative path is tried from the working directory, then from the repository
    root; ``isic_d_kd.py`` and ``isic_d_kd`` both name ``experiment/isic/isic_d_kd.py``.

    Raises:
        SweepError: no such file.
    """
    path = Path(script).expanduser()
    candidates = [path]
    if not path.is_absolute():  # like the engine's paths: also relative to the repository
        candidates.append(REPO_ROOT / path)
    if len(path.parts) == 1:
        name = path.name if path.suffix == ".py" else f"{path.name}.py"
        candidates.append(EXPERIMENT_DIR / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SweepError(f"script {str(script)!r} not found (tried {', '.join(map(str, candidates))})")


def parse_value(text: str) -> Any:
    """A command-line value as Sacred reads it: a Python literal, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def sacred_assignment(key: str, value: Any) -> str:
    """``key=<Python literal>``: Sacred reads back exactly ``value``.

    Strings get double quotes (``_kd_method="d_kd"``, the seed's style): a JSON
    string is also a valid Python literal.
    """
    literal = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return f"{key}={literal}"


def split_values(text: str) -> list[str]:
    """Split ``V1,V2,...`` at top-level commas (not inside quotes or brackets)."""
    parts, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid KEY=V1,V2`` option: the key and its parsed values."""

    key: str
    values: tuple[Any, ...]


def parse_grid(specs: Sequence[str]) -> list[GridAxis]:
    """Parse ``--grid`` options.

    Raises:
        SweepError: no ``=``, a bad or repeated key, a reserved key, an empty value.
    """
    axes: list[GridAxis] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise SweepError(f"--grid {spec!r} is invalid: expected KEY=V1,V2,...")
        if key in RESERVED_KEYS:
            raise SweepError(f"--grid {spec!r} is invalid: {key} is set by the sweep itself "
                             "(use --folds / --seeds / --out)")
        if any(a.key == key for a in axes):
            raise SweepError(f"--grid {spec!r} is invalid: {key} is already a grid key")
        texts = split_values(text)
        if any(t == "" for t in texts):
            raise SweepError(f"--grid {spec!r} is invalid: empty value")
        axes.append(GridAxis(key, tuple(parse_value(t) for t in texts)))
    return axes


def override_keys(overrides: Sequence[str]) -> list[str]:
    """Config keys assigned by ``KEY=VALUE`` overrides (named configs and options skipped)."""
    keys = []
    for token in overrides:
        key, sep, _ = token.partition("=")
        if sep and not token.startswith("-") and _KEY.match(key.strip()):
            keys.append(key.strip())
    return keys


@dataclass(frozen=True)
class Combo:
    """One run of a sweep."""

    fold: int
    seed: int
    grid: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """Save-folder name, e.g. ``fold2-seed0-_kd_method=d_kd``."""
        parts = [f"fold{self.fold}", f"seed{self.seed}"]
        parts += [_UNSAFE.sub("_", f"{k}={v}") for k, v in self.grid]
        return "-".join(parts)

    @property
    def label(self) -> str:
        """Human label, e.g. ``fold 2 seed 0 _kd_method=d_kd``."""
        return " ".join([f"fold {self.fold}", f"seed {self.seed}",
                         *(f"{k}={v}" for k, v in self.grid)])


def plan_combos(folds: Sequence[int], seeds: Sequence[int], grid: Sequence[GridAxis]) -> list[Combo]:
    """Every fold × seed × grid combination, folds outermost (duplicates dropped).

    Raises:
        SweepError: two combinations would share a folder name.
    """
    folds, seeds = list(dict.fromkeys(folds)), list(dict.fromkeys(seeds))
    combos = []
    for fold, seed, *values in itertools.product(folds, seeds, *(a.values for a in grid)):
        combos.append(Combo(fold, seed, tuple((a.key, v) for a, v in zip(grid, values))))
    names = [c.name for c in combos]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SweepError(f"grid values map to the same folder name(s) {clash}: make them distinct")
    return combos


# ----------------------------------------------------------------------------- folder state


class State(StrEnum):
    """What the sweep does with a combination's save folder."""

    NEW = "new"
    COMPLETED = "completed"
    RESUME = "resume"
    STALE = "stale"
    RETRY = "retry"
    BUSY = "busy"


@dataclass(frozen=True)
class FolderState:
    """:class:`State` and a short explanation."""

    state: State
    detail: str


def _marker_run_id(folder: Path) -> str | None:
    try:
        data = json.loads((folder / COMPLETED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    return None if run_id is None else str(run_id)


def folder_state(folder: str | Path) -> FolderState:
    """Decide skip / resume / restart for one save folder from its Sacred runs and files.

    A ``COMPLETED`` marker counts when the Sacred run it names is COMPLETED in
    ``folder`` (or is not recorded there: another observer). A marker whose run
    never reached COMPLETED (killed at the very end) is resumed, which re-runs
    only the final evaluation.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return FolderState(State.NEW, "no folder yet")
    who = runlock.holder(folder)
    if who is not None:
        return FolderState(State.BUSY, f"in use by {who.describe()}")
    try:
        runs = load_runs(folder)
    except ValueError:
        # Sacred writes run.json in place: a kill can truncate it. The files decide then.
        runs = pd.DataFrame(columns=["id", "status"])
    if (folder / COMPLETED_MARKER).is_file():
        run_id = _marker_run_id(folder)
        row = runs[runs["id"].astype(str) == run_id] if run_id is not None else runs.iloc[0:0]
        if row.empty:
            return FolderState(State.COMPLETED, "COMPLETED marker")
        if row["status"].iloc[-1] == "COMPLETED":
            return FolderState(State.COMPLETED, f"Sacred run {run_id} COMPLETED")
    if (folder / LAST_CHECKPOINT).is_file():
        status = runs["status"].iloc[-1] if not runs.empty else "unknown"
        return FolderState(State.RESUME, f"last run {status}; resuming from {LAST_CHECKPOINT}")
    if finished_run_markers(folder):
        return FolderState(State.STALE, f"{', '.join(finished_run_markers(folder))} "
                                        "without a last checkpoint")
    if not runs.empty:
        return FolderState(State.RETRY, f"earlier attempt {runs['status'].iloc[-1]}")
    return FolderState(State.NEW, "nothing run yet")


def move_stale(folder: Path, out: Path) -> Path:
    """Move a folder that can neither be resumed nor reused to ``out/_stale/<name>-<UTC time>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = out / STALE_DIR / f"{folder.name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    return target


# ----------------------------------------------------------------------------- teachers


def find_teachers(teachers: str | Path, folds: Sequence[int], seeds: Sequence[int]) -> dict[tuple[int, int], Path]:
    """Best checkpoint of the teacher for every (fold, seed) of a KD sweep.

    Looks for COMPLETED runs of ``isic.py`` below ``teachers`` whose save folder
    (the run folder's parent) holds ``best-checkpoint/best-checkpoint.pth``.
    For a fold, the teacher with the student's seed is preferred, else the one
    with the lowest seed.

    Raises:
        SweepError: ``teachers`` is not a folder, or a fold has no usable teacher.
    """
    root = Path(teachers).expanduser().resolve()
    if not root.is_dir():
        raise SweepError(f"--teachers {str(teachers)!r}: not a folder")
    runs = load_runs(root)
    found: dict[int, dict[int, Path]] = {}
    for row in runs.to_dict("records"):
        if row.get("status") != "COMPLETED" or row.get("script") != TEACHER_SCRIPT:
            continue
        ckpt = Path(row["path"]).parent / BEST_CHECKPOINT
        fold, seed = row.get("_folder"), row.get("seed")
        if ckpt.is_file() and _is_whole(fold) and _is_whole(seed):
            found.setdefault(int(fold), {}).setdefault(int(seed), ckpt)
    missing = [f for f in dict.fromkeys(folds) if f not in found]
    if missing:
        raise SweepError(
            f"--teachers {root}: no COMPLETED {TEACHER_SCRIPT}.py run with a best checkpoint for "
            f"fold(s) {missing} (teachers found for folds {sorted(found)})"
        )
    return {(f, s): found[f].get(s, found[f][min(found[f])]) for f in folds for s in seeds}


def _is_whole(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- plan and run


@dataclass
class PlannedRun:
    """A combination with its folder, state and command (``None`` when skipped or busy).

    ``make_command(resume)`` rebuilds the command when the folder's state has changed
    since planning (it was busy).
    """

    combo: Combo
    save_folder: Path
    state: FolderState
    command: list[str] | None
    make_command: Callable[[bool], list[str]] | None = None


def build_command(script: Path, combo: Combo, save_folder: Path, overrides: Sequence[str],
                  teacher: Path | None = None, resume: bool = False) -> list[str]:
    """``sys.executable SCRIPT with _folder=F seed=S KEY=V ... <overrides> _save_folder=...``."""
    updates = [f"_folder={combo.fold}", f"seed={combo.seed}"]
    updates += [sacred_assignment(k, v) for k, v in combo.grid]
    if teacher is not None:
        updates.append(sacred_assignment("_teacher_ckpt", str(teacher)))
    updates += list(overrides)
    updates.append(sacred_assignment("_save_folder", str(save_folder)))
    if resume:
        updates.append("_resume=True")
    return [sys.executable, str(script), "with", *updates]


def check_overrides(overrides: Sequence[str], grid: Sequence[GridAxis], teachers: bool) -> None:
    """Refuse overrides that would fight the sweep's own assignments.

    Raises:
        SweepError: an override sets a reserved key, a grid key, or ``_teacher_ckpt``
            together with ``--teachers``.
    """
    taken = {k: "set by the sweep (--folds/--seeds/--out)" for k in RESERVED_KEYS}
    taken.update({a.key: "a --grid key" for a in grid})
    if teachers:
        taken["_teacher_ckpt"] = "chosen by --teachers"
    for key in override_keys(overrides):
        if key in taken:
            raise SweepError(f"override {key}=... is not allowed: {key} is {taken[key]}")


def plan_sweep(
    script: str | Path,
    folds: Sequence[int],
    seeds: Sequence[int],
    out: str | Path,
    grid: Sequence[GridAxis] = (),
    overrides: Sequence[str] = (),
    teachers: str | Path | None = None,
) -> list[PlannedRun]:
    """Every combination with its save folder, current state and command line.

    Raises:
        SweepError: bad script, folds, seeds, overrides or teachers.
    """
    script = resolve_script(script)
    bad = [v for v in [*folds, *seeds] if not isinstance(v, int) or v < 0]
    if not folds or not seeds or bad or any(f < 1 for f in folds):
        raise SweepError(f"--folds (>= 1) and --seeds (>= 0) need integers; got folds {list(folds)}, "
                         f"seeds {list(seeds)}")
    if teachers is not None and script.name not in KD_SCRIPTS:
        raise SweepError(f"--teachers is for the KD scripts {list(KD_SCRIPTS)}, not {script.name}")
    check_overrides(overrides, grid, teachers is not None)
    out = Path(out).expanduser().resolve()
    teacher_map = find_teachers(teachers, folds, seeds) if teachers is not None else {}
    plan = []
    for combo in plan_combos(folds, seeds, grid):
        save_folder = out / combo.name
        state = folder_state(save_folder)
        # make_command(resume) -> the command line; kept for a folder that is busy now.
        make_command = functools.partial(build_command, script, combo, save_folder, overrides,
                                         teacher_map.get((combo.fold, combo.seed)))
        command = None
        if state.state not in (State.COMPLETED, State.BUSY):
            command = make_command(state.state is State.RESUME)
        plan.append(PlannedRun(combo, save_folder, state, command, make_command))
    return plan


Runner = Callable[[list[str], Path], int]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when this process dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); it is what stops a run when the sweep is
    killed with ``kill -9``, which no handler in the sweep can see. ``None`` elsewhere:
    there only a SIGTERM / Ctrl-C of the sweep stops its run (:func:`subprocess_runner`).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop_run(proc: subprocess.Popen, interrupted: bool) -> None:
    """Stop a run the sweep is leaving: SIGTERM, then SIGKILL if it lingers.

    Args:
        proc: the run.
        interrupted: a Ctrl-C in the terminal reached the run too: give it time to record
            itself as INTERRUPTED before SIGTERM.
    """
    actions = ((lambda: None) if interrupted else proc.terminate, proc.terminate, proc.kill)
    for action in actions:
        action()
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def subprocess_runner(command: list[str], log_path: Path,
                      live: set[subprocess.Popen] | None = None) -> int:
    """Run ``command``, appending its stdout and stderr to ``log_path``; returns the exit code.

    The child dies with the sweep (see :func:`_die_with_parent`); if the sweep is
    interrupted while waiting (Ctrl-C, SIGTERM), the child is stopped before it returns.
    ``live`` holds the child while it runs: a signal reaches only the main thread, so the
    parallel launcher stops the runs of its worker threads through it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n===== {datetime.now(UTC).isoformat(timespec='seconds')} {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent())
        live = set() if live is None else live
        live.add(proc)
        try:
            return proc.wait()
        except BaseException as exc:
            stop_run(proc, interrupted=isinstance(exc, KeyboardInterrupt))
            raise
        finally:
            live.discard(proc)


@dataclass
class SweepReport:
    """Outcome of :func:`run_sweep` (labels of the combinations)."""

    completed: list[str]
    skipped: list[str]
    failed: list[str]
    busy: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every run is COMPLETED, else 1 (some failed or were busy)."""
        return 1 if self.failed or self.busy else 0

    def summary(self) -> str:
        """One line, then one line per failed or busy run."""
        total = len(self.completed) + len(self.skipped) + len(self.failed) + len(self.busy)
        head = (f"sweep: {total} runs: {len(self.completed)} completed now, {len(self.skipped)} "
                f"skipped (already COMPLETED), {len(self.failed)} failed")
        if self.busy:
            head += f", {len(self.busy)} busy (not started: another run writes there)"
        return "\n".join([head, *(f"  FAILED: {f}" for f in self.failed),
                          *(f"  BUSY: {b}" for b in self.busy)])


def _failure_hint(folder: Path, before: set[Path]) -> str:
    """Where to look: the sweep log (it has the traceback, which Sacred's ``cout.txt`` lacks)."""
    new = [d for d in find_run_dirs([folder]) if d not in before] if folder.is_dir() else []
    hint = f"see {folder / LOG_NAME}"
    return f"{hint} (Sacred run {new[-1]})" if new else hint


def _wait_until_free(folder: Path, wait_s: float) -> bool:
    """Whether ``folder``'s run lock is free within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while runlock.is_locked(folder):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _recheck(item: PlannedRun) -> PlannedRun:
    """``item`` with its state and command taken afresh (a live run there has just ended)."""
    state = folder_state(item.save_folder)
    command = None
    if state.state not in (State.COMPLETED, State.BUSY):
        resume = state.state is State.RESUME
        command = item.make_command(resume) if item.make_command else item.command
    return PlannedRun(item.combo, item.save_folder, state, command, item.make_command)


def run_item(item: PlannedRun, prefix: str, out: Path, report: SweepReport, runner: Runner,
             stream: TextIO, busy_wait_s: float) -> None:
    """Run one planned combination (see :func:`run_sweep`), printing its line and filing its outcome.

    Shared by the sequential sweep and the one-run-per-device launcher
    (:mod:`raug.run.launchers`), so both skip, resume and report alike.
    """
    print(f"{prefix} {item.combo.label} ...", end=" ", file=stream, flush=True)
    if item.state.state is State.BUSY or runlock.is_locked(item.save_folder):
        if _wait_until_free(item.save_folder, busy_wait_s):
            item = _recheck(item)
        if item.state.state is State.BUSY or runlock.is_locked(item.save_folder):
            who = runlock.holder(item.save_folder) or runlock.LockHolder()
            print(f"busy: in use by {who.describe()}; not started (rerun the sweep once "
                  "that run has ended)", file=stream, flush=True)
            report.busy.append(item.combo.label)
            return
    if item.command is None:
        print("skipped (already COMPLETED)", file=stream, flush=True)
        report.skipped.append(item.combo.label)
        return
    if item.state.state is State.STALE:
        moved = move_stale(item.save_folder, out)
        print(f"{item.state.detail}: moved to {moved} ...", end=" ", file=stream, flush=True)
    elif item.state.state is State.RESUME:
        print(f"{item.state.detail} ...", end=" ", file=stream, flush=True)
    item.save_folder.mkdir(parents=True, exist_ok=True)
    before = set(find_run_dirs([item.save_folder]))
    start = time.monotonic()
    code = runner(item.command, item.save_folder / LOG_NAME)
    seconds = time.monotonic() - start
    if code == 0 and folder_state(item.save_folder).state is State.COMPLETED:
        print(f"COMPLETED in {seconds:.0f} s", file=stream, flush=True)
        report.completed.append(item.combo.label)
        return
    if code < 0:
        why = f"killed by signal {-code}"
    else:
        why = f"exit {code}" if code else "exit 0 but the run is not COMPLETED"
    print(f"FAILED ({why}), {_failure_hint(item.save_folder, before)}", file=stream, flush=True)
    report.failed.append(f"{item.combo.label} ({why})")


def run_sweep(plan: Sequence[PlannedRun], out: str | Path, runner: Runner = subprocess_runner,
              stream: TextIO | None = None, busy_wait_s: float | None = None) -> SweepReport:
    """Run the planned combinations one after the other; a failure does not stop the sweep.

    Each run prints ``[i/N] fold F seed S ... `` when it starts and its outcome
    (``COMPLETED in 41 s`` / ``FAILED (exit 1), see <save folder>/sweep.log``) when it ends.
    A save folder that a live run holds is waited for up to ``busy_wait_s``, then left
    alone (``busy: in use by pid ...``); one that became free is re-examined first.

    Args:
        plan: from :func:`plan_sweep`.
        out: the sweep folder (stale folders are moved below it).
        runner: ``(command, log_path) -> exit code`` (tests swap it).
        stream: where progress lines go (default: stdout).
        busy_wait_s: how long to wait for a busy save folder (default :data:`BUSY_WAIT_S`).
    """
    stream = stream or sys.stdout
    busy_wait_s = BUSY_WAIT_S if busy_wait_s is None else busy_wait_s
    out = Path(out).expanduser().resolve()
    report = SweepReport([], [], [])
    for i, item in enumerate(plan, start=1):
        run_item(item, f"[{i}/{len(plan)}]", out, report, runner, stream, busy_wait_s)
    return report


# ----------------------------------------------------------------------------- command line


def describe_plan(plan: Sequence[PlannedRun]) -> str:
    """The ``--dry-run`` listing: what each combination would do, and its command."""
    lines = []
    for i, item in enumerate(plan, start=1):
        head = f"[{i}/{len(plan)}] {item.combo.label}: {item.state.state.value} ({item.state.detail})"
        lines.append(head)
        if item.command is not None:
            lines.append("  " + shlex.join(item.command))
    return "\n".join(lines)


__all__ = [
    "Combo", "FolderState", "GridAxis", "PlannedRun", "State", "SweepError", "SweepReport",
    "build_command", "describe_plan", "find_teachers", "folder_state", "parse_grid", "parse_value",
    "plan_sweep", "resolve_script", "run_item", "run_sweep", "sacred_assignment", "stop_run",
]
