"""Where the cells of a sweep run (``tools/sweep.py --launcher``); see docs/cluster.md.

* ``local`` (default): subprocesses on this machine, one after the other
  (:func:`raug.run.sweep.run_sweep`) or, with ``--parallel N --devices D1,D2,...``,
  N at a time with one run per device (:func:`run_parallel`).
* ``slurm``: one SLURM job array per ``tools/sweep.py`` call, one task per cell that is
  neither COMPLETED, running nor already queued (:func:`submit_cells`, via submitit).
  A task (:class:`CellTask`) looks at its save folder when it starts, so a requeued task
  (preemption, time limit, ``scontrol requeue``) resumes from the last checkpoint
  (``_resume=True``) and a task whose cell has COMPLETED meanwhile does nothing.

``--status`` (:func:`format_status`) reads the grid's state from the save folders alone
(plus the job ids the slurm launcher recorded, for cells still waiting in the queue).

Teachers before students: a KD sweep with ``--teachers`` refuses to start (or submit)
until every fold has a COMPLETED teacher (:func:`raug.run.sweep.find_teachers`); run the
teachers' array with ``--wait`` (or watch ``--status``) before submitting the students.
"""

from __future__ import annotations

import dataclasses
import getpass
import io
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import submitit

from raug.files import runlock
from raug.run.sweep import (
    BUSY_WAIT_S,
    LOG_NAME,
    STOP_GRACE_S,
    PlannedRun,
    Runner,
    State,
    SweepError,
    SweepReport,
    folder_state,
    move_stale,
    run_item,
    sacred_assignment,
    subprocess_runner,
)

SLURM_DIR = "_slurm"  # below --out: submitit's job files and the record of submitted jobs
JOBS_FILE = "jobs.json"  # {cell folder name: job id} of the last submission of each cell
STATUS = ("pending", "running", "completed", "failed")
# How long a task whose run was killed by a signal waits before it reports the cell FAILED.
# `scontrol requeue` / scancel / preemption signal the whole job, the run included; the
# task itself is then killed (after KillWait, 30 s by default) or requeued by submitit
# within this time, so it writes no failure result and the requeued task resumes the cell.
KILLED_GRACE_S = 120.0


# ----------------------------------------------------------------------------- --status


def cell_status(folder: Path, queued_job: str | None = None) -> tuple[str, str]:
    """``(pending|running|completed|failed, detail)`` of one cell, from its save folder.

    Running = a live process holds the folder's run lock; failed = an attempt that did
    not complete (a rerun resumes or restarts it); ``queued_job``: a job of this cell is
    still in the SLURM queue, so a cell with nothing to show yet is pending, not failed.
    """
    state = folder_state(folder)
    if state.state is State.COMPLETED:
        return "completed", state.detail
    if state.state is State.BUSY:
        return "running", state.detail
    if queued_job is not None:
        return "pending", f"job {queued_job} in the queue; {state.detail}"
    if state.state is State.NEW:
        return "pending", state.detail
    return "failed", state.detail


def format_status(plan: Sequence[PlannedRun], queued: dict[str, str]) -> str:
    """One line per cell (``fold 1 seed 0: completed (...)``), then the counts."""
    lines, counts = [], dict.fromkeys(STATUS, 0)
    for item in plan:
        status, detail = cell_status(item.save_folder, queued.get(item.combo.name))
        counts[status] += 1
        lines.append(f"{item.combo.label}: {status} ({detail})")
    lines.append(f"{len(plan)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- local, one run per device


def on_device(item: PlannedRun, device: str) -> PlannedRun:
    """``item`` whose command (now and after a recheck) ends with ``_device=<device>``."""
    assignment = sacred_assignment("_device", device)
    make = item.make_command
    return dataclasses.replace(
        item,
        command=None if item.command is None else [*item.command, assignment],
        make_command=None if make is None else (lambda resume: [*make(resume), assignment]),
    )


def run_parallel(plan: Sequence[PlannedRun], out: Path, devices: Sequence[str],
                 runner: Runner | None = None, stream: TextIO | None = None,
                 busy_wait_s: float | None = None) -> SweepReport:
    """Run the plan with one run per device at a time (``len(devices)`` at once).

    Each run's line is printed whole when it ends (lines of parallel runs would
    interleave otherwise), with its device. A SIGTERM or Ctrl-C of the sweep (seen by
    the main thread only) stops every live run before it is raised further.
    """
    stream = stream or sys.stdout
    busy_wait_s = BUSY_WAIT_S if busy_wait_s is None else busy_wait_s
    live: set[subprocess.Popen] = set()
    runner = runner or (lambda command, log: subprocess_runner(command, log, live))
    free: queue.Queue[str] = queue.Queue()
    for device in devices:
        free.put(device)
    report, printing = SweepReport([], [], []), threading.Lock()

    def one(index: int, item: PlannedRun) -> None:
        device = free.get()
        try:
            buffer = io.StringIO()
            run_item(on_device(item, device), f"[{index}/{len(plan)}] ({device})", out, report,
                     runner, buffer, busy_wait_s)
            with printing:
                stream.write(buffer.getvalue())
                stream.flush()
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [pool.submit(one, i, item) for i, item in enumerate(plan, start=1)]
        try:
            for future in futures:
                future.result()
        except BaseException as exc:
            for future in futures:
                future.cancel()
            _stop_all(live, interrupted=isinstance(exc, KeyboardInterrupt))
            raise
    return report


def _stop_all(live: set[subprocess.Popen], interrupted: bool) -> None:
    """Stop every live run: after a Ctrl-C (which reached them too) give them time first."""
    procs = list(live)
    for proc in procs:
        if not interrupted:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------- SLURM (submitit)


@dataclass
class CellTask:
    """One cell as a submitit job; requeue-safe because it decides what to do when it starts.

    ``make_command(resume)`` is the planned run's command builder (picklable: a
    ``functools.partial`` of :func:`raug.run.sweep.build_command`).
    """

    label: str
    save_folder: Path
    out: Path
    make_command: Callable[[bool], list[str]]

    def __call__(self) -> str:
        """Run (or resume) the cell; ``"completed"``, ``"skipped"`` (COMPLETED already).

        Raises:
            RuntimeError: the run failed, or another live run writes into the folder.
        """
        state = folder_state(self.save_folder)
        if state.state is State.COMPLETED:
            return "skipped"
        if state.state is State.BUSY:
            raise RuntimeError(f"{self.label}: {state.detail}; not started")
        if state.state is State.STALE:
            move_stale(self.save_folder, self.out)
        self.save_folder.mkdir(parents=True, exist_ok=True)
        code = subprocess_runner(self.make_command(state.state is State.RESUME),
                                 self.save_folder / LOG_NAME)
        if code < 0:  # killed by a signal: most likely SLURM stopping this job (requeue, cancel)
            time.sleep(KILLED_GRACE_S)  # SLURM's SIGKILL or submitit's requeue ends us first
        if code != 0 or folder_state(self.save_folder).state is not State.COMPLETED:
            raise RuntimeError(f"{self.label}: FAILED (exit {code}), see "
                               f"{self.save_folder / LOG_NAME}")
        return "completed"

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """On preemption or time-out, requeue the same task: it resumes from the folder.

        The engine writes its last checkpoint every epoch, so there is nothing to save here.
        """
        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class SlurmOptions:
    """The per-run resources of ``--launcher slurm`` (one task = one cell = one node slot)."""

    partition: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    time_min: int = 24 * 60
    array_parallelism: int = 256
    sbatch: tuple[tuple[str, str], ...] = ()  # extra sbatch options, e.g. (("qos", "high"),)


def make_executor(folder: Path, options: SlurmOptions) -> submitit.Executor:
    """A submitit SLURM executor for one array (tests swap in ``submitit.LocalExecutor``).

    Raises:
        SweepError: no SLURM here (submitit finds no ``srun``).
    """
    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError as exc:
        raise SweepError(f"--launcher slurm: {exc}") from exc
    executor.update_parameters(**slurm_parameters(options))
    return executor


def slurm_parameters(options: SlurmOptions) -> dict[str, Any]:
    """submitit's ``SlurmExecutor`` parameters (each becomes an ``#SBATCH`` line)."""
    params: dict[str, Any] = {
        "job_name": "raug-sweep", "nodes": 1, "ntasks_per_node": 1,
        "cpus_per_task": options.cpus_per_run, "time": options.time_min,
        "array_parallelism": options.array_parallelism,
        "additional_parameters": dict(options.sbatch),
    }
    if options.gpus_per_run:
        params["gpus_per_node"] = options.gpus_per_run
    if options.partition:
        params["partition"] = options.partition
    return params


def read_jobs(out: Path) -> dict[str, str]:
    """The recorded ``{cell folder name: job id}`` of ``out`` (empty if none)."""
    path = out / SLURM_DIR / JOBS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def queued_jobs(out: Path, alive: Callable[[], set[str]]) -> dict[str, str]:
    """The recorded jobs of ``out`` that are still in the queue (pending or running)."""
    recorded = read_jobs(out)
    if not recorded:
        return {}
    ids = alive()
    return {name: job for name, job in recorded.items() if job in ids}


def squeue_ids() -> set[str]:
    """Ids (``123_4`` per array task) of this user's jobs in the SLURM queue.

    Raises:
        SweepError: squeue failed (no SLURM, controller unreachable).
    """
    try:
        result = subprocess.run(["squeue", "--noheader", "--array", "--format=%i",
                                 f"--user={getpass.getuser()}"],
                                capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise SweepError(f"--launcher slurm: squeue failed: {_last_line(detail)}") from exc
    return set(result.stdout.split())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def submit_cells(plan: Sequence[PlannedRun], out: Path, executor: submitit.Executor,
                 queued: dict[str, str], stream: TextIO) -> list[tuple[PlannedRun, submitit.Job]]:
    """Submit, as one array, every cell that is not COMPLETED, running or queued.

    Prints one line per cell and records the new job ids in ``out/_slurm/jobs.json``.

    Raises:
        SweepError: sbatch refused the array (nothing was submitted).
    """
    todo = [item for item in plan
            if item.command is not None and item.combo.name not in queued
            and not runlock.is_locked(item.save_folder)]
    jobs: list[submitit.Job] = []
    if todo:
        try:
            with executor.batch():
                jobs = [executor.submit(CellTask(item.combo.label, item.save_folder, out,
                                                 item.make_command)) for item in todo]
        except submitit.core.utils.FailedJobError as exc:  # what submitit makes of an sbatch error
            raise SweepError(f"--launcher slurm: sbatch failed: {_last_line(str(exc))}") from exc
    submitted = {item.combo.name: job for item, job in zip(todo, jobs)}
    for i, item in enumerate(plan, start=1):
        print(f"[{i}/{len(plan)}] {item.combo.label} ... {_submission_line(item, submitted, queued)}",
              file=stream, flush=True)
    recorded = read_jobs(out) | {name: str(job.job_id) for name, job in submitted.items()}
    (out / SLURM_DIR).mkdir(parents=True, exist_ok=True)
    (out / SLURM_DIR / JOBS_FILE).write_text(json.dumps(recorded, indent=1), encoding="utf-8")
    return list(zip(todo, jobs))


def _submission_line(item: PlannedRun, submitted: dict[str, submitit.Job],
                     queued: dict[str, str]) -> str:
    name = item.combo.name
    if name in submitted:
        return f"submitted as job {submitted[name].job_id} ({item.state.state.value})"
    if name in queued:
        return f"already queued as job {queued[name]}"
    if item.command is None and item.state.state is State.COMPLETED:
        return "skipped (already COMPLETED)"
    return f"running ({item.state.detail}); not submitted"


def wait_jobs(submitted: Sequence[tuple[PlannedRun, submitit.Job]], stream: TextIO) -> SweepReport:
    """Wait for the submitted tasks (``--wait``) and report each one's outcome."""
    report = SweepReport([], [], [])
    for item, job in submitted:
        try:
            outcome = job.result()
        except Exception as exc:  # submitit wraps the task's exception in its own types
            reason = _failure_reason(item.combo.label, str(exc)) or type(exc).__name__
            print(f"{item.combo.label}: FAILED (job {job.job_id}): {reason}", file=stream, flush=True)
            report.failed.append(f"{item.combo.label} (job {job.job_id})")
            continue
        print(f"{item.combo.label}: {outcome.upper()} (job {job.job_id})", file=stream, flush=True)
        (report.skipped if outcome == "skipped" else report.completed).append(item.combo.label)
    return report


def _failure_reason(label: str, text: str) -> str:
    """The task's own message (``FAILED (exit 1), see .../sweep.log``) out of submitit's report."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line.split(f"{label}: ", 1)[1] for line in lines if f"{label}: " in line]
    return ours[-1] if ours else (lines[-1] if lines else "")
