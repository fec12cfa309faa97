"""The benchmark harness on trivial functions: alternation, ratios, JSON schema, CLI.

No timing assertion anywhere: the speed targets are measured by ``benchmarks/run.py``.
Run from the repository root (``python -m pytest``, as ``tools/test.sh`` does), which
puts the ``benchmarks`` folder on the import path.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from benchmarks import bench_steps, common, run
from benchmarks.baselines.seed_dkd_step import register_feature_hooks, seed_features
from raug.isic2019.schema import N_FOLDS, REAL_CLASS_COUNTS
from raug.isic2019.splits import assign_folds, split_test


class FakeClock:
    """A clock that advances only when a benchmarked function 'works' for some seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def fn():
            self.now += seconds
            return seconds

        return fn


def test_alternate_order_warmup_then_ours_baseline_pairs():
    calls = []
    timings = common.alternate(
        lambda: calls.append("ours"), lambda: calls.append("baseline"), repeats=3, warmup=2
    )
    assert calls == ["ours", "baseline"] * 5
    assert timings.order == (
        [("warmup", "ours"), ("warmup", "baseline")] * 2 + [("timed", "ours"), ("timed", "baseline")] * 3
    )
    assert len(timings.ours) == len(timings.baseline) == 3


def test_alternate_times_each_run_and_syncs_before_the_clock_stops():
    clock = FakeClock()
    durations = itertools.cycle([1.0, 3.0, 2.0])
    synced = []

    def ours():
        clock.now += next(durations)

    def sync():
        synced.append(clock.now)
        clock.now += 0.5  # a sync that itself takes time is counted in the run

    timings = common.alternate(ours, clock.work(10.0), repeats=3, warmup=1, sync=sync, clock=clock)
    # warm-up consumed the first duration (1.0); timed ours: 3.0, 2.0, 1.0 (+0.5 sync each)
    assert timings.ours == [3.5, 2.5, 1.5]
    assert timings.baseline == [10.5] * 3
    assert len(synced) == 8
    assert timings.values == {"ours": None, "baseline": 10.0}


def test_alternate_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats"):
        common.alternate(lambda: None, lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        common.alternate(lambda: None, lambda: None, repeats=1, warmup=-1)


def test_make_result_ratio_is_baseline_over_ours_of_medians():
    timings = common.Timings(ours=[2.0, 1.0, 9.0], baseline=[6.0, 5.0, 4.0])
    entry = common.make_result(timings, "s/step", {"batch": 32}, target=2.0)
    assert entry["ours"] == 2.0
    assert entry["baseline"] == 5.0
    assert entry["ratio"] == pytest.approx(2.5)
    assert entry["met"] is True
    assert entry["ours_runs"] == [2.0, 1.0, 9.0]
    assert common.make_result(timings, "s/step", "x", target=3.0)["met"] is False


def test_make_result_scale_and_extra():
    timings = common.Timings(ours=[4.0], baseline=[12.0])
    entry = common.make_result(timings, "s/image", "64 images", 3.0, scale=1 / 4, extra={"n": 4})
    assert (entry["ours"], entry["baseline"], entry["ratio"]) == (1.0, 3.0, 3.0)
    assert entry["met"] is True
    assert entry["n"] == 4
    with pytest.raises(ValueError, match="clash"):
        common.make_result(timings, "s/image", "x", 3.0, extra={"ratio": 1.0})


def test_speed_ratio_needs_positive_time():
    assert common.speed_ratio(3.0, 1.5) == 2.0
    with pytest.raises(ValueError, match="positive"):
        common.speed_ratio(1.0, 0.0)


def test_json_round_trip_keeps_schema(tmp_path):
    timings = common.Timings(ours=[1.0, 1.2], baseline=[3.0, 3.3])
    results = {
        "a": common.make_result(timings, "s/step", {"px": 128}, 1.5),
        "b": common.make_result(timings, "s/image", "loader", 10.0),
    }
    path = common.write_json(tmp_path / "out" / "bench.json", results)
    loaded = json.loads(path.read_text())
    assert loaded == results
    for name, entry in loaded.items():
        common.check_result(name, entry)
        assert set(common.RESULT_SCHEMA) <= set(entry)
    assert loaded["a"]["ratio"] == pytest.approx(3.15 / 1.1)
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temp file left


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ratio": 7.0}, "ratio=7.0 != baseline/ours"),
        ({"met": False}, "met=False disagrees"),
        ({"unit": 3}, "unit=3 is not"),
        ({"ours": True}, "ours=True is not"),
    ],
)
def test_check_result_names_the_problem(change, message):
    entry = common.make_result(common.Timings(ours=[1.0], baseline=[2.0]), "s/step", "x", 1.5)
    entry.update(change)
    with pytest.raises(ValueError, match=message):
        common.check_result("dkd_step", entry)


def test_check_result_names_a_missing_key():
    entry = common.make_result(common.Timings(ours=[1.0], baseline=[2.0]), "s/step", "x", 1.5)
    common.check_result("dkd_step", entry)
    del entry["unit"]
    with pytest.raises(ValueError, match=r"'dkd_step': missing key 'unit'"):
        common.check_result("dkd_step", entry)


def test_format_table_lists_every_item():
    timings = common.Timings(ours=[0.5], baseline=[2.0])
    table = common.format_table({
        "dkd_step": common.make_result(timings, "s/step", {"batch": 32, "px": 128}, 1.5),
        "loader": common.make_result(timings, "s/image", "64 images", 10.0),
    })
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| item |")
    assert lines[2] == (
        "| dkd_step | batch=32, px=128 | 500.0 ms | 2.00 s | s/step | 4.00x | >= 1.5x | yes |"
    )
    assert "| 4.00x | >= 10x | NO |" in lines[3]


def test_cpu_model_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU @ 3.00GHz\nflags\t: fpu\n")
    assert common.cpu_model(info) == "Test CPU @ 3.00GHz"


def test_cpu_model_falls_back_to_platform_processor_then_unknown(tmp_path, monkeypatch):
    no_name = tmp_path / "cpuinfo"
    no_name.write_text("processor\t: 0\nflags\t: fpu\n")  # e.g. some ARM kernels
    monkeypatch.setattr(common.platform, "processor", lambda: "Fallback-Arch")
    assert common.cpu_model(tmp_path / "missing") == "Fallback-Arch"
    assert common.cpu_model(no_name) == "Fallback-Arch"
    monkeypatch.setattr(common.platform, "processor", lambda: "")
    assert common.cpu_model(tmp_path / "missing") == "unknown"
    assert common.cpu_model(no_name) == "unknown"


def _proc_loadavg() -> list[float]:
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def test_machine_info_reports_what_the_system_says():
    import datetime
    import os
    from pathlib import Path

    import torchvision

    has_proc = Path("/proc/loadavg").exists()
    day_before = datetime.date.today()
    load_before = _proc_loadavg() if has_proc else None
    info = common.machine_info("cpu")
    load_after = _proc_loadavg() if has_proc else None
    day_after = datetime.date.today()

    assert datetime.date.fromisoformat(info["date"]) in (day_before, day_after)
    assert info["cpu"] == common.cpu_model()
    assert info["cpu"]
    if Path("/proc/cpuinfo").exists() and "model name" in Path("/proc/cpuinfo").read_text():
        assert info["cpu"] != "unknown"
    assert info["logical_cpus"] == os.cpu_count()
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["torchvision"] == torchvision.__version__
    assert info["device"] == "cpu"
    assert "gpu" not in info
    if has_proc:
        # The kernel refreshes the averages every 5 s: between our two reads each one
        # either held still or moved once, so it lies within them (up to the rounding).
        assert len(info["loadavg"]) == 3
        for got, lo, hi in zip(info["loadavg"], load_before, load_after):
            assert min(lo, hi) - 0.011 <= got <= max(lo, hi) + 0.011
    json.dumps(info)  # goes into the report as is


def test_peak_memory_counts_a_large_allocation():
    result = common.peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum(), "cpu")
    assert result["method"] in ("VmHWM", "ru_maxrss")
    if result["method"] == "VmHWM":
        assert result["peak_bytes"] >= 60 * 2**20  # the 64 MiB tensor was resident


def test_epoch_projection_arithmetic():
    proj = bench_steps.epoch_projection(s_per_step=3.2, images_per_step=32)
    assert proj["s_per_image"] == pytest.approx(0.1)
    assert proj["epoch_s"] == pytest.approx(1823.8)
    assert proj["epoch_h"] == pytest.approx(1823.8 / 3600)


def test_check_close_accepts_equal_and_names_a_mismatch():
    assert bench_steps.check_close("x", 1.0, 1.0000001, 1e-3)["rel_diff"] < 1e-6
    with pytest.raises(bench_steps.StepCheckError, match=r"dkd_step: toolkit loss .* differ"):
        bench_steps.check_close("dkd_step", 1.0, 1.1, 1e-3)
    with pytest.raises(bench_steps.StepCheckError):
        bench_steps.check_close("nan", float("nan"), 1.0, 1e-3)


def test_cli_defaults_and_quick_plan_is_a_subset_of_the_full_plan():
    args = run.build_parser().parse_args(["--quick", "--only", "loader", "dkd_step", "--json", "o.json"])
    assert args.quick
    assert args.only == ["loader", "dkd_step"]
    assert (args.device, args.channels_last, args.amp) == ("cpu", True, "off")
    assert run.build_parser().parse_args([]).only == list(run.DEFAULT_ITEMS)
    assert "teacher_step" in run.ITEMS
    assert "teacher_step" not in run.DEFAULT_ITEMS
    matrix = run.build_parser().parse_args(["--tiny", "--px", "224", "--amp", "auto",
                                            "--loader-workers", "1", "8"])
    assert (matrix.tiny, matrix.px, matrix.amp, matrix.loader_workers) == (True, 224, "auto", [1, 8])
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["--quick", "--tiny"])
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["--only", "nonsense"])
    for field in ("dkd_sizes", "ssd_sizes", "growth_epochs", "scaling_batches"):
        assert set(getattr(run.QUICK, field)) <= set(getattr(run.FULL, field))
    assert run.QUICK.repeats <= run.FULL.repeats
    assert run.QUICK.ssd_images == run.FULL.ssd_images  # same semantics, fewer sizes


def test_epoch_projection_counts_the_training_images_of_a_full_sized_split():
    """One projected epoch = the training folds the toolkit's own split leaves of 25,331 images."""
    labels = np.repeat(np.arange(len(REAL_CLASS_COUNTS)), list(REAL_CLASS_COUNTS.values()))
    assert len(labels) == 25_331
    train_idx, _ = split_test(len(labels))
    folds = assign_folds(labels[train_idx])
    proj = bench_steps.epoch_projection(s_per_step=2.0, images_per_step=1)
    for val_fold in range(1, N_FOLDS + 1):
        epoch_images = int((folds != val_fold).sum())
        assert abs(proj["images_per_epoch"] - epoch_images) <= 1, val_fold
        assert proj["epoch_s"] == pytest.approx(2.0 * epoch_images, abs=2.0)
        # the seed-style step's hook growth is sampled once per epoch of batches of 32
        assert math.ceil(epoch_images / 32) == run.STEPS_PER_EPOCH_32


class _FakePair:
    def __init__(self):
        self.check = {"loss_ours": 1.0, "loss_baseline": 1.0, "rel_diff": 0.0}
        self.images = 32


@pytest.mark.parametrize("side", ["just_met", "just_missed"])
def test_each_item_is_judged_against_its_target(monkeypatch, tmp_path, side):
    """``met`` of an entry is ``ratio >= run.TARGETS[item]``, on either side of the line."""
    from benchmarks import bench_channel_relation

    factor = 1.0 + 1e-6 if side == "just_met" else 1.0 - 1e-6

    def timings(item):
        baseline = run.TARGETS[item] * factor  # ours takes 1 s: the ratio is the baseline's
        return common.Timings(ours=[1.0], baseline=[baseline],
                              values={common.OURS: 1.0, common.BASELINE: 1.0})

    monkeypatch.setattr(bench_steps, "prepare_dkd", lambda *a, **k: _FakePair())
    monkeypatch.setattr(bench_steps, "prepare_ssdkd", lambda *a, **k: _FakePair())
    monkeypatch.setattr(bench_steps, "prepare_teacher", lambda *a, **k: _FakePair())
    monkeypatch.setattr(bench_steps, "time_pair",
                        lambda pair, r, w, d, desc: timings(desc.split()[0]))
    monkeypatch.setattr(bench_channel_relation, "_time",
                        lambda *a: timings("channel_relation"))
    monkeypatch.setattr(bench_channel_relation, "peak_memory",
                        lambda *a: {"peak_bytes": 2**20, "method": "stub"})
    opts = run.Options(device="cpu", amp=None, channels_last=True, compile=False, extras=False)
    items = ["channel_relation", "dkd_step", "ssd_kd_step", "teacher_step"]
    results = run.run_all(items, run.QUICK, opts, tmp_path, report=lambda line: None)
    assert set(results) == set(items)
    for item in items:
        entry = results[item]
        assert entry["target"] == run.TARGETS[item], item
        assert entry["ratio"] == pytest.approx(run.TARGETS[item] * factor), item
        assert entry["met"] is (side == "just_met"), item
        assert f">= {run.TARGETS[item]:g}x" in common.format_table({item: entry})
        assert entry["counts"] is (item != "teacher_step")  # the teacher's line informs only
    assert run.exit_code(results) == (0 if side == "just_met" else 1)
    dry = run.run_all(items, run.QUICK, run.Options("cpu", None, True, False, False, judge=False),
                      tmp_path, report=lambda line: None)
    assert not any(entry["counts"] for entry in dry.values())
    assert run.exit_code(dry) == 0


@pytest.mark.numeric
def test_seed_hooks_pile_up_one_set_per_call():
    model = bench_steps.models.create_model("mobilenet", 8).eval()
    x = torch.zeros(1, 3, 32, 32)
    handles = []
    with torch.no_grad():
        first = seed_features(model, x, handles)
        second = seed_features(model, x, handles)
    assert set(first) == {"feats_7x7", "avg_pool", "logits"}
    assert len(handles) == 6  # three new hooks per call, none removed
    assert len(model.classifier._forward_hooks) == 4
    torch.testing.assert_close(first["logits"], second["logits"])
    torch.testing.assert_close(first["logits"], model(x))
    torch.testing.assert_close(first["avg_pool"], model.forward_kd(x)["avg_pool"])
    register_feature_hooks(model, {})
    assert len(model.classifier._forward_hooks) == 6


def test_format_details_tables_hold_the_raw_figures():
    entry = common.make_result(common.Timings(ours=[1.0, 1.5], baseline=[3.0, 2.5]), "s/step", "x", 1.5,
                               extra={"check": {"rel_diff": 2e-6}, "machine": {"loadavg": [0.5, 0.4, 0.3]}})
    entry["hook_growth"] = [{"k": 571, "epochs": 1.0, "hooks_per_network": 1713,
                             "baseline_s": 2.5, "ours_s": 1.0, "ratio": 2.5}]
    entry["scaling"] = [{"batch": 64, "px": 224, "s_per_step": 6.4, "s_per_image": 0.1, "peak_mib": 2048.4}]
    proj = bench_steps.epoch_projection(3.2, 32)
    entry["epoch_projection"] = {"px": 224, "teacher_ce": proj, "d_kd": {"ours": proj, "baseline": proj}}
    text = run.format_details({"dkd_step": entry})
    assert "| dkd_step | 1, 1.5 | 3, 2.5 | s/step | [0.5, 0.4, 0.3] | 2.0e-06 |" in text
    assert "| 571 | 1 | 1713 | 2.50 | 1.00 | 2.50x |" in text
    assert "| 64 | 224 | 6.40 | 0.100 | 2048 |" in text
    assert "| teacher CE | 0.100 | 0.51 | - | - |" in text
    assert "| d_kd | 0.100 | 0.51 | 0.100 | 0.51 |" in text


def test_at_px_puts_every_step_at_one_size():
    plan = run.at_px(run.FULL, 224)
    assert (plan.dkd_sizes, plan.ssd_sizes, plan.scaling_px, plan.projection_px, plan.loader_px) == (
        (224,), (224,), 224, 224, 224)
    assert plan.repeats == run.FULL.repeats
    assert run.at_px(run.QUICK, None) == run.QUICK
    assert run.TINY.batch < run.QUICK.batch == 32


def test_amp_name_resolves_auto_like_the_engine(monkeypatch):
    assert run.amp_name("off", "cpu") is None
    assert run.amp_name("auto", "cpu") is None  # the engine's auto: off on the CPU
    assert run.amp_name("bf16", "cpu") == "bf16"
    monkeypatch.setattr(run, "amp_dtype", lambda amp, device: {"auto": torch.float16}.get(amp))
    assert run.amp_name("auto", "cuda") == "fp16"  # e.g. a V100


def _step(item, ours_s, baseline_s, amp="off", channels_last=False, compile=False, px=224):
    kind, images = ("images", 8) if item == "ssd_kd_step" else ("batch", 32)
    setup = {kind: images, "px": px, "amp": amp, "channels_last": channels_last, "compile": compile}
    return common.make_result(common.Timings(ours=[ours_s], baseline=[baseline_s]), "s/step",
                              setup, run.TARGETS[item])


def test_matrix_summary_images_per_second_per_variant():
    fp32 = {"teacher_step": _step("teacher_step", 0.1, 0.1), "dkd_step": _step("dkd_step", 0.2, 0.2),
            "ssd_kd_step": _step("ssd_kd_step", 0.4, 0.8)}
    amp_cl = {"teacher_step": _step("teacher_step", 0.05, 0.1, "bf16", True),
              "dkd_step": _step("dkd_step", 0.05, 0.3, "bf16", True),
              "ssd_kd_step": _step("ssd_kd_step", 0.1, 0.6, "bf16", True)}
    compiled = {"dkd_step": _step("dkd_step", 0.04, 0.2, "bf16", True, True)}
    loader = _step("dkd_step", 0.001, 0.003)
    loader["per_worker"] = [{"workers": 1, "images_per_s": 300.0, "images_per_s_per_worker": 300.0},
                            {"workers": 4, "images_per_s": 1000.0, "images_per_s_per_worker": 250.0}]
    lines = run.matrix_summary([fp32, amp_cl, compiled, {"loader": loader}]).splitlines()
    assert lines[2] == "| fp32 | 224 | 320.0 | 160.0 | 20.0 | 1.00x |"
    assert lines[3] == "| AMP bf16 + channels-last | 224 | 640.0 | 640.0 | 80.0 | 6.00x |"
    assert lines[4] == "| AMP bf16 + channels-last + compile | 224 | - | 800.0 | - | 5.00x |"
    # the seed-style float32 step of every run, median (teacher 320, 320; D-KD 160, 106.7, 160;
    # SSD-KD 10, 13.3)
    assert lines[5] == "| seed-style fp32 NCHW (median of the runs) | - | 320.0 | 160.0 | 11.7 | 1.00x |"
    assert "| 4 | 1000.0 | 250.0 |" in lines
    assert lines[-1] == ("loader with 4 workers: 1000.0 images/s, keeps up with the fastest "
                         "D-KD step (800.0 images/s)")


def test_gpu_sh_without_cuda_exits_3_and_says_so(tmp_path):
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    log = tmp_path / "gpu.log"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", str(log)], capture_output=True,
                          text=True, env=env, cwd=run.Path(__file__).resolve().parents[1])
    assert proc.returncode == 3
    assert "no CUDA device visible" in log.read_text()


@pytest.mark.slow
def test_gpu_sh_dry_run_on_the_cpu_covers_the_matrix(tmp_path):
    """``BENCH_DEVICE=cpu``: gpu.sh's commands at run.py --tiny, every JSON and the summary."""
    import os
    import subprocess
    import sys

    log = tmp_path / "gpu.log"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_DEVICE": "cpu"}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", str(log)], capture_output=True,
                          text=True, env=env, cwd=run.Path(__file__).resolve().parents[1])
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    runs = {p.name.split("-", 3)[-1]: json.loads(p.read_text()) for p in tmp_path.glob("gpu-*.json")}
    assert sorted(runs) == ["1-fp32.json", "2-amp.json", "3-amp-cl.json", "4-amp-cl-compile.json",
                            "5-loader.json"]
    # on the CPU --amp auto is off: the variants differ in layout and compile here
    layouts = {"1-fp32.json": (False, False), "2-amp.json": (False, False),
               "3-amp-cl.json": (True, False), "4-amp-cl-compile.json": (True, True)}
    for name, (channels_last, compiled) in layouts.items():
        assert set(runs[name]) == {"teacher_step", "dkd_step", "ssd_kd_step"}, name
        for entry in runs[name].values():
            setup = entry["setup"]
            assert (setup["px"], setup["amp"], setup["channels_last"], setup["compile"]) == (
                32, "off", channels_last, compiled), name
            assert entry["counts"] is False
    workers = [w["workers"] for w in runs["5-loader.json"]["loader"]["per_worker"]]
    assert workers == [1, 2, 4, 8]
    assert "| seed-style fp32 NCHW (median of the runs) |" in text
    assert "status 0" in text
