"""The main job without training: its plan (--fast, --seeds), expected times, skips, the
mean ± sd comparison from fake finished runs, and argument errors."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from raug.report import compare
from raug.report.seeds import per_seed_frame, summarize_methods, write_seed_comparison

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("main_job", ROOT / "tools" / "main_job.py")
main_job = importlib.util.module_from_spec(_spec)
sys.modules["main_job"] = main_job  # dataclasses look their module up there
_spec.loader.exec_module(main_job)

LABELS = list(main_job.FOLDERS)
# test balanced accuracy per seed: teacher 0.7/0.8/0.9 (mean 0.8, sd 0.1), D-KD 0.5/0.6/0.55
FAKE_BACC = {"teacher ResNet-50": [0.7, 0.8, 0.9], "student alone": [0.4, 0.4, 0.4],
             "D-KD student": [0.5, 0.6, 0.55], "SSD-KD student": [0.6, 0.62, 0.64]}


def plan_of(*argv, tmp_path):
    """The planned steps for ``argv`` with --out/--data under ``tmp_path``."""
    args = main_job.parse_args([*argv, "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")])
    return args, main_job.plan(args)


def fake_footprint(checkpoint, latency_px=224, repeats=20):
    """Footprint without a checkpoint: the teacher's or the student's size by folder name."""
    teacher = "teacher" in Path(checkpoint).parts[-3]
    return {"model": "resnet-50" if teacher else "mobilenet", "parameters (M)": 23.52 if teacher else 2.23,
            "size fp32 (MB)": 94.31 if teacher else 9.07, f"CPU latency @{latency_px}px (ms)": 50.0}


def write_fake_run(save: Path, seed: int, bacc: float, status: str = "COMPLETED") -> None:
    """A FileStorage Sacred run in ``save/1`` as ``load_runs`` reads it."""
    run_dir = save / "1"
    run_dir.mkdir(parents=True)
    result = {"test.accuracy": bacc + 0.1, "test.balanced_accuracy": bacc, "test.auc": 0.9}
    (run_dir / "run.json").write_text(json.dumps({
        "status": status, "start_time": f"2026-01-01T00:00:0{seed}", "experiment": {"name": "isic"},
        "result": result if status == "COMPLETED" else None}))
    (run_dir / "config.json").write_text(json.dumps({"_save_folder": str(save), "seed": seed,
                                                     "_best_metric": "loss"}))
    (run_dir / "info.json").write_text(json.dumps({"split_hash": "ab" * 32}))


def test_fast_plan_runs_every_training_step_per_seed(tmp_path):
    args, steps = plan_of("--fast", tmp_path=tmp_path)
    assert args.seeds == 3
    assert args.mode is main_job.FAST
    assert len(steps) == 2 + 4 * 3
    assert steps[0].cmd[steps[0].cmd.index("--num-images") + 1] == "400"
    trainings = steps[2:]
    assert [s.title for s in trainings[:4]] == [
        "teacher ResNet-50, seed 0 (isic.py)", "student alone, seed 0 (isic_d_kd.py)",
        "D-KD student, seed 0 (isic_d_kd.py)", "SSD-KD student, seed 0 (isic_ssd_kd.py)"]
    out = tmp_path / "out"
    assert [s.save_folder for s in trainings[4:8]] == [
        out / "teacher_seed1", out / "student_none_seed1", out / "student_d_kd_seed1", out / "student_ssd_kd_seed1"]
    ssd_seed2 = trainings[11].cmd
    assert "seed=2" in ssd_seed2
    assert f"_teacher_ckpt={out / 'teacher_seed2' / 'best-checkpoint' / 'best-checkpoint.pth'}" in ssd_seed2
    assert {"_epochs=1", "_epochs_tune=1", "_img_size=32"} <= set(ssd_seed2)
    assert {"_epochs=2", "_img_size=32"} <= set(trainings[0].cmd)
    assert steps[1].cmd[-2:] == ("--size", "40")  # the cache is prepared for 32 px crops


def test_full_plan_keeps_the_one_seed_commands(tmp_path):
    args, steps = plan_of(tmp_path=tmp_path)
    out, data = tmp_path / "out", tmp_path / "data"
    assert args.seeds == 1
    assert len(steps) == 6
    assert steps[2].cmd == (
        sys.executable, str(main_job.SCRIPTS / "isic.py"), "with", "_epochs=18", "_batch_size=32",
        "_lr_init=0.002", "_early_stop=6", "_sched_patience=2", "_img_size=64", "_device=cpu",
        "_num_workers=0", "seed=0", f"_base_path={data}", f"_save_folder={out / 'teacher'}",
        "_pretrained=False")
    assert steps[5].cmd[3:] == (
        '_kd_method="ssd_kd"', "_lambd_drkd=1", "_lambd_crkd=1000", "_epochs=8", "_batch_size=16",
        "_epochs_tune=3", "_img_size=64", "_device=cpu", "_num_workers=0", "seed=0",
        f"_base_path={data}", f"_save_folder={out / 'student_ssd_kd'}", "_pretrained=False",
        f"_teacher_ckpt={out / 'teacher' / 'best-checkpoint' / 'best-checkpoint.pth'}")
    assert steps[0].cmd[steps[0].cmd.index("--num-images") + 1] == "1000"


def test_seeds_option_and_mode_defaults(tmp_path):
    _, steps = plan_of("--seeds", "2", tmp_path=tmp_path)
    assert len(steps) == 2 + 4 * 2
    assert [s.save_folder.name for s in steps[2:] if "teacher" in s.title] == ["teacher", "teacher_seed1"]
    assert main_job.parse_args(["--fast", "--seeds", "1"]).seeds == 1
    fast, full = main_job.parse_args(["--fast"]), main_job.parse_args([])
    assert (fast.out, fast.data) == (ROOT / "results" / "main_fast", ROOT / "data" / "synthetic_fast")
    assert (full.out, full.data) == (ROOT / "results" / "main", ROOT / "data" / "synthetic")


@pytest.mark.parametrize("value", ["0", "-2"])
def test_seeds_below_one_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main_job.parse_args(["--seeds", value])
    assert exc.value.code == 2
    assert f"--seeds must be at least 1, got {value}" in capsys.readouterr().err


def test_seeds_not_a_number_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main_job.parse_args(["--fast", "--seeds", "three"])
    assert exc.value.code == 2
    assert "invalid int value: 'three'" in capsys.readouterr().err


def test_expected_times_are_the_measured_step_times():
    fast = main_job.parse_args(["--fast"])
    steps = main_job.plan(fast)
    assert [s.expected_s for s in steps[2:6]] == [main_job.FAST.expected_s[label] for label in LABELS]
    assert steps[0].expected_s + steps[1].expected_s == main_job.FAST.expected_s["data"]
    total = sum(s.expected_s for s in steps) + main_job.compare_expected_s(fast)
    assert total < 6 * 60  # "a few minutes" for all three seeds
    full = sum(s.expected_s for s in main_job.plan(main_job.parse_args([])))
    assert full > 3 * total  # the full job is the long one
    assert main_job.minutes(42) == "42 s"
    assert main_job.minutes(150) == "2.5 min"


def test_load_note_names_the_reference_and_this_cpu(monkeypatch):
    monkeypatch.setattr(main_job, "cpu_name", lambda: "Test CPU 9000")
    monkeypatch.setattr(main_job.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(main_job.os, "getloadavg", lambda: (3.25, 0.0, 0.0))
    note = main_job.load_note(150)
    assert note.startswith(f"expected 2.5 min in all (measured on {main_job.REFERENCE_MACHINE}); ")
    assert "this machine: 2 x Test CPU 9000, load average 3.2 " in note


def test_timed_prints_expected_then_elapsed(capsys, monkeypatch):
    clock = iter([100.0, 163.0])
    monkeypatch.setattr(main_job.time, "perf_counter", lambda: next(clock))
    with main_job.timed("3/15 teacher", 36.0):
        print("training")
    assert capsys.readouterr().out.splitlines() == [
        "", "=== 3/15 teacher (expected 36 s) ===", "training",
        "--- 3/15 teacher: 63 s (expected 36 s)"]


def test_execute_skips_done_steps_and_resumes_interrupted_ones(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(main_job, "run", lambda cmd, fork=False: ran.append(cmd))
    done = tmp_path / "GroundTruth.csv"
    done.write_text("x")
    main_job.execute(main_job.Step("synth", ("synth",), 1.0, done_file=done))
    save = tmp_path / "teacher_seed1"
    write_fake_run(save, 1, 0.8)
    main_job.execute(main_job.Step("teacher", ("train",), 1.0, save_folder=save))
    interrupted = tmp_path / "student_none_seed1"
    (interrupted / "last-checkpoint").mkdir(parents=True)
    (interrupted / "last-checkpoint" / "last-checkpoint.pth").write_bytes(b"")
    main_job.execute(main_job.Step("student", ("train",), 1.0, save_folder=interrupted))
    assert ran == [("train", "_resume=True")]
    assert f"already COMPLETED in {save}: skipped" in capsys.readouterr().out


def fake_job(out: Path, seeds: int) -> dict[int, dict[str, Path]]:
    """Finished fake runs of ``seeds`` seeds in the main job's folders."""
    folders = {s: {label: main_job.save_folder(out, label, s) for label in LABELS} for s in range(seeds)}
    for seed, steps in folders.items():
        for label, save in steps.items():
            write_fake_run(save, seed, FAKE_BACC[label][seed])
    return folders


def test_mean_and_sd_per_method_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "model_footprint", fake_footprint)
    from raug.report.runs import load_runs

    folders = fake_job(tmp_path, 3)
    per_seed = per_seed_frame(load_runs([tmp_path]), folders)
    assert len(per_seed) == 12
    assert list(per_seed["seed"]) == [0] * 4 + [1] * 4 + [2] * 4
    table = summarize_methods(per_seed).table
    assert list(table["method"]) == LABELS  # display order, not alphabetical
    teacher, dkd = table.iloc[0], table.iloc[2]
    assert teacher["n"] == 3
    assert teacher["test balanced accuracy.mean"] == pytest.approx(0.8)
    assert teacher["test balanced accuracy.sd"] == pytest.approx(0.1)
    assert teacher["test accuracy.mean"] == pytest.approx(0.9)
    assert dkd["test balanced accuracy.mean"] == pytest.approx(0.55)
    assert dkd["test balanced accuracy.sd"] == pytest.approx(0.05)
    assert table.iloc[1]["test balanced accuracy.sd"] == pytest.approx(0.0)
    assert teacher["parameters (M).mean"] == pytest.approx(23.52)


def test_compare_writes_mean_sd_markdown_csv_and_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "model_footprint", fake_footprint)
    fake_job(tmp_path, 3)  # seed 2 is left from an earlier, longer job: --seeds 2 ignores it
    args = main_job.parse_args(["--seeds", "2", "--out", str(tmp_path), "--data", str(tmp_path / "d")])
    main_job.compare(args)
    markdown = (tmp_path / "comparison.md").read_text()
    assert ("| teacher ResNet-50 | 2 | 0.850 ± 0.071 | 0.750 ± 0.071 | 0.900 ± 0.000 | 23.520 ± 0.000 "
            "| 94.310 ± 0.000 | 50.000 ± 0.000 |") in markdown
    assert "| D-KD student | 2 | 0.650 ± 0.071 | 0.550 ± 0.071 |" in markdown
    assert "checkpoint: best on the validation fold by _best_metric = loss" in markdown
    assert "WARNING" not in markdown  # every run records the same split
    csv = pd.read_csv(tmp_path / "comparison.csv").set_index("method")
    assert csv.loc["SSD-KD student", "test balanced accuracy.mean"] == pytest.approx(0.61)
    assert csv.loc["SSD-KD student", "test balanced accuracy.sd"] == pytest.approx(math.sqrt(0.0002))
    assert len(pd.read_csv(tmp_path / "comparison_seeds.csv")) == 8
    assert (tmp_path / "comparison.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "| student alone | 2 | 0.500 ± 0.000 | 0.400 ± 0.000 |" in capsys.readouterr().out


def test_one_seed_has_no_sd_and_a_missing_run_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "model_footprint", fake_footprint)
    from raug.report.runs import load_runs

    folders = fake_job(tmp_path, 1)
    summary = summarize_methods(per_seed_frame(load_runs([tmp_path]), folders))
    assert math.isnan(summary.table.iloc[0]["test macro AUC.sd"])
    paths = write_seed_comparison(per_seed_frame(load_runs([tmp_path]), folders), summary, tmp_path / "cmp")
    assert "| teacher ResNet-50 | 1 | 0.800 ± – |" in paths["markdown"].read_text()
    missing = {0: {**folders[0], "SSD-KD student": tmp_path / "nothing"}}
    with pytest.raises(ValueError, match="no COMPLETED run for 'SSD-KD student'"):
        per_seed_frame(load_runs([tmp_path]), missing)


class _Finished:
    """A started step that has already ended with ``code``."""

    def __init__(self, code=0):
        self.code = code

    def wait(self):
        return self.code


def test_python_scripts_run_in_forks_other_commands_as_subprocesses(monkeypatch):
    started = []
    monkeypatch.setattr(main_job.forkrun, "start", lambda cmd, cwd: started.append(("fork", cmd[1])) or _Finished())
    monkeypatch.setattr(main_job.subprocess, "Popen", lambda cmd, cwd: started.append(("new", cmd[1])) or _Finished())
    main_job.run((sys.executable, "experiment/isic/isic.py", "with", "seed=0"), fork=True)
    main_job.run(("bash", "run_preprocess.sh"), fork=True)
    main_job.run((sys.executable, "experiment/isic/isic.py"), fork=False)
    assert started == [("fork", "experiment/isic/isic.py"), ("new", "run_preprocess.sh"),
                       ("new", "experiment/isic/isic.py")]
    monkeypatch.setattr(main_job.forkrun, "start", lambda cmd, cwd: _Finished(3))
    with pytest.raises(SystemExit, match=r"step failed \(exit 3\)"):
        main_job.run((sys.executable, "x.py"), fork=True)


@pytest.mark.parametrize("flag", [[], ["--subprocess"]])
def test_the_job_preloads_and_forks_unless_told_otherwise(tmp_path, monkeypatch, flag):
    calls = []
    monkeypatch.setattr(main_job.forkrun, "can_fork", lambda: True)
    monkeypatch.setattr(main_job.forkrun, "preload", lambda: calls.append("preload"))
    monkeypatch.setattr(main_job, "plan", lambda args: [main_job.Step("one", ("x",), 1.0)])
    monkeypatch.setattr(main_job, "execute", lambda step, fork: calls.append(("execute", fork)))
    monkeypatch.setattr(main_job, "compare", lambda args: calls.append("compare"))
    assert main_job.run_job([*flag, "--out", str(tmp_path), "--data", str(tmp_path)]) == 0
    expected = ["preload", ("execute", True)] if not flag else [("execute", False)]
    assert calls == [*expected, "compare"]
