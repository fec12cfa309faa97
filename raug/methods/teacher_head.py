"""SSD-KD phase 1: fit the teacher's projection head once, save it, reuse it.

The head file (default ``<_save_folder>/teacher-head/teacher-head.pth``, or
``_teacher_head``) is a project checkpoint that describes itself::

    kind               "ssd-kd-teacher-head"
    model_state_dict   the head's weights (ProjectionHead keys 0.*, 2.*)
    head_dim           D
    teacher            path, size, mtime_ns, sha256 of the teacher file, plus its
                       model_name, class_names and validation fold
    fit                the settings the fit depends on (see :func:`head_fit_key`)
    best_epoch, best_value (validation SS loss), history

It is written only after the fit has finished (atomically), so a crash never
leaves a head that looks complete. A later run reuses it when the teacher's
bytes (sha256) and the fit settings are the same, and refits otherwise; the
log says which. The fit itself is :func:`raug.train.engine.fit` with
:class:`RotationHeadTask`, SGD (lr ``_lr_init``, momentum
0.9, weight decay 1e-3), MultiStepLR (x0.1 at epochs 30 and 45) and early
stopping on the validation SS loss; its working checkpoints live in
``<head stem>-phase1/`` next to the head file (resumable with ``_resume=True``)
and are removed once the head file is written.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from kd_losses import rotate_views, rotation_ss_loss, view_labels, view_similarity
from kd_losses.views import own_columns
from raug.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from raug.methods.teacher import freeze, frozen_forward
from raug.train.distributed import barrier, gather_embeddings, is_main_process
from raug.train.engine import FitSettings, fit
from raug.train.outputs import RunOutputs
from raug.train.task import Task

log = logging.getLogger(__name__)

HEAD_FILE = "teacher-head/teacher-head.pth"
HEAD_KIND = "ssd-kd-teacher-head"
HEAD_MODEL_NAME = "projection-head"
HEAD_MILESTONES = (30, 45)
HEAD_GAMMA = 0.1
# Config keys the fitted head depends on (besides the teacher's bytes).
HEAD_FIT_KEYS = ("_img_size", "_folder", "_epochs_tune", "_lr_init", "_early_stop")


def rotation_accuracy(proj: torch.Tensor) -> torch.Tensor:
    """Share of rotated views whose most similar normal view is their own image's."""
    sim = view_similarity(proj)
    return (sim.argmax(dim=1) == own_columns(sim.shape[1], sim.device)).float().mean()


class RotationHeadTask(Task):
    """Phase 1: fit ``head`` on the frozen teacher's ``avg_pool`` of the four rotations.

    Steps return ``loss`` (``kd_losses.rotation_ss_loss``) and ``ss_acc``
    (:func:`rotation_accuracy`); no logits. ``trained["model"]`` is the head.
    """

    def __init__(self, head: nn.Module, teacher: nn.Module):
        """Train ``head`` (D -> D) on top of the frozen ``teacher``."""
        super().__init__({"model": head}, {"teacher": teacher})

    def _step(self, batch: dict) -> dict:
        views = rotate_views(batch["image"])
        meta = None if batch.get("meta") is None else view_labels(batch["meta"])  # shared by the views
        pooled = frozen_forward(self.frozen["teacher"], views, meta)["avg_pool"]
        # _gather_embeddings=True under torchrun: the rotation task over the global batch
        proj = gather_embeddings(self.model(pooled))
        return {"loss": rotation_ss_loss(proj), "ss_acc": rotation_accuracy(proj.detach())}

    def train_step(self, batch: dict) -> dict:
        """Rotation SS loss of the batch's four-view stack."""
        return self._step(batch)

    def eval_step(self, batch: dict) -> dict:
        """Same as training (the validation SS loss drives early stopping)."""
        return self._step(batch)


def head_fit_key(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config values a fitted head depends on (compared before reusing it)."""
    return {key: config[key] for key in HEAD_FIT_KEYS}


def head_fit_settings(config: Mapping[str, Any]) -> FitSettings:
    """Phase-1 :class:`FitSettings`: ``_epochs_tune`` epochs, best = lowest validation SS loss."""
    return FitSettings.from_config(
        config,
        epochs=int(config["_epochs_tune"]),
        best_metric="loss",
        log_prefix="phase1.",
        desc="teacher head epoch",
        resume=False,
    )


def head_scheduler(optimizer):
    """The seed's phase-1 schedule: LR x0.1 at epochs 30 and 45."""
    return MultiStepLR(optimizer, milestones=list(HEAD_MILESTONES), gamma=HEAD_GAMMA)


def reusable_head(
    path: Path, teacher_info: Mapping[str, Any], fit_key: Mapping[str, Any]
) -> tuple[dict | None, str]:
    """The saved head at ``path`` if it fits this teacher and these settings.

    Returns:
        ``(checkpoint, "")`` when reusable, else ``(None, why not)``.
    """
    if not path.is_file():
        return None, f"no fitted head at {path}"
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        return None, f"the head file cannot be read ({exc})"
    if state.get("kind") != HEAD_KIND:
        return None, f"{path} is not a teacher-head file"
    old = state.get("teacher", {})
    if old.get("sha256") != teacher_info["sha256"]:
        return None, (
            f"the teacher changed: {path} was fitted for {old.get('path')} "
            f"(sha256 {str(old.get('sha256'))[:12]}), the teacher is {teacher_info['path']} "
            f"(sha256 {teacher_info['sha256'][:12]})"
        )
    changed = [
        f"{k}: {state.get('fit', {}).get(k)!r} -> {v!r}"
        for k, v in fit_key.items()
        if state.get("fit", {}).get(k) != v
    ]
    if changed:
        return None, f"the fit settings changed ({', '.join(changed)})"
    return state, ""


def _resume_state(path: Path, teacher_info: Mapping[str, Any], fit_key: Mapping[str, Any]):
    """An interrupted phase 1's last checkpoint, if it belongs to this teacher and settings."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("teacher", {}).get("sha256") != teacher_info["sha256"] or state.get("fit") != dict(fit_key):
        log.info("not resuming phase 1 from %s: other teacher or settings", path)
        return None
    return state


def prepare_teacher_head(
    teacher: nn.Module,
    head: nn.Module,
    *,
    head_path: str | Path,
    teacher_info: Mapping[str, Any],
    fit_key: Mapping[str, Any],
    train_loader: Iterable,
    val_loader: Iterable,
    settings: FitSettings,
    run: Any = None,
    resume: bool = False,
) -> nn.Module:
    """Load the saved teacher head if it is reusable, else fit it on the rotation task.

    Args:
        teacher: the frozen teacher (``forward_kd``).
        head: a fresh projection head for the teacher's ``avg_pool``.
        head_path: the head file (read if reusable, written after a fit).
        teacher_info: :func:`raug.methods.teacher.file_fingerprint` of the teacher
            file (``sha256`` decides reuse) plus what to record about it.
        fit_key: :func:`head_fit_key` of the run.
        train_loader, val_loader: the run's loaders (augmented / plain images).
        settings: :func:`head_fit_settings` (paths and prefix are set here).
        run: the Sacred run (metrics ``phase1.*``).
        resume: continue an interrupted fit from its last checkpoint.

    Returns:
        ``head`` with the fitted weights, frozen (eval mode, no gradients).
    """
    head_path = Path(head_path)
    outputs = RunOutputs(head_path.parent, run=run)
    state, reason = reusable_head(head_path, teacher_info, fit_key)
    if state is not None:
        head.load_state_dict(state["model_state_dict"])
        outputs.log_scalar("phase1.reused", 1.0, 0)
        log.info(
            "teacher head reused from %s (fitted for %s, best epoch %s, val SS loss %.4f): "
            "not refitted", head_path, teacher_info["path"], state.get("best_epoch"),
            float(state.get("best_value", float("nan"))),
        )
        return freeze(head)

    log.info("fitting the teacher's projection head: %s", reason)
    outputs.log_scalar("phase1.reused", 0.0, 0)
    work = f"{head_path.stem}-phase1"
    settings = replace(settings, best_path=f"{work}/best-checkpoint.pth",
                       last_path=f"{work}/last-checkpoint.pth", resume=False)
    info = {"model_name": HEAD_MODEL_NAME, "num_classes": None, "kind": HEAD_KIND + "-work",
            "teacher": dict(teacher_info), "fit": dict(fit_key)}
    resume_state = _resume_state(outputs.path(settings.last_path), teacher_info, fit_key) if resume else None
    result = fit(RotationHeadTask(head, teacher), train_loader, val_loader, settings, outputs,
                 scheduler=head_scheduler, checkpoint_info=info, resume_checkpoint=resume_state)
    if result.best_checkpoint is None:
        raise RuntimeError(f"phase 1 produced no teacher head in {outputs.path(work)}")
    best = load_checkpoint(result.best_checkpoint)
    head.load_state_dict(best["model_state_dict"])
    if is_main_process():  # torchrun: rank 0 writes, the others wait (barrier below)
        _save_head(head_path, head, teacher_info, fit_key, result, outputs.path(work))
    barrier()
    log.info("teacher head saved to %s (best epoch %d, val SS loss %.4f)", head_path,
             result.best_epoch, result.best_value)
    return freeze(head)


def _save_head(head_path: Path, head: nn.Module, teacher_info, fit_key, result, work: Path) -> None:
    """Write the head file, then remove the phase-1 working checkpoints."""
    save_checkpoint(head_path, {
        "kind": HEAD_KIND,
        "model_name": HEAD_MODEL_NAME,
        "head_dim": int(getattr(head, "dim", 0)),
        "model_state_dict": head.state_dict(),
        "teacher": dict(teacher_info),
        "fit": dict(fit_key),
        "best_epoch": int(result.best_epoch),
        "best_value": float(result.best_value),
        "history": [dict(row) for row in result.history],
    })
    # The head file is complete; the working checkpoints are no longer needed.
    shutil.rmtree(work)
