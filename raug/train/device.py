"""Device and mixed-precision selection from config strings.

``_device`` is one of ``"auto"`` (CUDA when present, else CPU), ``"cpu"``,
``"cuda"`` or ``"cuda:<i>"``. Anything else, or CUDA asked for where there is
none, raises :class:`DeviceError` before any work starts.
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch

log = logging.getLogger(__name__)

AMP_CHOICES = (None, "off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """An unknown or unavailable device was requested."""


def check_device(spec: str) -> str | None:
    """Return a one-line problem with the device string ``spec``, or ``None`` if usable."""
    if not isinstance(spec, str):
        return f"_device={spec!r} must be a string: 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
    if spec in ("auto", "cpu"):
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        return f"_device={spec!r} is unknown; allowed: 'auto', 'cpu', 'cuda', 'cuda:<index>'"
    if not torch.cuda.is_available():
        return f"_device={spec!r} but CUDA is not available on this machine; use _device=cpu"
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        return f"_device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
    return None


def resolve_device(spec: str | torch.device) -> torch.device:
    """Turn a ``_device`` string into a ``torch.device``.

    Raises:
        DeviceError: unknown string or CUDA not available.
    """
    if isinstance(spec, torch.device):
        return spec
    problem = check_device(spec)
    if problem:
        raise DeviceError(problem)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``_amp`` on ``device`` (``None`` = full precision).

    On CUDA both ``bf16`` and ``fp16`` apply. On CPU only ``bf16`` does: CPUs with
    AMX or AVX512-BF16 run bf16 convolutions about twice as fast as float32 (a D-KD step
    at 224 px on the development Xeon: 1.6 s instead of 3.0 s), while CPUs without them
    are slower, so it is never switched on implicitly. ``fp16`` on CPU is ignored with
    a warning (no CPU runs float16 convolutions fast, and it would need loss scaling).

    Raises:
        ValueError: an ``_amp`` value outside :data:`AMP_CHOICES`.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"_amp={amp!r} is unknown; allowed: None, 'off', 'bf16', 'fp16'")
    if amp in (None, "off"):
        return None
    if device.type == "cpu" and amp == "fp16":
        log.warning("_amp='fp16' ignored on cpu (float16 autocast is CUDA-only here); "
                    "use _amp='bf16' on CPUs with AMX / AVX512-BF16")
        return None
    if device.type not in ("cpu", "cuda"):
        log.info("_amp=%r ignored on %s: mixed precision is used on CUDA and CPU only", amp, device)
        return None
    return _AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
