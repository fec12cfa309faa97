"""Loss precision: every term computes in float32 at least and returns float32 at least.

Under autocast the networks run in float16/bfloat16, and so do the tensors they hand to
the loss terms. A term evaluated in that dtype loses digits (bf16 keeps 8 significant
bits) and, multiplied by a large weight such as ``lambd_crkd = 1000``, can overflow
float16 and caps ``GradScaler``'s scale. So each term upcasts float16/bfloat16 inputs to
float32 (``.float()`` is differentiable: gradients reach the low-precision inputs in
their own dtype) and runs with autocast off, which would otherwise lower its matmuls
again. float32 inputs are used as they are (same numerics as without this module) and
float64 inputs stay float64.
"""

from __future__ import annotations

import contextlib

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 when it is float16/bfloat16; otherwise ``x`` itself."""
    return x.float() if x.dtype in LOW_PRECISION else x


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a term returns for input ``x``: float32 for 16-bit inputs, else ``x``'s."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device``'s type inside the term (no-op where it has none)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
