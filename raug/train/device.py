"""Device and mixed-precision selection from config strings.

``_device`` is one of ``"auto"`` (CUDA when present, else CPU), ``"cpu"``,
``"cuda"`` or ``"cuda:<i>"``. Anything else, or CUDA asked for where there is
none, raises :class:`DeviceError` before any work starts. Two GPU problems are
refused the same way, with one line that names the fix (README, "GPU install"):

* a GPU whose compute capability this torch build has no kernels for (the PyPI
  wheel is a CUDA 13 build, which has none for Volta / sm_70, e.g. Tesla V100):
  :func:`arch_problem`;
* ``_device="auto"`` on a machine with an NVIDIA GPU (a ``/dev/nvidia<N>`` node or
  ``nvidia-smi`` on ``PATH``) where torch cannot use CUDA (driver too old for the
  build, CPU-only build): refused instead of silently training on the CPU
  (:func:`unusable_gpu_problem`). ``CUDA_VISIBLE_DEVICES=""`` (GPUs hidden on
  purpose) and ``_device="cpu"`` always run on the CPU.

``_amp`` (:func:`amp_dtype`): ``"auto"`` (the default of the scripts) is bf16 on
sm_80 and newer, fp16 with loss scaling on sm_70 / sm_75, off on the CPU.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil

import torch

log = logging.getLogger(__name__)

AMP_CHOICES = (None, "off", "auto", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The fix printed when this torch build cannot run the GPU (tools/env.sh, README "GPU install").
FIX_OLD_GPU = "TORCH_CUDA=cu126 bash tools/env.sh"
FIX_NEW_GPU = "TORCH_CUDA=cu130 bash tools/env.sh"


class DeviceError(ValueError):
    """An unknown or unavailable device was requested."""


def nvidia_gpu_evidence() -> str | None:
    """What shows an NVIDIA GPU on this machine (``/dev/nvidia0``, the path of ``nvidia-smi``), or ``None``.

    ``CUDA_VISIBLE_DEVICES`` set to ``""`` or ``"-1"`` hides every GPU on purpose: ``None``.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nodes:
        return nodes[0]
    return shutil.which("nvidia-smi")


def unusable_gpu_problem(spec: str) -> str | None:
    """One line when this machine has an NVIDIA GPU that torch cannot use (else ``None``).

    Called where ``torch.cuda.is_available()`` is False: a driver older than the
    build's CUDA needs, or a CPU-only torch build.
    """
    if torch.cuda.is_available():
        return None
    evidence = nvidia_gpu_evidence()
    if evidence is None:
        return None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        reason = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; is the driver "
                  "older than that CUDA needs? (nvidia-smi shows the driver's CUDA version)")
    return (f"_device={spec!r} but CUDA cannot be used although this machine has an NVIDIA GPU "
            f"({evidence}): {reason}; install the torch build for your GPU and driver, e.g. "
            f"{FIX_OLD_GPU} (README, 'GPU install'), or pass _device=cpu to train on the CPU")


def _arch_value(arch: str) -> tuple[str, int, str] | None:
    """``"sm_86"`` -> ``("sm", 86, "")``, ``"sm_90a"`` -> ``("sm", 90, "a")``; others ``None``."""
    match = re.fullmatch(r"(sm|compute)_(\d+)([a-z]?)", arch)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with ``arch_list`` (``torch.cuda.get_arch_list()``) runs a GPU of ``capability``.

    NVIDIA's compatibility rules: a cubin ``sm_XY`` runs on every GPU ``sm_XZ`` with
    ``Z >= Y`` (same major; e.g. ``sm_86`` kernels run on an sm_89 L4 / RTX 40), an
    arch-specific one (``sm_90a``) only on that exact GPU, and PTX (``compute_XY``)
    is compiled at load time for any GPU of ``XY`` or newer. An empty list (nothing
    known) counts as supported.
    """
    major, minor = capability
    value = 10 * major + minor
    parsed = [p for p in map(_arch_value, arch_list) if p is not None]
    if not parsed:
        return True
    for kind, number, suffix in parsed:
        if kind == "compute" and not suffix and number <= value:
            return True
        if kind == "sm" and (number == value or
                             (suffix != "a" and number // 10 == major and number % 10 <= minor)):
            return True
    return False


def arch_problem(index: int) -> str | None:
    """One line when this torch build has no kernels for GPU ``index`` (else ``None``).

    Names the GPU, its ``sm_XY``, the build's architectures and the fix (the
    ``TORCH_CUDA`` variant of ``tools/env.sh`` that covers it).
    """
    arch_list = list(torch.cuda.get_arch_list())
    major, minor = torch.cuda.get_device_capability(index)
    if arch_supported((major, minor), arch_list):
        return None
    name = torch.cuda.get_device_name(index)
    sms = [v[1] for v in map(_arch_value, arch_list) if v is not None]
    if 10 * major + minor < 50:
        fix = "no current torch build runs GPUs older than sm_50; pass _device=cpu"
    elif sms and 10 * major + minor < min(sms):
        fix = f"install a build that still has it: {FIX_OLD_GPU} (README, 'GPU install'), or pass _device=cpu"
    else:
        fix = f"install a newer CUDA build: {FIX_NEW_GPU} (README, 'GPU install'), or pass _device=cpu"
    return (f"GPU cuda:{index} {name} is sm_{major}{minor}, which torch {torch.__version__} "
            f"(kernels for {' '.join(arch_list)}) cannot run; {fix}")


def _cuda_indices(spec: str) -> list[int]:
    """The GPUs a valid CUDA ``_device`` string may use: ``cuda:<i>`` that one, else all visible."""
    match = re.fullmatch(r"cuda:(\d+)", spec)
    return [int(match.group(1))] if match else list(range(torch.cuda.device_count()))


def check_device(spec: str) -> str | None:
    """Return a one-line problem with the device string ``spec``, or ``None`` if usable.

    Beyond the syntax and the GPU count: ``auto`` on a machine whose NVIDIA GPU torch
    cannot use (:func:`unusable_gpu_problem`) and a GPU this build has no kernels for
    (:func:`arch_problem`) are problems too. ``cpu`` never is.
    """
    if not isinstance(spec, str):
        return f"_device={spec!r} must be a string: 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
    if spec == "cpu":
        return None
    if spec == "auto":
        if not torch.cuda.is_available():
            return unusable_gpu_problem(spec)
    else:
        match = re.fullmatch(r"cuda(?::(\d+))?", spec)
        if match is None:
            return f"_device={spec!r} is unknown; allowed: 'auto', 'cpu', 'cuda', 'cuda:<index>'"
        if not torch.cuda.is_available():
            return (unusable_gpu_problem(spec)
                    or f"_device={spec!r} but CUDA is not available on this machine; use _device=cpu")
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            return f"_device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
    for index in _cuda_indices(spec):
        problem = arch_problem(index)
        if problem:
            return problem
    return None


def resolve_device(spec: str | torch.device) -> torch.device:
    """Turn a ``_device`` string into a ``torch.device``.

    Raises:
        DeviceError: unknown string, CUDA not available, a GPU this build cannot run,
            or ``auto`` where an NVIDIA GPU is present but unusable (see :func:`check_device`).
    """
    if isinstance(spec, torch.device):
        return spec
    problem = check_device(spec)
    if problem:
        raise DeviceError(problem)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA ``device``; ``None`` where CUDA is not available."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    return tuple(torch.cuda.get_device_capability(index))


def bf16_problem(device: torch.device) -> str | None:
    """One line when ``device`` is a GPU older than sm_80 (bf16 is emulated there, slowly)."""
    capability = _cuda_capability(device)
    if capability is None or capability >= (8, 0):
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    return (f"_amp='bf16' on cuda:{index} {torch.cuda.get_device_name(index)} "
            f"(sm_{capability[0]}{capability[1]}): bf16 needs sm_80 or newer and is emulated "
            "(slow) here; use _amp=\"fp16\" (or _amp=\"auto\", which picks fp16 on this GPU)")


def amp_problem(amp, spec) -> str | None:
    """The config check of ``_amp`` against ``_device``: ``bf16`` on a pre-sm_80 GPU, else ``None``.

    Only meaningful once ``spec`` passed :func:`check_device`; checks every GPU ``spec``
    may use (``cuda:<i>`` that one, ``auto``/``cuda`` all visible ones).
    """
    if amp != "bf16" or not isinstance(spec, str) or spec == "cpu" or not torch.cuda.is_available():
        return None
    if spec != "auto" and re.fullmatch(r"cuda(?::\d+)?", spec) is None:
        return None
    for index in _cuda_indices(spec):
        if index < torch.cuda.device_count():
            problem = bf16_problem(torch.device("cuda", index))
            if problem:
                return problem
    return None


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``_amp`` on ``device`` (``None`` = full precision).

    ``auto`` (the scripts' default): bf16 on sm_80 and newer GPUs (A100, RTX 30/40,
    L4, H100), fp16 on sm_70 / sm_75 (V100, T4, RTX 20; the engine then scales the
    loss with ``GradScaler``), off on the CPU, so a CPU run is the full-precision run.

    On CUDA ``bf16`` needs sm_80 or newer (refused on older GPUs, which emulate it
    slowly) and ``fp16`` runs everywhere. On CPU only ``bf16`` applies: CPUs with
    AMX or AVX512-BF16 run bf16 convolutions about twice as fast as float32 (a D-KD step
    at 224 px on the development Xeon: 1.6 s instead of 3.0 s), while CPUs without them
    are slower, so it is never switched on implicitly (``auto`` is off). ``fp16`` on CPU
    is ignored with a warning (no CPU runs float16 convolutions fast, and it would need
    loss scaling).

    Raises:
        ValueError: an ``_amp`` value outside :data:`AMP_CHOICES`.
        DeviceError: ``bf16`` on a GPU older than sm_80.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"_amp={amp!r} is unknown; allowed: None, 'off', 'auto', 'bf16', 'fp16'")
    if amp in (None, "off"):
        return None
    if device.type not in ("cpu", "cuda"):
        log.info("_amp=%r ignored on %s: mixed precision is used on CUDA and CPU only", amp, device)
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        capability = _cuda_capability(device)
        return torch.bfloat16 if capability is None or capability >= (8, 0) else torch.float16
    if device.type == "cpu" and amp == "fp16":
        log.warning("_amp='fp16' ignored on cpu (float16 autocast is CUDA-only here); "
                    "use _amp='bf16' on CPUs with AMX / AVX512-BF16")
        return None
    if amp == "bf16":
        problem = bf16_problem(device)
        if problem:
            raise DeviceError(problem)
    return _AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
