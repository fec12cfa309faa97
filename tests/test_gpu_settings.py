"""CUDA speed settings (``_cudnn_benchmark``, ``_tf32``) and ``_num_workers="auto"``.

No CUDA needed: :func:`apply_cuda_speed_settings` only sets process-wide flags, so it is
called with ``torch.device("cuda")`` and the flags are inspected (and restored after).
"""

import os

import pytest
import torch

from raug.data import loaders
from raug.data.loaders import resolve_num_workers
from raug.run.config import QUICK_CONFIG, RESUMABLE_CHANGES, SHARED_CONFIG, shared_checks
from raug.train.engine import FitSettings, apply_cuda_speed_settings


@pytest.fixture
def restore_flags():
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
             torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    torch.backends.cudnn.allow_tf32 = saved[2]


def _flags():
    return (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
            torch.backends.cudnn.allow_tf32)


def test_cuda_gets_cudnn_benchmark_and_tf32_by_default(restore_flags):
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    apply_cuda_speed_settings(torch.device("cuda"), FitSettings(epochs=1))
    assert _flags() == (True, "high", True)
    apply_cuda_speed_settings(torch.device("cuda", 1), FitSettings(epochs=1))
    assert _flags() == (True, "high", True)


def test_cuda_settings_switch_off(restore_flags):
    apply_cuda_speed_settings(torch.device("cuda"), FitSettings(epochs=1))
    off = FitSettings(epochs=1, cudnn_benchmark=False, tf32=False)
    apply_cuda_speed_settings(torch.device("cuda"), off)
    assert _flags() == (False, "highest", False)


@pytest.mark.parametrize("start", [(False, "highest", True), (True, "medium", False)])
def test_cpu_changes_nothing(restore_flags, start):
    torch.backends.cudnn.benchmark, precision, torch.backends.cudnn.allow_tf32 = start
    torch.set_float32_matmul_precision(precision)
    for settings in (FitSettings(epochs=1), FitSettings(epochs=1, cudnn_benchmark=False, tf32=False)):
        apply_cuda_speed_settings(torch.device("cpu"), settings)
        assert _flags() == start


def test_speed_keys_config_checks_and_resume():
    assert SHARED_CONFIG["_cudnn_benchmark"] is True
    assert SHARED_CONFIG["_tf32"] is True
    assert {"_cudnn_benchmark", "_tf32", "_num_workers"} <= RESUMABLE_CHANGES
    assert not any(k in p for p in shared_checks(SHARED_CONFIG)
                   for k in ("_cudnn_benchmark", "_tf32", "_num_workers"))
    for key in ("_cudnn_benchmark", "_tf32"):
        problems = shared_checks({**SHARED_CONFIG, key: 1})
        assert any(p.startswith(f"{key}=1 is invalid: expected True or False") for p in problems)
    settings = FitSettings.from_config({**SHARED_CONFIG, "_cudnn_benchmark": False, "_tf32": False})
    assert (settings.cudnn_benchmark, settings.tf32) == (False, False)
    settings = FitSettings.from_config(SHARED_CONFIG)
    assert (settings.cudnn_benchmark, settings.tf32) == (True, True)
    old = {k: v for k, v in SHARED_CONFIG.items() if k not in ("_cudnn_benchmark", "_tf32")}
    settings = FitSettings.from_config(old)  # a checkpoint's config from before the keys
    assert (settings.cudnn_benchmark, settings.tf32) == (True, True)


def test_num_workers_config_accepts_auto_and_integers_only():
    assert SHARED_CONFIG["_num_workers"] is None  # auto (None: Sacred allows `_num_workers=4`)
    assert QUICK_CONFIG["_num_workers"] == 0
    assert resolve_num_workers(None) == resolve_num_workers("auto")
    for ok in (None, "auto", 0, 3):
        assert not any("_num_workers" in p for p in shared_checks({**SHARED_CONFIG, "_num_workers": ok}))
    for bad in (-1, "many", 2.0, True):
        problems = shared_checks({**SHARED_CONFIG, "_num_workers": bad})
        assert any(p.startswith(f"_num_workers={bad!r} is invalid: expected 'auto' or an integer")
                   for p in problems), bad


@pytest.fixture
def cpus(monkeypatch):
    """Set the CPUs the process may use (affinity mask) and the node's process count."""

    def set_(n, local=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))

    return set_


@pytest.mark.parametrize(("n", "local", "expected"), [
    (1, None, 0), (2, None, 2), (4, None, 4), (8, None, 8), (64, None, 8),
    (64, 8, 8), (32, 8, 4), (16, 4, 4), (8, 8, 1), (4, 8, 1), (2, 4, 1), (1, 8, 0),
])
def test_auto_workers_share_the_node(cpus, n, local, expected):
    cpus(n, local)
    assert resolve_num_workers("auto") == expected


def test_explicit_worker_counts_are_kept(cpus):
    cpus(64, 8)
    for n in (0, 1, 3, 12):
        assert resolve_num_workers(n) == n


def test_auto_workers_fall_back_to_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert loaders.available_cpus() == 12
    assert resolve_num_workers("auto") == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert loaders.available_cpus() == 1
    assert resolve_num_workers("auto") == 0


# benchmarks/run.py: only the targets of the device being measured decide the exit code.

class _FakePair:
    def __init__(self):
        self.check = {"loss_ours": 1.0, "loss_baseline": 1.0, "rel_diff": 0.0}


def _stubbed_run(monkeypatch, tmp_path, opts, ratio):
    """``run.run_all`` on D-KD / SSD-KD / channel relation with every ratio = ``ratio``."""
    from benchmarks import bench_steps, common, run

    def timings(*_):
        return common.Timings(ours=[1.0], baseline=[ratio],
                              values={common.OURS: 1.0, common.BASELINE: 1.0})

    monkeypatch.setattr(bench_steps, "prepare_dkd", lambda *a, **k: _FakePair())
    monkeypatch.setattr(bench_steps, "prepare_ssdkd", lambda *a, **k: _FakePair())
    monkeypatch.setattr(bench_steps, "time_pair", timings)
    # the channel-relation item resolves its device itself: stub the whole item
    monkeypatch.setattr(run, "run_channel_relation", lambda plan, o: {"channel_relation": common.make_result(
        timings(), "s/call", {"device": o.device}, run.CPU_TARGETS["channel_relation"])})
    monkeypatch.setattr(common, "machine_info", lambda device: {"loadavg": [0, 0, 0]})
    items = ["channel_relation", "dkd_step", "ssd_kd_step"]
    results = run.run_all(items, run.QUICK, opts, tmp_path, report=lambda line: None)
    for name, entry in results.items():
        common.check_result(name, entry)
    return run, results


def _opts(device, amp=None, channels_last=True):
    from benchmarks import run

    return run.Options(device=device, amp=amp, channels_last=channels_last, compile=False,
                       extras=False)


def test_cpu_run_fails_on_a_missed_cpu_target(monkeypatch, tmp_path):
    run, results = _stubbed_run(monkeypatch, tmp_path, _opts("cpu"), ratio=1.2)
    assert all(r["counts"] and not r["met"] for r in results.values())
    assert run.exit_code(results) == 1
    run, results = _stubbed_run(monkeypatch, tmp_path, _opts("cpu"), ratio=11.0)
    assert run.exit_code(results) == 0


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_gpu_run_ignores_cpu_targets(monkeypatch, tmp_path, amp):
    """CPU targets missed on CUDA (1.2x < 1.5x, 10x): a healthy GPU run exits 0."""
    run, results = _stubbed_run(monkeypatch, tmp_path, _opts("cuda", amp), ratio=2.6)
    assert not results["channel_relation"]["met"]
    assert not results["channel_relation"]["counts"]
    assert not results["ssd_kd_step"]["counts"]
    assert results["dkd_step"]["counts"] is (amp is not None)
    if amp is not None:
        assert results["dkd_step"]["target"] == run.GPU_TARGETS["dkd_step"] == 2.5
        assert results["dkd_step"]["met"]
    assert run.exit_code(results) == 0


def test_gpu_run_fails_on_a_missed_gpu_target(monkeypatch, tmp_path):
    run, results = _stubbed_run(monkeypatch, tmp_path, _opts("cuda:1", "fp16"), ratio=2.4)
    assert results["dkd_step"]["counts"]
    assert not results["dkd_step"]["met"]
    assert run.exit_code(results) == 1
    # without channels-last the 2.5x target (AMP + channels-last) does not apply
    run, results = _stubbed_run(monkeypatch, tmp_path, _opts("cuda", "fp16", False), ratio=2.4)
    assert not any(r["counts"] for r in results.values())
    assert run.exit_code(results) == 0
