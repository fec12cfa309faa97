"""tools/sweep.py launchers: --status, --parallel with --devices, and --launcher slurm through
submitit's LocalExecutor (no SLURM here): one array, requeue-then-resume, no resubmission."""

import itertools
import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import submitit
from test_runlock import kill, start_holder
from test_sweep import FAKE_SCRIPT, argv_of

from raug.files import runlock
from raug.run import launchers
from raug.run.launchers import (
    CellTask,
    SlurmOptions,
    cell_status,
    format_status,
    run_parallel,
    slurm_parameters,
    wait_jobs,
)
from raug.run.sweep import folder_state, plan_sweep, run_sweep
from raug.run.sweep_cli import main


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake_exp.py"
    path.write_text(FAKE_SCRIPT)
    return path


def sweep_args(script: Path, out: Path, *extra: str, folds=("1", "2")) -> list[str]:
    return [str(script), "--folds", *folds, "--seeds", "0", "--out", str(out), *extra]


# ----------------------------------------------------------------------------- --status


def test_status_reads_every_cell_from_its_folder(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(fake_script, out, "--", "fail_fold=2", folds=("1", "2"))) == 1
    running, _ = start_holder(out / "fold3-seed0")  # a live run writes there
    capsys.readouterr()
    try:
        assert main(sweep_args(fake_script, out, "--status", folds=("1", "2", "3", "4"))) == 0
        who = runlock.holder(out / "fold3-seed0").describe()
    finally:
        kill(running.pid)
        running.wait()
    assert capsys.readouterr().out.splitlines() == [
        "fold 1 seed 0: completed (Sacred run 1 COMPLETED)",
        "fold 2 seed 0: failed (earlier attempt FAILED)",
        f"fold 3 seed 0: running (in use by {who})",
        "fold 4 seed 0: pending (no folder yet)",
        "4 cells: 1 pending, 1 running, 1 completed, 1 failed",
    ]
    assert not (out / "fold4-seed0").exists()  # --status changes nothing


def test_a_queued_cell_is_pending_not_failed(tmp_path, fake_script):
    out = tmp_path / "sweep"
    assert main(sweep_args(fake_script, out, "--", "crash_fold=1", folds=("1",))) == 1
    assert cell_status(out / "fold1-seed0") == (
        "failed", "last run RUNNING; resuming from last-checkpoint/last-checkpoint.pth")
    assert cell_status(out / "fold1-seed0", "77_0")[0] == "pending"
    plan = plan_sweep(fake_script, [1], [0], out)
    assert format_status(plan, {"fold1-seed0": "77_0"}).splitlines()[0] == (
        "fold 1 seed 0: pending (job 77_0 in the queue; last run RUNNING; resuming from "
        "last-checkpoint/last-checkpoint.pth)")


# ----------------------------------------------------------------------------- --parallel


def test_parallel_runs_one_per_device_at_a_time(tmp_path, fake_script):
    out = tmp_path / "sweep"
    plan = plan_sweep(fake_script, [1, 2, 3], [0, 1], out)
    spans, lock = [], threading.Lock()

    def runner(command, log):
        start = time.monotonic()
        time.sleep(0.2)
        with lock:
            spans.append((command[-1], start, time.monotonic()))
        return 0

    report = run_parallel(plan, out, ["cuda:0", "cuda:1"], runner=runner)
    assert len(report.failed) == 6  # the stand-in runner writes nothing: not COMPLETED
    assert sorted(s[0] for s in spans) == ['_device="cuda:0"'] * 3 + ['_device="cuda:1"'] * 3
    for device in ('_device="cuda:0"', '_device="cuda:1"'):
        mine = sorted((a, b) for d, a, b in spans if d == device)
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(mine)), mine
    overlapping = max(sum(a <= t < b for _, a, b in spans) for _, t, _ in spans)
    assert overlapping == 2


def test_parallel_sweep_completes_and_rerun_skips(tmp_path, fake_script, capsys):
    out = tmp_path / "sweep"
    args = sweep_args(fake_script, out, "--parallel", "2", "--devices", "cpu,cpu",
                      folds=("1", "2", "3"))
    assert main(args) == 0
    *lines, summary = capsys.readouterr().out.splitlines()
    assert summary == "sweep: 3 runs: 3 completed now, 0 skipped (already COMPLETED), 0 failed"
    assert sorted(line.split(" ... ")[0] for line in lines) == [
        "[1/3] (cpu) fold 1 seed 0", "[2/3] (cpu) fold 2 seed 0", "[3/3] (cpu) fold 3 seed 0"]
    assert all(" ... COMPLETED in " in line for line in lines)
    assert argv_of(out / "fold2-seed0", 1)[-1] == '_device="cpu"'
    assert main(args) == 0
    assert capsys.readouterr().out.count("... skipped (already COMPLETED)") == 3


@pytest.mark.parametrize(("extra", "message"), [
    (["--parallel", "2", "--devices", "cpu"], "--parallel 2 needs --devices with exactly 2"),
    (["--parallel", "2"], "--parallel 2 needs --devices"),
    (["--devices", "cpu,cpu"], "--parallel 1 needs --devices with exactly 1"),
    (["--parallel", "1", "--devices", "cpu", "--", "_device=cpu"], "_device=... is not allowed"),
    (["--launcher", "slurm", "--parallel", "2"], "are for --launcher local"),
    (["--launcher", "slurm", "--sbatch", "qos"], "expected KEY=VALUE"),
])
def test_bad_launcher_flags_are_refused(tmp_path, fake_script, capsys, extra, message):
    assert main(sweep_args(fake_script, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --launcher slurm


def test_slurm_options_become_sbatch_lines(tmp_path):
    options = SlurmOptions(partition="gpu", gpus_per_run=2, cpus_per_run=6, time_min=90,
                           array_parallelism=4, sbatch=(("qos", "high"), ("account", "lab")))
    text = submitit.slurm.slurm._make_sbatch_string(command="true", folder=tmp_path / "%j",
                                                    map_count=10, **slurm_parameters(options))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --time=90", "#SBATCH --array=0-9%4",
                 "#SBATCH --qos=high", "#SBATCH --account=lab", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@90", "#SBATCH --open-mode=append"):
        assert line in text.splitlines(), line


def test_slurm_without_slurm_is_one_line(tmp_path, fake_script, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun / sbatch
    assert main(sweep_args(fake_script, tmp_path / "out", "--launcher", "slurm")) == 2
    assert capsys.readouterr().err == (
        'error: --launcher slurm: Could not detect "srun", are you indeed on a slurm cluster?\n')
    assert not (tmp_path / "out" / "fold1-seed0").exists()


def test_an_unreachable_slurm_ends_in_one_error_line(tmp_path, fake_script, capsys, monkeypatch):
    (tmp_path / "bin").mkdir()
    for tool in ("srun", "sbatch", "squeue"):  # installed, but no controller answers
        (tmp_path / "bin" / tool).write_text("#!/bin/sh\necho 'sbatch: error: noise' >&2\n"
                                             "echo 'fatal: Could not establish a configuration "
                                             "source' >&2\nexit 1\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    out = tmp_path / "out"
    assert main(sweep_args(fake_script, out, "--launcher", "slurm")) == 2
    err = capsys.readouterr().err  # sbatch's own stderr passes through submitit, then ours
    assert err.splitlines()[-1] == ("error: --launcher slurm: sbatch failed: fatal: Could not "
                                    "establish a configuration source")
    assert "Traceback" not in err
    assert not (out / "_slurm" / "jobs.json").exists()
    (out / "_slurm" / "jobs.json").write_text('{"fold1-seed0": "7"}')  # a submission before
    assert main(sweep_args(fake_script, out, "--launcher", "slurm", "--status")) == 2
    assert capsys.readouterr().err == ("error: --launcher slurm: squeue failed: fatal: Could not "
                                       "establish a configuration source\n")


@pytest.fixture
def local_slurm(monkeypatch):
    """--launcher slurm with submitit's LocalExecutor, and a queue that holds nothing."""
    monkeypatch.setattr(launchers, "make_executor", lambda folder, options: submitit.LocalExecutor(folder))
    monkeypatch.setattr(launchers, "squeue_ids", set)


def test_slurm_array_completes_and_a_rerun_submits_nothing(tmp_path, fake_script, capsys, local_slurm):
    out = tmp_path / "sweep"
    args = sweep_args(fake_script, out, "--launcher", "slurm", "--wait", "--", "crash_fold=9")
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    jobs = json.loads((out / "_slurm" / "jobs.json").read_text())
    assert sorted(jobs) == ["fold1-seed0", "fold2-seed0"]
    assert lines == [
        f"[1/2] fold 1 seed 0 ... submitted as job {jobs['fold1-seed0']} (new)",
        f"[2/2] fold 2 seed 0 ... submitted as job {jobs['fold2-seed0']} (new)",
        "sweep: 2 task(s) submitted; `--status` shows the grid",
        f"fold 1 seed 0: COMPLETED (job {jobs['fold1-seed0']})",
        f"fold 2 seed 0: COMPLETED (job {jobs['fold2-seed0']})",
        "sweep: 2 runs: 2 completed now, 0 skipped (already COMPLETED), 0 failed",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[1/2] fold 1 seed 0 ... skipped (already COMPLETED)",
        "[2/2] fold 2 seed 0 ... skipped (already COMPLETED)",
        "sweep: 0 task(s) submitted; `--status` shows the grid",
        "sweep: 0 runs: 0 completed now, 0 skipped (already COMPLETED), 0 failed",
    ]
    assert not (out / "fold1-seed0" / "argv-2.json").exists()


def test_queued_cells_are_not_submitted_twice(tmp_path, fake_script, capsys, monkeypatch):
    out = tmp_path / "sweep"
    (out / "_slurm").mkdir(parents=True)
    (out / "_slurm" / "jobs.json").write_text(json.dumps({"fold1-seed0": "41_0", "fold2-seed0": "41_1"}))
    submitted = []

    class Recorder:
        def batch(self):
            return __import__("contextlib").nullcontext()

        def submit(self, task):
            submitted.append(task.label)
            return type("Job", (), {"job_id": "42_0"})()

    monkeypatch.setattr(launchers, "make_executor", lambda folder, options: Recorder())
    monkeypatch.setattr(launchers, "squeue_ids", lambda: {"41_0", "99"})  # 41_1 has left the queue
    assert main(sweep_args(fake_script, out, "--launcher", "slurm")) == 0
    assert submitted == ["fold 2 seed 0"]
    assert capsys.readouterr().out.splitlines()[:2] == [
        "[1/2] fold 1 seed 0 ... already queued as job 41_0",
        "[2/2] fold 2 seed 0 ... submitted as job 42_0 (new)",
    ]
    assert json.loads((out / "_slurm" / "jobs.json").read_text()) == {
        "fold1-seed0": "41_0", "fold2-seed0": "42_0"}
    assert main(sweep_args(fake_script, out, "--launcher", "slurm", "--status")) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "fold 1 seed 0: pending (job 41_0 in the queue; no folder yet)")


# A run that trains (sleeps) until it is stopped, unless it resumes: then it completes.
PREEMPTIBLE = textwrap.dedent('''
    import json, os, runpy, sys, time
    from pathlib import Path
    with_args = sys.argv[sys.argv.index("with") + 1:]
    if "_resume=True" not in with_args:
        save = Path(next(a for a in with_args if a.startswith("_save_folder="))
                    .split("=", 1)[1].strip('"'))
        save.mkdir(parents=True, exist_ok=True)
        n = len(list(save.glob("attempt-*.json"))) + 1
        (save / f"attempt-{n}.json").write_text(json.dumps({"argv": sys.argv[1:],
                                                           "task_pid": os.getppid()}))
        (save / "last-checkpoint").mkdir(exist_ok=True)
        (save / "last-checkpoint" / "last-checkpoint.pth").write_bytes(b"epoch 1")
        time.sleep(120)
    runpy.run_path(sys.argv[0].replace("preemptible.py", "fake_exp.py"), run_name="__main__")
''')


def test_a_preempted_task_is_requeued_and_resumes(tmp_path, fake_script):
    script = tmp_path / "preemptible.py"
    script.write_text(PREEMPTIBLE)
    out = tmp_path / "sweep"
    item = plan_sweep(script, [1], [0], out)[0]
    job = submitit.LocalExecutor(tmp_path / "jobs").submit(
        CellTask(item.combo.label, item.save_folder, out, item.make_command))
    folder = out / "fold1-seed0"
    attempt = folder / "attempt-1.json"
    deadline = time.monotonic() + 120
    while not attempt.is_file() or not attempt.read_text():  # the run is training
        assert time.monotonic() < deadline, job.stderr()
        time.sleep(0.2)
    first = json.loads(attempt.read_text())
    os.kill(first["task_pid"], signal.SIGUSR2)  # what SLURM sends on preemption / near the time limit
    assert job.result() == "completed"
    assert "Caught signal SIGUSR2" in job.stderr()
    assert "Requeued job" in job.stdout()
    assert "_resume=True" not in first["argv"]
    assert argv_of(folder, 1)[-1] == "_resume=True"  # the requeued task resumed
    assert not (folder / "attempt-2.json").exists()  # ... and did not start afresh
    assert folder_state(folder).state.value == "completed"
    assert not runlock.is_locked(folder)


def test_a_task_never_restarts_a_finished_cell(tmp_path, fake_script):
    out = tmp_path / "sweep"
    plan = plan_sweep(fake_script, [1], [0], out)
    assert run_sweep(plan, out).exit_code == 0
    task = CellTask(plan[0].combo.label, plan[0].save_folder, out, plan[0].make_command)
    assert task() == "skipped"  # e.g. a requeued task whose run completed just before
    assert isinstance(task.checkpoint(), submitit.helpers.DelayedSubmission)
    assert not (out / "fold1-seed0" / "argv-2.json").exists()


def test_a_failed_task_says_where_to_look(tmp_path, fake_script):
    out = tmp_path / "sweep"
    plan = plan_sweep(fake_script, [1], [0], out, overrides=["fail_fold=1"])
    task = CellTask(plan[0].combo.label, plan[0].save_folder, out, plan[0].make_command)
    with pytest.raises(RuntimeError, match=r"fold 1 seed 0: FAILED \(exit 1\), see .*sweep.log"):
        task()


def test_wait_reports_the_tasks_own_failure_message(tmp_path, fake_script, capsys):
    plan = plan_sweep(fake_script, [1, 2], [0], tmp_path / "sweep")
    log = plan[1].save_folder / "sweep.log"

    class Job:
        def __init__(self, job_id, outcome):
            self.job_id, self.outcome = job_id, outcome

        def result(self):
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

    failure = submitit.core.utils.FailedJobError(
        f"Job (task=0) failed during processing with trace:\n----------------------\n"
        f"Traceback ...\nRuntimeError: fold 2 seed 0: FAILED (exit 1), see {log}\n\n"
        f"You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - x.err")
    report = wait_jobs([(plan[0], Job("5_0", "skipped")), (plan[1], Job("5_1", failure))],
                       sys.stdout)
    assert capsys.readouterr().out.splitlines() == [
        "fold 1 seed 0: SKIPPED (job 5_0)",
        f"fold 2 seed 0: FAILED (job 5_1): FAILED (exit 1), see {log}"]
    assert (report.skipped, report.failed, report.exit_code) == (
        ["fold 1 seed 0"], ["fold 2 seed 0 (job 5_1)"], 1)


# ----------------------------------------------------------------------------- a real cell


@pytest.mark.slow  # about a minute on 2 shared cores: each task imports torch, then trains
def test_real_cell_through_the_slurm_launcher(prepared_isic, tmp_path, capsys, local_slurm):
    """isic.py (MobileNet, 32 px, 1 epoch) as one array task, then --status and a rerun."""
    out = tmp_path / "teachers"
    args = ["isic.py", "--folds", "1", "--seeds", "0", "--out", str(out), "--launcher", "slurm",
            "--wait", "--", "quick", f"_base_path={prepared_isic}", "_device=cpu",
            "_img_size=32", "_epochs=1", "_batch_size=32", '_model_name="mobilenet"']
    assert main(args) == 0, (out / "fold1-seed0" / "sweep.log").read_text()[-3000:]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "sweep: 1 runs: 1 completed now, 0 skipped (already COMPLETED), 0 failed")
    assert main([*args[:9], "--status"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "fold 1 seed 0: completed (Sacred run 1 COMPLETED)",
        "1 cells: 0 pending, 0 running, 1 completed, 0 failed"]
    assert main(args) == 0
    assert "0 task(s) submitted" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "fold1-seed0").glob("[0-9]*")) == ["1"]
    assert sys.executable in (out / "fold1-seed0" / "sweep.log").read_text()
