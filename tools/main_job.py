"""The main job: the whole pipeline on the built-in synthetic ISIC 2019 data.

Steps (each skipped when already done, so a rerun finishes an interrupted job):

1. synthesize an official-format ISIC 2019 dataset (``data/ISIC2019/synthesize.py``);
2. prepare it (``run_preprocess.sh``: merge, split, folds, resized image cache);
3. teacher ResNet-50 (``isic.py``);
4. MobileNet-V2 student alone (``isic_d_kd.py`` with ``_kd_method="none"``);
5. D-KD student (``isic_d_kd.py`` with ``_kd_method="d_kd"``);
6. SSD-KD student (``isic_ssd_kd.py``);
7. a comparison table read back from the Sacred runs (markdown, CSV, PNG chart):
   mean ± sd per method over the seeds.

Steps 3-6 run once per seed 0..N-1 (``--seeds N``; the training ``seed``: initialisation,
data order, augmentation; the dataset and its split stay fixed), each student distilled
from the teacher of its own seed, so the spread includes the teacher's. Seed 0 uses the
folders ``teacher``, ``student_none``, ...; seed s > 0 the same names with ``_seed<s>``.

``--fast`` runs the same steps smaller (400 images at 32 px, 2 / 2 / 2 / 1+1 epochs, 3 seeds)
for a first try or a busy machine: a few minutes on an idle 2-core box. At that size the
networks, trained from scratch, stay near chance: the fast mode checks the pipeline, the
seeds and the timing, not the methods (the full job with ``--seeds 3`` compares them).

Each step prints its expected time, measured per mode on the reference machine
(:data:`REFERENCE_MACHINE`, idle), and its elapsed time.

Each training runs in a fork of the job's process, which imports torch & co. once
(:mod:`raug.run.forkrun`; about 12 s saved per training on 2 cores), unless ``--subprocess``.

Usage: ``bash tools/main.sh [--fast] [--seeds N] [--out DIR] [--data DIR] [--device cpu] [--subprocess]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from raug.run import forkrun

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "experiment" / "isic"
TEACHER = "teacher ResNet-50"
FOLDERS = {
    TEACHER: "teacher",
    "student alone": "student_none",
    "D-KD student": "student_d_kd",
    "SSD-KD student": "student_ssd_kd",
}
SCRIPT = {TEACHER: "isic.py", "student alone": "isic_d_kd.py", "D-KD student": "isic_d_kd.py",
          "SSD-KD student": "isic_ssd_kd.py"}
_KD_WEIGHTS = {"_lambd_drkd": 1, "_lambd_crkd": 1000}


REFERENCE_MACHINE = "an idle 2-core AMD EPYC (AVX2)"


@dataclass(frozen=True)
class Mode:
    """One size of the main job: the dataset to synthesize, each training step's config keys
    and the seconds each step took on :data:`REFERENCE_MACHINE` (printed as expectations)."""

    name: str
    dataset: dict
    img_size: int
    steps: dict[str, dict]
    seeds: int
    out: str
    data: str
    expected_s: dict[str, float]  # per training step (one seed), "data" and "compare" (per seed)


# At least 40 images per class; the test split (drawn by lesion) still holds only 1 AK, 2 DF
# and 2 SCC images of its 100, so one rare image moves the test balanced accuracy by ~0.06.
FULL = Mode(
    name="full",
    dataset={"num_images": 1000, "min_per_class": 40, "image_size": 96, "seed": 2019, "prep_size": 72},
    img_size=64,
    steps={
        TEACHER: {"_epochs": 18, "_batch_size": 32, "_lr_init": 0.002, "_early_stop": 6, "_sched_patience": 2},
        "student alone": {"_kd_method": "none", "_epochs": 8, "_batch_size": 32},
        "D-KD student": {"_kd_method": "d_kd", **_KD_WEIGHTS, "_epochs": 8, "_batch_size": 32},
        "SSD-KD student": {"_kd_method": "ssd_kd", **_KD_WEIGHTS, "_epochs": 8, "_batch_size": 16,
                           "_epochs_tune": 3},
    },
    seeds=1, out="results/main", data="data/synthetic",
    # measured 2026-12-01 (--seeds 3, seeds 1-2; the teacher stops early at epoch 14-16)
    expected_s={TEACHER: 510.0, "student alone": 63.0, "D-KD student": 120.0, "SSD-KD student": 560.0,
                "data": 27.0, "compare": 8.0},
)
# The same steps with 40 % of the images at 32 px and a fraction of the epochs.
FAST_EPOCHS = {TEACHER: {"_epochs": 2}, "student alone": {"_epochs": 2}, "D-KD student": {"_epochs": 2},
               "SSD-KD student": {"_epochs": 1, "_epochs_tune": 1}}
FAST = replace(
    FULL,
    name="fast",
    dataset={**FULL.dataset, "num_images": 400, "min_per_class": 16, "image_size": 48, "prep_size": 40},
    img_size=32,
    steps={label: {**config, **FAST_EPOCHS[label]} for label, config in FULL.steps.items()},
    seeds=3, out="results/main_fast", data="data/synthetic_fast",
    # from the 3-seed fast job with 3 / 2 / 2 / 1+2 epochs (6.0 min), less the epochs dropped since
    expected_s={TEACHER: 22.0, "student alone": 11.0, "D-KD student": 15.0, "SSD-KD student": 33.0,
                "data": 6.0, "compare": 6.5},
)


@dataclass(frozen=True)
class Step:
    """One printed, timed step of the job.

    ``save_folder`` marks a training step (skipped when COMPLETED, resumed when
    interrupted); ``done_file`` a step skipped when that file exists.
    """

    title: str
    cmd: tuple[str, ...]
    expected_s: float
    save_folder: Path | None = None
    done_file: Path | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; ``--out``/``--data``/``--seeds`` default by mode, so fast runs never reuse full ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true",
                        help=f"small sizes, a few minutes on 2 idle cores (default --seeds {FAST.seeds})")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help=f"train every step with seeds 0..N-1 and report mean ± sd "
                             f"(default {FULL.seeds}; {FAST.seeds} with --fast)")
    parser.add_argument("--data", type=Path, help="where the synthetic dataset is written and prepared "
                        f"(default {FULL.data}; {FAST.data} with --fast)")
    parser.add_argument("--out", type=Path, help="where the runs and the comparison go "
                        f"(default {FULL.out}; {FAST.out} with --fast)")
    parser.add_argument("--device", default="cpu", help="_device of every run (cpu, cuda, auto)")
    parser.add_argument("--subprocess", action="store_true",
                        help="start every training as a new Python process (about 12 s more per "
                             "training on 2 cores) instead of a fork of this one, which imports "
                             "torch & co. once")
    args = parser.parse_args(argv)
    mode = FAST if args.fast else FULL
    args.seeds = mode.seeds if args.seeds is None else args.seeds
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    args.data = (args.data or REPO / mode.data).resolve()
    args.out = (args.out or REPO / mode.out).resolve()
    args.mode = mode
    return args


def save_folder(out: Path, label: str, seed: int) -> Path:
    """``<out>/<folder>`` for seed 0 (the folders of a one-seed job), ``<out>/<folder>_seed<s>`` after."""
    return out / (FOLDERS[label] if seed == 0 else f"{FOLDERS[label]}_seed{seed}")


def overrides(config: dict) -> list[str]:
    """Sacred ``with`` arguments: ``key=value`` with JSON values (strings double-quoted)."""
    return [f"{key}={json.dumps(value)}" for key, value in config.items()]


def training_cmd(args: argparse.Namespace, label: str, seed: int) -> tuple[str, ...]:
    """The command line of one training step (without ``_resume``, added when it is needed)."""
    script = SCRIPT[label]
    save = save_folder(args.out, label, seed)
    cmd = [sys.executable, str(SCRIPTS / script), "with", *overrides(args.mode.steps[label]),
           f"_img_size={args.mode.img_size}", f"_device={args.device}",
           "_num_workers=0",  # loader workers would compete with torch's threads for the 2 cores
           f"seed={seed}", f"_base_path={args.data}", f"_save_folder={save}",
           "_pretrained=False"]  # no ImageNet weights offline: train from scratch
    if script != "isic.py":
        teacher = save_folder(args.out, TEACHER, seed) / "best-checkpoint" / "best-checkpoint.pth"
        cmd.append(f"_teacher_ckpt={teacher}")
    return tuple(cmd)


def plan(args: argparse.Namespace) -> list[Step]:
    """Every step before the comparison, in order: data, then the four trainings per seed."""
    data, ds = args.data, args.mode.dataset
    steps = [
        Step("synthesize an ISIC 2019-format dataset",
             (sys.executable, "data/ISIC2019/synthesize.py", "--root", str(data),
              "--num-images", str(ds["num_images"]), "--image-size", str(ds["image_size"]),
              "--seed", str(ds["seed"]), "--min-per-class", str(ds["min_per_class"])),
             args.mode.expected_s["data"] / 2, done_file=data / "ISIC_2019_Training_GroundTruth.csv"),
        # idempotent: a rerun checks the outputs and redoes no finished image work
        Step("prepare it (run_preprocess.sh)",
             ("bash", "run_preprocess.sh", "--root", str(data), "--size", str(ds["prep_size"])),
             args.mode.expected_s["data"] / 2),
    ]
    for seed in range(args.seeds):
        for label in FOLDERS:
            steps.append(Step(f"{label}, seed {seed} ({SCRIPT[label]})", training_cmd(args, label, seed),
                              args.mode.expected_s[label], save_folder=save_folder(args.out, label, seed)))
    return steps


def compare_expected_s(args: argparse.Namespace) -> float:
    """Expected seconds of the comparison step."""
    return args.mode.expected_s["compare"] * args.seeds


def minutes(seconds: float) -> str:
    """``42 s`` or ``3.5 min``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@contextmanager
def timed(title: str, expected_s: float) -> Iterator[None]:
    """Print the step's header with its expected time, and its elapsed time when it ends."""
    print(f"\n=== {title} (expected {minutes(expected_s)}) ===", flush=True)
    start = time.perf_counter()
    yield
    print(f"--- {title}: {minutes(time.perf_counter() - start)} (expected {minutes(expected_s)})",
          flush=True)


def run(cmd: tuple[str, ...], fork: bool = False) -> None:
    """Run a command, streaming its output; stop the job on failure.

    ``fork``: a ``python script.py`` command runs in a fork of this process, which has
    preloaded the libraries (:mod:`raug.run.forkrun`); other commands as subprocesses.
    On Ctrl-C the step, which got the same SIGINT, is waited for: it records INTERRUPTED and
    keeps its last checkpoint (``subprocess.run`` would kill it 0.25 s later).
    """
    print("$ " + " ".join(cmd), flush=True)
    step = forkrun.start(cmd, cwd=REPO) if fork and forkrun.is_script_command(cmd) else subprocess.Popen(cmd, cwd=REPO)
    try:
        returncode = step.wait()
    except KeyboardInterrupt:
        step.wait()
        raise
    if returncode != 0:
        sys.exit(f"main job: step failed (exit {returncode}): {' '.join(cmd)}")


def completed(folder: Path) -> bool:
    """True when ``folder`` holds a COMPLETED Sacred run."""
    from raug.report.runs import load_runs

    if not folder.is_dir():
        return False
    runs = load_runs([folder])
    return bool((runs.get("status") == "COMPLETED").any()) if not runs.empty else False


def execute(step: Step, fork: bool = False) -> None:
    """Run ``step`` unless done; an interrupted training resumes from its last checkpoint."""
    if step.done_file is not None and step.done_file.is_file():
        print(f"reusing {step.done_file.parent}")
        return
    if step.save_folder is not None and completed(step.save_folder):
        print(f"already COMPLETED in {step.save_folder}: skipped")
        return
    last = step.save_folder / "last-checkpoint" / "last-checkpoint.pth" if step.save_folder else None
    resume = last is not None and last.is_file()
    run(step.cmd + (("_resume=True",) if resume else ()), fork=fork)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_note(expected_s: float) -> str:
    """The expected total, where it was measured, and this machine: its CPU and load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"expected {minutes(expected_s)} in all (measured on {REFERENCE_MACHINE}); this machine: "
            f"{os.cpu_count()} x {cpu_name()}, load average {load:.1f} "
            "(another CPU model takes longer or shorter; a load above the CPU count slows every step)")


def compare(args: argparse.Namespace) -> None:
    """Read the runs of this job's seeds back, print and save the mean ± sd comparison."""
    from raug.report.aggregate import format_summary
    from raug.report.runs import load_runs
    from raug.report.seeds import per_seed_frame, summarize_methods, write_seed_comparison

    folders = {seed: {label: save_folder(args.out, label, seed) for label in FOLDERS} for seed in range(args.seeds)}
    per_seed = per_seed_frame(load_runs([args.out]), folders)
    summary = summarize_methods(per_seed)
    paths = write_seed_comparison(per_seed, summary, args.out)
    print(format_summary(summary, "markdown", digits=3))
    print("saved: " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline; on Ctrl-C one line saying how to continue, not a traceback."""
    try:
        return run_job(argv)
    except KeyboardInterrupt:
        print("\nmain job interrupted: run the same command again to continue (finished steps are "
              "skipped, an interrupted training resumes from its last checkpoint)", file=sys.stderr)
        return 130


def run_job(argv: list[str] | None = None) -> int:
    """Run the pipeline; print and save the comparison table."""
    args = parse_args(argv)
    steps = plan(args)
    total = len(steps) + 1
    print(f"main job ({args.mode.name}, seeds 0..{args.seeds - 1}): {total} steps; "
          + load_note(sum(s.expected_s for s in steps) + compare_expected_s(args)), flush=True)
    start = time.perf_counter()
    fork = not args.subprocess and forkrun.can_fork()
    if fork:
        print("importing torch and the other libraries once; each training runs in a fork of this "
              "process (--subprocess: a new process each)", flush=True)
        forkrun.preload()
    for i, step in enumerate(steps, start=1):
        with timed(f"{i}/{total} {step.title}", step.expected_s):
            execute(step, fork=fork)
    with timed(f"{total}/{total} comparison (read back from the Sacred runs)", compare_expected_s(args)):
        compare(args)
    print(f"main job finished in {minutes(time.perf_counter() - start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
