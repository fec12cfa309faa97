"""GPU rules tested on the CPU by simulation (issue #16): torch.cuda's answers, the
device nodes and the GPU's compute capability are monkeypatched.

* a GPU this torch build has no kernels for is refused with one line (GPU, sm, fix);
* ``_device="auto"`` refuses where an NVIDIA GPU is present but CUDA unusable;
* ``_amp="auto"``: bf16 on sm_80+, fp16 on sm_70/75, off on the CPU; bf16 refused before sm_80;
* DDP is built without a per-forward buffer broadcast;
* resume restores min(saved, visible) CUDA RNG states;
* ``tools/env.sh`` installs the chosen ``TORCH_CUDA`` variant (fake venv python).
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from raug.run.config import RESUMABLE_CHANGES, SHARED_CONFIG, resume_mismatches, shared_checks
from raug.train import device as dev
from raug.train import distributed as dist_mod
from raug.train.device import DeviceError, amp_dtype, arch_supported, check_device, resolve_device
from raug.train.distributed import DistEnv, distributed_device

ROOT = Path(__file__).resolve().parents[1]
BASE = {**SHARED_CONFIG, "_save_folder": "/tmp/unused"}  # shared_checks reads no files
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
GPUS = {
    "V100": ("Tesla V100-SXM2-32GB", (7, 0)),
    "T4": ("Tesla T4", (7, 5)),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0)),
    "L4": ("NVIDIA L4", (8, 9)),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0)),
}


def fake_cuda(monkeypatch, gpus, arch_list=CU130_ARCHS):
    """torch.cuda as on a machine with ``gpus`` (list of GPUS keys) and a build for ``arch_list``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: GPUS[gpus[i]][1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: GPUS[gpus[i]][0])


def no_cuda(monkeypatch, evidence=None, cuda_version="13.0"):
    """torch.cuda unusable; ``evidence``: a /dev/nvidia node present (``None``: no NVIDIA GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(dev.glob, "glob", lambda pattern: [evidence] if evidence else [])
    monkeypatch.setattr(dev.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    ("capability", "archs", "ok"),
    [
        ((7, 0), CU130_ARCHS, False),  # V100 under the PyPI (CUDA 13) wheel: the point of the issue
        ((7, 0), CU126_ARCHS, True),
        ((7, 5), CU130_ARCHS, True),
        ((8, 9), CU130_ARCHS, True),  # L4 / RTX 40 run the sm_86 cubins (same major)
        ((10, 3), CU130_ARCHS, True),
        ((12, 0), CU126_ARCHS, False),  # Blackwell under an old build
        ((9, 0), ["sm_90a"], True),
        ((10, 0), ["sm_90a"], False),  # arch-specific cubins run on that GPU only
        ((10, 0), ["compute_90"], True),  # PTX is compiled for newer GPUs
        ((8, 0), [], True),  # nothing known: not refused
    ],
)
def test_arch_supported_follows_nvidia_compatibility(capability, archs, ok):
    assert arch_supported(capability, archs) is ok


def test_v100_under_cuda13_build_refused_with_one_line(monkeypatch):
    fake_cuda(monkeypatch, ["V100"])
    for spec in ("auto", "cuda", "cuda:0"):
        problem = check_device(spec)
        assert problem is not None
        assert "\n" not in problem
        assert "Tesla V100-SXM2-32GB" in problem
        assert "sm_70" in problem
        assert "TORCH_CUDA=cu126 bash tools/env.sh" in problem
    with pytest.raises(DeviceError, match=r"sm_70.*TORCH_CUDA=cu126"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # cpu always works


def test_new_gpu_under_old_build_names_newer_variant(monkeypatch):
    GPUS["B200"] = ("NVIDIA B200", (10, 0))
    try:
        fake_cuda(monkeypatch, ["B200"], CU126_ARCHS)
        assert "TORCH_CUDA=cu130" in check_device("cuda")
    finally:
        del GPUS["B200"]


@pytest.mark.parametrize("gpu", ["T4", "A100", "L4", "H100"])
def test_supported_gpus_pass(monkeypatch, gpu):
    fake_cuda(monkeypatch, [gpu])
    assert check_device("auto") is None
    assert resolve_device("auto") == torch.device("cuda")
    assert check_device("cuda:0") is None


def test_v100_with_cu126_build_passes(monkeypatch):
    fake_cuda(monkeypatch, ["V100", "V100"], CU126_ARCHS)
    assert check_device("auto") is None
    assert check_device("cuda:1") is None


def test_mixed_node_auto_checks_every_gpu(monkeypatch):
    fake_cuda(monkeypatch, ["A100", "V100"])
    assert "cuda:1" in check_device("auto")
    assert check_device("cuda:0") is None  # the one GPU named is fine


def test_config_check_reports_unsupported_gpu(monkeypatch):
    fake_cuda(monkeypatch, ["V100"])
    problems = shared_checks({**BASE, "_device": "auto"})
    assert any("sm_70" in p and "TORCH_CUDA=cu126" in p for p in problems)
    assert shared_checks({**BASE, "_device": "cpu"}) == []


# ----------------------------------------------------------------------------- auto without usable CUDA


def test_auto_refuses_when_nvidia_gpu_present_but_cuda_unusable(monkeypatch):
    no_cuda(monkeypatch, evidence="/dev/nvidia0")
    problem = check_device("auto")
    assert problem is not None
    assert "\n" not in problem
    assert "/dev/nvidia0" in problem
    assert "CUDA 13.0" in problem
    assert "_device=cpu" in problem
    with pytest.raises(DeviceError, match="NVIDIA GPU"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"/dev/nvidia0"):
        resolve_device("cuda")


def test_auto_refuses_with_nvidia_smi_and_cpu_only_build(monkeypatch):
    no_cuda(monkeypatch, cuda_version=None)
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert "CPU-only build" in check_device("auto")


def test_auto_is_cpu_without_nvidia_gpu_or_with_gpus_hidden(monkeypatch):
    no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    no_cuda(monkeypatch, evidence="/dev/nvidia0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose
    assert resolve_device("auto") == torch.device("cpu")


def test_distributed_device_refuses_and_checks_arch(monkeypatch):
    two = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    no_cuda(monkeypatch, evidence="/dev/nvidia1")
    with pytest.raises(DeviceError, match="NVIDIA GPU"):
        distributed_device("auto", two)
    assert distributed_device("cpu", two) == torch.device("cpu")
    fake_cuda(monkeypatch, ["A100", "V100"])
    with pytest.raises(DeviceError, match=r"cuda:1 Tesla V100.*sm_70"):
        distributed_device("auto", two)
    fake_cuda(monkeypatch, ["A100", "A100"])
    assert distributed_device("auto", two) == torch.device("cuda", 1)


# ----------------------------------------------------------------------------- AMP


def test_amp_auto_is_the_default_and_off_on_cpu():
    assert SHARED_CONFIG["_amp"] == "auto"
    assert "auto" in dev.AMP_CHOICES
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None  # CPU runs unchanged: auto == None
    assert amp_dtype("auto", cpu) == amp_dtype(None, cpu)


@pytest.mark.parametrize(
    ("gpu", "dtype"),
    [("V100", torch.float16), ("T4", torch.float16), ("A100", torch.bfloat16),
     ("L4", torch.bfloat16), ("H100", torch.bfloat16)],
)
def test_amp_auto_per_gpu(monkeypatch, gpu, dtype):
    fake_cuda(monkeypatch, [gpu], CU126_ARCHS)
    assert amp_dtype("auto", torch.device("cuda", 0)) is dtype
    assert amp_dtype("auto", torch.device("cuda")) is dtype
    assert amp_dtype("fp16", torch.device("cuda")) is torch.float16


def test_bf16_refused_before_sm80(monkeypatch):
    fake_cuda(monkeypatch, ["T4"])
    with pytest.raises(DeviceError, match=r'sm_75.*_amp="fp16"') as info:
        amp_dtype("bf16", torch.device("cuda", 0))
    assert "\n" not in str(info.value)
    assert "Tesla T4" in str(info.value)
    problems = shared_checks({**BASE, "_device": "cuda", "_amp": "bf16"})
    assert any('_amp="fp16"' in p for p in problems)
    assert shared_checks({**BASE, "_device": "cuda", "_amp": "auto"}) == []
    fake_cuda(monkeypatch, ["A100"])
    assert amp_dtype("bf16", torch.device("cuda", 0)) is torch.bfloat16


def test_config_message_lists_auto_and_old_none_resumes():
    problems = shared_checks({**BASE, "_device": "cpu", "_amp": "fp8"})
    assert any("'auto'" in p and "_amp='fp8'" in p for p in problems)
    assert shared_checks({**BASE, "_device": "cpu", "_amp": None}) == []
    # A checkpoint of a run started with _amp=None resumes under the new default.
    assert "_amp" in RESUMABLE_CHANGES
    assert resume_mismatches({**SHARED_CONFIG, "_amp": None}, dict(SHARED_CONFIG)) == []


# ----------------------------------------------------------------------------- DDP


def test_wrap_task_does_not_broadcast_buffers_each_forward(monkeypatch):
    seen = {}

    def fake_ddp(module, **kwargs):
        seen.update(kwargs)
        return module

    monkeypatch.setattr(dist_mod, "DistributedDataParallel", fake_ddp)
    dist_mod.wrap_task(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert seen.get("forward_sync_buffers") is False or seen.get("broadcast_buffers") is False
    assert seen["device_ids"] is None
    assert seen["find_unused_parameters"] is False


def test_ddp_accepts_the_buffer_argument():
    """The pinned torch's DDP takes forward_sync_buffers (wrap_task passes it)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    assert "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


# ----------------------------------------------------------------------------- CUDA RNG on resume


def _rng_state(n_cuda: int) -> dict:
    from raug.files.checkpoint import capture_rng_state

    state = capture_rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(n_cuda)]
    return state


@pytest.mark.parametrize(("saved", "visible"), [(4, 1), (1, 2), (2, 2)])
def test_restore_rng_state_restores_min_saved_visible(monkeypatch, caplog, saved, visible):
    from raug.files.checkpoint import restore_rng_state

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i="cuda": restored.__setitem__(i, s))

    def refuse(states):
        raise AssertionError("set_rng_state_all fails with fewer visible GPUs")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    state = _rng_state(saved)
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002
    with caplog.at_level(logging.WARNING, logger="raug.files.checkpoint"):
        restore_rng_state(state)
    assert sorted(restored) == list(range(min(saved, visible)))
    for index, value in restored.items():
        assert torch.equal(value, state["cuda"][index])
    warnings = [r for r in caplog.records if "CUDA RNG states" in r.getMessage()]
    assert len(warnings) == (1 if saved != visible else 0)
    random.setstate(py), np.random.set_state(npy)  # noqa: NPY002


# ----------------------------------------------------------------------------- tools/env.sh


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python logs its arguments (pip calls) instead of installing."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    python.chmod(0o755)
    (venv / "bin" / "activate").write_text("")
    return venv, log


def _env_sh(venv: Path, variant: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA"}
    env["SSDKD_VENV"] = str(venv)
    if variant is not None:
        env["TORCH_CUDA"] = variant
    return subprocess.run(["bash", str(ROOT / "tools" / "env.sh")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def _pins() -> tuple[str, str]:
    text = (ROOT / "requirements.txt").read_text()
    return (re.search(r"^torch==\S+", text, re.M).group(0),
            re.search(r"^torchvision==\S+", text, re.M).group(0))


def test_env_sh_installs_chosen_variant_and_reinstalls_on_change(tmp_path):
    venv, log = _fake_venv(tmp_path)
    torch_pin, vision_pin = _pins()

    def calls() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines

    # Unset: PyPI's build, as before (no index, no torch-only install).
    assert _env_sh(venv, None).returncode == 0
    first = calls()
    assert not any("--index-url" in c for c in first)
    assert any("-r" in c.split() for c in first)
    assert _env_sh(venv, None).returncode == 0
    assert calls() == []

    result = _env_sh(venv, "cu126")
    assert result.returncode == 0, result.stderr
    lines = calls()
    url = "--index-url https://download.pytorch.org/whl/cu126"
    variant_calls = [c for c in lines if url in c]
    assert variant_calls
    assert all(f"{torch_pin} {vision_pin}" in c for c in variant_calls)
    assert any("--force-reinstall" in c for c in variant_calls)
    assert (venv / ".ssdkd-torch-variant").read_text().strip() == "cu126"

    assert _env_sh(venv, None).returncode == 0
    assert calls() == []
    assert _env_sh(venv, "cu126").returncode == 0
    assert calls() == []
    assert _env_sh(venv, "cu130").returncode == 0
    assert any("whl/cu130" in c for c in calls())
    assert _env_sh(venv, "default").returncode == 0
    back = calls()
    assert not any("--index-url" in c for c in back)
    assert any("--force-reinstall" in c and torch_pin in c for c in back)
    assert not (venv / ".ssdkd-torch-variant").exists()


def test_env_sh_refuses_unknown_variant(tmp_path):
    venv, log = _fake_venv(tmp_path)
    result = _env_sh(venv, "cuda12")
    assert result.returncode == 2
    assert "TORCH_CUDA=cuda12 is not a PyTorch wheel variant" in result.stderr
    assert not log.exists()
