"""The task contract between a training method and the engine, plus the plain CE task.

A *task* is what a method contributes to :func:`raug.engine.fit`: the modules
it trains and two step functions. The engine never knows which method runs.

Contract (see ``docs/engine.md`` for a worked KD example):

* ``modules``: ``{name: nn.Module}`` -- everything trained whose state goes
  into checkpoints. ``modules["model"]`` is the network that predicts (its
  state is ``model_state_dict``; the others go to ``extra_state_dicts``).
* ``frozen_modules``: ``{name: nn.Module}`` -- moved to the device and kept in
  eval mode, never checkpointed or optimised (a distillation teacher).
* ``parameters()``: what the optimizer trains.
* ``train_step(batch)`` -> ``{"loss": scalar tensor with grad, "logits": (N, K)
  (optional), <part>: scalar tensor or number, ...}``; the engine does the
  backward pass and the optimizer step.
* ``eval_step(batch)`` -> ``{"loss": scalar, "logits": (N, K) (optional), ...}``,
  called under ``torch.inference_mode()`` on un-augmented batches.
* ``train()`` / ``eval()``: mode switches; ``to(device, memory_format)``.

``batch`` is the collated dataset dict already on the device:
``{"image": (N, 3, S, S), "label": (N,), "meta": (N, 11), "id": list[str]}``.
Step functions keep no global state, so the same task runs under data
parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class Task(Protocol):
    """What :func:`raug.engine.fit` needs from a training method."""

    modules: dict[str, nn.Module]
    frozen_modules: dict[str, nn.Module]

    def parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the optimizer updates."""
        ...

    def train_step(self, batch: dict) -> dict:
        """Forward pass and loss on a training batch."""
        ...

    def eval_step(self, batch: dict) -> dict:
        """Loss (and logits) on an evaluation batch."""
        ...

    def train(self) -> None:
        """Switch to training mode."""
        ...

    def eval(self) -> None:
        """Switch to evaluation mode."""
        ...

    def to(self, device: torch.device, memory_format: torch.memory_format) -> None:
        """Move every module and tensor the steps use."""
        ...


class BaseTask:
    """Default plumbing for tasks: subclasses set ``modules``/``frozen_modules`` and the steps."""

    modules: dict[str, nn.Module]
    frozen_modules: dict[str, nn.Module]

    def __init__(self, modules: dict[str, nn.Module], frozen_modules: dict[str, nn.Module] | None = None):
        """Register the trained and the frozen modules (``modules`` must hold ``"model"``)."""
        if "model" not in modules:
            raise ValueError(f"a task's modules must include 'model'; got {sorted(modules)}")
        self.modules = dict(modules)
        self.frozen_modules = dict(frozen_modules or {})
        for module in self.frozen_modules.values():
            module.requires_grad_(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of ``modules`` (each once, in registration order)."""
        seen: set[int] = set()
        for module in self.modules.values():
            for param in module.parameters():
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    yield param

    def train(self) -> None:
        """Trained modules in train mode; frozen ones stay in eval mode."""
        for module in self.modules.values():
            module.train()
        for module in self.frozen_modules.values():
            module.eval()

    def eval(self) -> None:
        """Every module in eval mode."""
        for module in (*self.modules.values(), *self.frozen_modules.values()):
            module.eval()

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> None:
        """Move all modules; override (and call this) to move extra tensors."""
        for module in (*self.modules.values(), *self.frozen_modules.values()):
            module.to(device=device, memory_format=memory_format)

    def train_step(self, batch: dict) -> dict:
        """Override: see the module docstring."""
        raise NotImplementedError

    def eval_step(self, batch: dict) -> dict:
        """Override: see the module docstring."""
        raise NotImplementedError


class ClassificationTask(BaseTask):
    """Plain (optionally class-weighted) cross-entropy training of one classifier."""

    def __init__(self, model: nn.Module, class_weight: torch.Tensor | None = None):
        """Train ``model`` with ``F.cross_entropy(weight=class_weight)``.

        Args:
            model: any module mapping ``(N, 3, S, S)`` images to ``(N, K)`` logits.
            class_weight: (K,) cross-entropy weights or ``None``.
        """
        super().__init__({"model": model})
        self.class_weight = class_weight

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> None:
        """Move the model and the class weights."""
        super().to(device, memory_format)
        if self.class_weight is not None:
            self.class_weight = self.class_weight.to(device)

    def _step(self, batch: dict) -> dict:
        logits = self.modules["model"](batch["image"])
        loss = F.cross_entropy(logits, batch["label"], weight=self.class_weight)
        return {"loss": loss, "logits": logits}

    def train_step(self, batch: dict) -> dict:
        """Weighted cross-entropy on a training batch."""
        return self._step(batch)

    def eval_step(self, batch: dict) -> dict:
        """Weighted cross-entropy on an evaluation batch."""
        return self._step(batch)
