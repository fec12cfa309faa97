"""The single place through which a run writes files and logs to Sacred.

Every write is atomic (temp file + ``os.replace``). ``is_main=False`` turns every
method into a no-op, so under data parallelism only rank 0 writes; by default
(``is_main=None``) it is decided from the torchrun rank
(:func:`raug.train.distributed.is_main_process`), so outputs created anywhere in a
distributed run are silent on ranks > 0.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from raug.files.atomic import atomic_write_bytes, atomic_write_text
from raug.files.checkpoint import save_checkpoint
from raug.train.distributed import is_main_process

log = logging.getLogger(__name__)


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by ``None`` (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


class RunOutputs:
    """Files of one run under ``folder`` plus optional Sacred logging.

    Args:
        folder: the run's ``_save_folder``.
        run: the Sacred ``Run`` (``None`` outside Sacred: nothing is logged to it).
        is_main: whether this process writes (``None``: whether it is rank 0).
    """

    def __init__(self, folder: str | Path, run: Any = None, is_main: bool | None = None):
        """Store where to write and whom to log to."""
        self.folder = Path(folder)
        self.run = run
        self.is_main = is_main_process() if is_main is None else bool(is_main)

    def path(self, relpath: str | Path) -> Path:
        """Absolute path of ``relpath`` inside the run folder."""
        return self.folder / relpath

    def save_checkpoint(self, relpath: str | Path, payload: dict) -> Path:
        """Atomically write a checkpoint (see :mod:`raug.files.checkpoint`)."""
        path = self.path(relpath)
        if self.is_main:
            save_checkpoint(path, payload)
        return path

    def write_text(self, relpath: str | Path, text: str) -> Path:
        """Atomically write a UTF-8 text file."""
        path = self.path(relpath)
        if self.is_main:
            atomic_write_text(path, text)
        return path

    def write_json(self, relpath: str | Path, obj: Any) -> Path:
        """Atomically write ``obj`` as indented strict JSON (NaN/inf become null)."""
        text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
        return self.write_text(relpath, text + "\n")

    def write_csv(self, relpath: str | Path, frame: pd.DataFrame) -> Path:
        """Atomically write a table as CSV without the index."""
        return self.write_text(relpath, frame.to_csv(index=False))

    def save_figure(self, relpath: str | Path, fig) -> Path:
        """Atomically write a matplotlib ``Figure`` as PNG."""
        path = self.path(relpath)
        if self.is_main:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            atomic_write_bytes(path, buf.getvalue())
        return path

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        """Log one scalar to the Sacred run (``metrics.json`` of the run)."""
        if self.is_main and self.run is not None and math.isfinite(float(value)):
            self.run.log_scalar(name, float(value), step)

    def add_artifact(self, relpath: str | Path, name: str | None = None) -> None:
        """Attach a file of the run folder to the Sacred run (copied into its folder)."""
        path = self.path(relpath)
        if self.is_main and self.run is not None:
            self.run.add_artifact(str(path), name=name or Path(relpath).name)
