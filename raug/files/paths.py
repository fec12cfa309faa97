"""Where things are: the repository root, the results folder, the run folder conventions.

Relative paths in configs and on command lines resolve against the repository
root (:func:`resolve_repo_path`), not the working directory, so scripts run from
anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "results"
# Written into a run's _save_folder once the run has finished (evaluation included).
COMPLETED_MARKER = "COMPLETED"


def resolve_repo_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute: relative paths are taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path)


def default_save_folder(name: str, folder: int) -> Path:
    """Default ``_save_folder`` of a script: ``results/<name>_fold<folder>``."""
    return RESULTS_DIR / f"{name}_fold{folder}"


__all__ = ["COMPLETED_MARKER", "REPO_ROOT", "RESULTS_DIR", "default_save_folder", "resolve_repo_path"]
