"""The command line of ``tools/sweep.py``: plan, then run locally or submit to SLURM.

Kept apart from :mod:`raug.run.sweep` (plan, folder states, sequential runs) because it also
drives :mod:`raug.run.launchers`, which builds on that module. Usage and rules: the
docstrings of both modules, docs/comparisons.md and docs/cluster.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from raug.files import runlock
from raug.run import launchers
from raug.run.config import SHARED_CONFIG
from raug.run.sweep import (
    PlannedRun,
    SweepError,
    describe_plan,
    override_keys,
    parse_grid,
    plan_sweep,
    run_sweep,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``tools/sweep.py`` argument parser (overrides after ``--`` are split off first)."""
    parser = argparse.ArgumentParser(
        prog="python tools/sweep.py",
        description="Run an experiment script for every fold × seed × grid value; rerun to resume.",
        epilog="Everything after `--` is passed to the script's `with` (e.g. quick _device=cpu).",
    )
    parser.add_argument("script", help="experiment script: a path or isic.py / isic_d_kd.py / isic_ssd_kd.py")
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="validation folds (default: 1 2 3 4 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[SHARED_CONFIG["seed"]],
                        help=f"seeds (default: {SHARED_CONFIG['seed']})")
    parser.add_argument("--out", required=True, help="sweep folder (one save folder per run inside)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and its values (repeatable: the product is swept)")
    parser.add_argument("--teachers", metavar="DIR",
                        help="teacher sweep folder: per fold its best checkpoint -> _teacher_ckpt")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--status", action="store_true",
                        help="print each cell's state (pending/running/completed/failed), run nothing")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local subprocesses (default) or one SLURM job array (docs/cluster.md)")
    local = parser.add_argument_group("--launcher local")
    local.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="runs at a time, one per --devices entry (default 1: sequential)")
    local.add_argument("--devices", type=lambda text: text.split(","), metavar="D1,D2,...",
                       help="devices for --parallel, each run gets _device=<one of them>")
    slurm = parser.add_argument_group("--launcher slurm")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per cell (default 1)")
    slurm.add_argument("--cpus-per-run", type=int, default=8, help="CPUs per cell (default 8)")
    slurm.add_argument("--time-min", type=int, default=24 * 60,
                       help="time limit per task in minutes (default 1440); a task that reaches "
                            "it is requeued and resumes")
    slurm.add_argument("--array-parallelism", type=int, default=256,
                       help="at most this many tasks of the array at once (default 256)")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. --sbatch qos=high --sbatch account=lab")
    slurm.add_argument("--wait", action="store_true",
                       help="wait for the array and report each task (e.g. before the students)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit 0 = every run COMPLETED, 1 = some failed, 2 = bad request."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    try:
        devices = check_launcher_args(args, overrides)
        grid = parse_grid(args.grid)
        plan = plan_sweep(args.script, args.folds, args.seeds, args.out, grid, overrides, args.teachers)
    except (SweepError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe_plan(plan))
        return 0
    out = Path(args.out).expanduser().resolve()
    if args.status:
        try:
            queued = launchers.queued_jobs(out, launchers.squeue_ids) if args.launcher == "slurm" else {}
        except SweepError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(launchers.format_status(plan, queued))
        return 0
    try:
        lock = runlock.acquire(out)
    except runlock.FolderInUseError as exc:
        print(f"error: --out {out} is in use by another sweep ({exc.holder.describe()}); "
              "wait for it to finish", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: --out {out} cannot be written ({exc.strerror or exc})", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        # Planned again under the lock: a sweep that held it until now may have changed folders.
        plan = plan_sweep(args.script, args.folds, args.seeds, out, grid, overrides, args.teachers)
        if args.launcher == "slurm":
            return submit_slurm(args, plan, out, lock)
        report = (launchers.run_parallel(plan, out, devices) if devices
                  else run_sweep(plan, out))
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to finish the sweep", file=sys.stderr)
        return 130
    except _Terminated:
        print("\nterminated: the current run was stopped; rerun the same command to finish "
              "the sweep", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()
    print(report.summary(), file=sys.stderr if report.exit_code else sys.stdout)
    return report.exit_code


def check_launcher_args(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """The devices of ``--parallel`` (empty: sequential), after checking the launcher flags.

    Raises:
        SweepError: ``--parallel`` and ``--devices`` disagree, ``_device`` is also an
            override, or local-only flags are given with ``--launcher slurm``.
    """
    parse_sbatch(args.sbatch)  # checked before anything runs
    if args.launcher == "slurm":
        if args.parallel != 1 or args.devices:
            raise SweepError("--parallel/--devices are for --launcher local; SLURM places the "
                             "runs (--gpus-per-run, --array-parallelism)")
        return []
    devices = [d.strip() for d in args.devices or []]
    if args.parallel < 1 or "" in devices or (
            (devices or args.parallel > 1) and len(devices) != args.parallel):
        raise SweepError(f"--parallel {args.parallel} needs --devices with exactly "
                         f"{args.parallel} comma-separated entries (one run per device); got "
                         f"{args.devices}")
    if devices and "_device" in override_keys(overrides):
        raise SweepError("override _device=... is not allowed with --devices (each run gets one)")
    return devices


def submit_slurm(args: argparse.Namespace, plan: Sequence[PlannedRun], out: Path,
                 lock: runlock.RunLock) -> int:
    """``--launcher slurm``: submit the array, release ``--out``, then wait if asked.

    The lock of ``--out`` covers only the submission (two submitting sweeps would queue
    a cell twice); the tasks each hold their own save folder's lock while they run.
    """
    options = launchers.SlurmOptions(
        partition=args.partition, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
        time_min=args.time_min, array_parallelism=args.array_parallelism,
        sbatch=tuple(parse_sbatch(args.sbatch)))
    try:
        executor = launchers.make_executor(out / launchers.SLURM_DIR / "%j", options)
        queued = launchers.queued_jobs(out, launchers.squeue_ids)
        submitted = launchers.submit_cells(plan, out, executor, queued, sys.stdout)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lock.release()
    print(f"sweep: {len(submitted)} task(s) submitted; `--status` shows the grid",
          file=sys.stdout, flush=True)
    if not args.wait:
        return 0
    report = launchers.wait_jobs(submitted, sys.stdout)
    print(report.summary(), file=sys.stderr if report.exit_code else sys.stdout)
    return report.exit_code


def parse_sbatch(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``--sbatch KEY=VALUE`` options as (key, value) pairs for submitit.

    Raises:
        SweepError: no ``=``.
    """
    pairs = []
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--sbatch {spec!r} is invalid: expected KEY=VALUE (e.g. qos=high)")
        pairs.append((key.strip().lstrip("-").replace("-", "_"), value))
    return pairs


class _Terminated(Exception):
    """SIGTERM reached the sweep (raised by its handler, so the current run is stopped too)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated
