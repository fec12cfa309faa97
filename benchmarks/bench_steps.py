"""Training-step benchmarks: the toolkit's D-KD / SSD-KD steps against seed-style steps.

"Ours" is exactly the engine's per-batch work (``raug.train.engine.train_one_epoch``): batch to
the device (channels-last when ``_channels_last``), ``task.train_step`` under the AMP
context, ``zero_grad``, backward, SGD step, one ``.item()``. The tasks are the toolkit's
``DKDTask`` / ``SSDKDTask``: teacher under ``inference_mode``, features from
``forward_kd`` (no hooks), hw x hw channel relation, tensor rotations.

"Baseline" is ``baselines/seed_dkd_step.py`` / ``seed_ssdkd_step.py``. Both start from
the same random weights (deep copies) and the same batch; before timing, the losses of
one batch are compared (:class:`StepCheckError` if they differ by more than ``rtol``).

Networks are randomly initialised (no ImageNet file needed): the time of a step does not
depend on the weights. Images are random ``uint8`` pictures normalised like the loader's.

Usage (from the repository root; ``run.py`` is the usual entry point)::

    python benchmarks/bench_steps.py [--item dkd|ssd|teacher|breakdown]
        [--batch 32] [--px 128] [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import models
from kd_losses import DKDWeights, SSDKDWeights, channel_relation
from raug.data.transforms import apply_transform, eval_transform
from raug.methods.dkd import DKDTask
from raug.methods.ssdkd import SSDKDTask
from raug.methods.teacher import frozen_forward
from raug.train.device import amp_dtype, autocast, resolve_device
from raug.train.engine import FitSettings, _maybe_compile, default_optimizer, to_device
from raug.train.task import ClassificationTask, Task

if __package__:
    from . import common
    from .baselines.seed_channel_relation import seed_channel_relation
    from .baselines.seed_dkd_step import SeedDKDStep
    from .baselines.seed_ssdkd_step import SeedSSDKDStep
else:
    import common
    from baselines.seed_channel_relation import seed_channel_relation
    from baselines.seed_dkd_step import SeedDKDStep
    from baselines.seed_ssdkd_step import SeedSSDKDStep

NUM_CLASSES = 8
# ISIC 2019 training images per epoch: 25,331 x 0.9 (train part) x 0.8 (4 of 5 folds).
EPOCH_IMAGES = 18238
# Frequency class weights round(n / n_k, 3) of the real ISIC 2019 counts (AK..VASC).
_REAL_COUNTS = (867, 3323, 2624, 239, 4522, 12875, 628, 253)
# The seed-style baselines take the weights as keywords (the seed's own way); the toolkit's
# tasks take kd_losses.DKDWeights() / SSDKDWeights(), whose defaults are these values.
DKD_WEIGHTS = {"lambd": 0.5, "T": 5.0, "lambd_drkd": 1.0, "lambd_crkd": 1000.0}
SSD_WEIGHTS = {"kd_T": 4.0, "tf_T": 4.0, "ss_T": 0.5, "ratio_tf": 1.0, "ratio_ss": 0.75}
SSD_HR = {"hr_w": 1.0, "lambd_drkd": 1.0, "lambd_crkd": 1000.0}


class StepCheckError(AssertionError):
    """The toolkit and the baseline disagree on the loss of the same batch."""


def class_weight() -> torch.Tensor:
    """(8,) frequency weights of the real ISIC 2019 class counts."""
    total = sum(_REAL_COUNTS)
    return torch.tensor([round(total / n, 3) for n in _REAL_COUNTS], dtype=torch.float32)


def make_images(n: int, px: int, seed: int = 0) -> np.ndarray:
    """(n, px, px, 3) random ``uint8`` RGB pictures (smooth blobs + noise, not constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    out = np.empty((n, px, px, 3), dtype=np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        lesion = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        skin = rng.uniform(150, 230, size=3)
        spot = rng.uniform(40, 120, size=3)
        img = np.where(lesion, spot, skin) + rng.normal(0, 12, size=(px, px, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_labels(n: int) -> torch.Tensor:
    """Labels cycling through the 8 classes (every class present from n = 8)."""
    return torch.arange(n, dtype=torch.int64) % NUM_CLASSES


def normalise(images: np.ndarray, px: int) -> torch.Tensor:
    """The toolkit's tensor conversion (``eval_transform``: resize + normalise), stacked."""
    transform = eval_transform(px)
    return torch.stack([apply_transform(transform, img) for img in images])


@dataclass
class Nets:
    """The networks of one comparison."""

    student: nn.Module
    teacher: nn.Module
    adapter: nn.Module
    student_head: nn.Module
    teacher_head: nn.Module

    def copy(self) -> Nets:
        """Deep copies (same weights, separate modules: hooks on one never reach the other)."""
        return Nets(*(copy.deepcopy(m) for m in vars(self).values()))


def build_nets(px: int, seed: int = 0) -> Nets:
    """Student (MobileNet-V2), teacher (ResNet-50), adapter and both projection heads."""
    torch.manual_seed(seed)
    student = models.create_model("mobilenet", NUM_CLASSES)
    teacher = models.create_model("resnet-50", NUM_CLASSES).eval()
    adapter = models.build_adapter(student, teacher, px)
    return Nets(
        student=student,
        teacher=teacher,
        adapter=adapter,
        student_head=models.ProjectionHead(student.num_features),
        teacher_head=models.ProjectionHead(teacher.num_features).eval(),
    )


class ToolkitStep:
    """The engine's per-batch training work for ``task`` (see ``raug.train.engine.train_one_epoch``).

    Args:
        task: a :class:`raug.train.task.Task`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        channels_last: move modules and images to channels-last (the engine's default).
        amp: ``None``/``"off"``/``"bf16"``/``"fp16"`` (as the engine: both on CUDA, ``bf16`` only on CPU).
        compile: ``torch.compile`` every module and its ``forward_kd`` (CUDA only): the
            engine's own ``_maybe_compile``, so the KD steps' ``forward_kd`` is compiled too.
        lr: SGD learning rate (engine default optimizer: momentum 0.9, weight decay 1e-3).
    """

    def __init__(
        self,
        task: Task,
        device: str | torch.device,
        channels_last: bool = True,
        amp: str | None = None,
        compile: bool = False,
        lr: float = 1e-3,
    ):
        self.task = task
        self.device = resolve_device(device)
        self.dtype = amp_dtype(amp, self.device)
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        task.to(device=self.device, memory_format=memory_format)
        _maybe_compile(task, compile, self.device)
        task.train()
        settings = FitSettings(epochs=1, lr=lr, device=self.device, amp=amp)
        self.optimizer = default_optimizer(settings)(task.trainable_parameters())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)

    def loss(self, batch: dict) -> torch.Tensor:
        """Forward only: the step's loss (for the equality check)."""
        moved = to_device(batch, self.device, self.channels_last)
        with autocast(self.device, self.dtype):
            return self.task.train_step(moved)["loss"]

    def __call__(self, batch: dict) -> float:
        """One training step; returns the loss value."""
        moved = to_device(batch, self.device, self.channels_last)
        with autocast(self.device, self.dtype):
            out = self.task.train_step(moved)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out["loss"].item()


def dkd_task(nets: Nets) -> DKDTask:
    """The toolkit's D-KD task on ``nets`` (defaults of ``isic_d_kd.py``)."""
    return DKDTask(nets.student, nets.teacher, nets.adapter, class_weight(), method="d_kd",
                   weights=DKDWeights())


def ssdkd_task(nets: Nets) -> SSDKDTask:
    """The toolkit's SSD-KD phase-2 task on ``nets`` (defaults of ``isic_ssd_kd.py``)."""
    return SSDKDTask(nets.student, nets.student_head, nets.teacher, nets.teacher_head,
                     nets.adapter, class_weight(), weights=SSDKDWeights())


def seed_dkd(nets: Nets, device: str | torch.device) -> SeedDKDStep:
    """The seed-style D-KD step on ``nets``."""
    return SeedDKDStep(nets.student, nets.teacher, nets.adapter, device, class_weight(),
                       **DKD_WEIGHTS)


def seed_ssdkd(nets: Nets, device: str | torch.device) -> SeedSSDKDStep:
    """The seed-style SSD-KD step on ``nets``."""
    return SeedSSDKDStep(nets.student, nets.student_head, nets.teacher, nets.teacher_head,
                         nets.adapter, device, class_weight(), **SSD_HR, **SSD_WEIGHTS)


def check_close(name: str, ours: float, baseline: float, rtol: float) -> dict[str, float]:
    """Relative difference of two loss values; :class:`StepCheckError` above ``rtol``."""
    rel = abs(ours - baseline) / max(abs(baseline), 1e-12)
    if not rel <= rtol:  # also catches NaN
        raise StepCheckError(
            f"{name}: toolkit loss {ours!r} and seed-style baseline loss {baseline!r} differ "
            f"by {rel:.3g} (> rtol {rtol:g}); the baseline would not compute the same thing"
        )
    return {"loss_ours": ours, "loss_baseline": baseline, "rel_diff": rel, "rtol": rtol}


def _rtol(amp: str | None) -> float:
    # float32 paths (direct Gram vs float64 identity, NCHW vs channels-last) agree to ~1e-5;
    # under AMP the toolkit runs in 16-bit, the seed-style baseline in float32.
    return 2e-2 if amp in ("bf16", "fp16") else 1e-3


@dataclass
class Pair:
    """A prepared comparison: both steps, their inputs, and the equality check's figures."""

    ours: ToolkitStep
    baseline: SeedDKDStep | SeedSSDKDStep | ToolkitStep
    ours_input: Any
    baseline_input: tuple
    check: dict[str, float]
    images: int

    def run_ours(self) -> float:
        """One toolkit step."""
        return self.ours(self.ours_input() if callable(self.ours_input) else self.ours_input)

    def run_baseline(self) -> float:
        """One seed-style step."""
        return self.baseline(*self.baseline_input)


def prepare_dkd(
    batch: int, px: int, device: str, channels_last: bool = True, amp: str | None = None,
    compile: bool = False, seed: int = 0,
) -> Pair:
    """Both D-KD steps on the same weights and batch, their losses checked equal."""
    nets = build_nets(px, seed)
    base_nets = nets.copy()
    images = normalise(make_images(batch, px, seed), px)
    labels = make_labels(batch)
    ours = ToolkitStep(dkd_task(nets), device, channels_last, amp, compile)
    baseline = seed_dkd(base_nets, resolve_device(device))
    data = {"image": images, "label": labels}
    check = check_close(
        f"dkd_step batch={batch} px={px}", ours.loss(data).item(),
        baseline.loss(images, labels).item(), _rtol(amp),
    )
    baseline.reset_hooks(0)  # timing starts like a fresh seed run
    return Pair(ours, baseline, data, (images, labels), check, batch)


def prepare_ssdkd(
    batch: int, px: int, device: str, channels_last: bool = True, amp: str | None = None,
    compile: bool = False, seed: int = 0,
) -> Pair:
    """Both SSD-KD steps from the same ``uint8`` images; losses checked equal.

    Ours converts the images with the toolkit's transform tail and rotates tensors inside
    ``SSDKDTask``; the baseline builds 4 PIL views per image. Both conversions are timed.
    """
    nets = build_nets(px, seed)
    base_nets = nets.copy()
    raw = make_images(batch, px, seed)
    labels = make_labels(batch)
    ours = ToolkitStep(ssdkd_task(nets), device, channels_last, amp, compile)
    baseline = seed_ssdkd(base_nets, resolve_device(device))

    def ours_input() -> dict:
        return {"image": normalise(raw, px), "label": labels}

    check = check_close(
        f"ssd_kd_step images={batch} px={px}", ours.loss(ours_input()).item(),
        baseline.loss(list(raw), labels).item(), _rtol(amp),
    )
    baseline.reset_hooks(0)
    return Pair(ours, baseline, ours_input, (list(raw), labels), check, batch)


def prepare_teacher(
    batch: int, px: int, device: str, channels_last: bool = True, amp: str | None = None,
    compile: bool = False, seed: int = 0,
) -> Pair:
    """The toolkit's teacher step (ResNet-50, class-weighted CE) against the same step the
    seed's way: float32, NCHW, no compile (the seed trained its teacher with a plain step),
    on a copy of the same weights and the same batch; losses checked equal."""
    torch.manual_seed(seed)
    model = models.create_model("resnet-50", NUM_CLASSES)
    seed_model = copy.deepcopy(model)
    data = {"image": normalise(make_images(batch, px, seed), px), "label": make_labels(batch)}
    ours = ToolkitStep(ClassificationTask(model, class_weight()), device, channels_last, amp,
                       compile)
    baseline = ToolkitStep(ClassificationTask(seed_model, class_weight()), device,
                           channels_last=False)
    check = check_close(f"teacher_step batch={batch} px={px}", ours.loss(data).item(),
                        baseline.loss(data).item(), _rtol(amp))
    return Pair(ours, baseline, data, (data,), check, batch)


def time_pair(pair: Pair, repeats: int, warmup: int, device: str, desc: str) -> common.Timings:
    """Alternating timed runs of both steps."""
    dev = resolve_device(device)
    return common.alternate(
        pair.run_ours, pair.run_baseline, repeats, warmup,
        sync=lambda: common.sync_device(dev), desc=desc,
    )


def hook_growth(
    pair: Pair, ks: Sequence[int], repeats: int, device: str, steps_per_epoch: int
) -> list[dict[str, Any]]:
    """Seed-style step time at step k (k - 1 earlier calls' hooks still registered).

    For each k the baseline's hooks are reset to the state after k - 1 calls (outside the
    timed region), then one toolkit step and one baseline step are timed, ``repeats`` times.
    """
    dev = resolve_device(device)
    rows = []
    for k in tqdm(ks, desc="hook growth", unit="k", leave=False):
        ours_t, base_t = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            pair.run_ours()
            common.sync_device(dev)
            ours_t.append(time.perf_counter() - start)
            pair.baseline.reset_hooks(k - 1)
            start = time.perf_counter()
            pair.run_baseline()
            common.sync_device(dev)
            base_t.append(time.perf_counter() - start)
        ours_s, base_s = common.median(ours_t), common.median(base_t)
        rows.append({
            "k": int(k),
            "epochs": round(k / steps_per_epoch, 2),
            "hooks_per_network": 3 * int(k),
            "baseline_s": base_s,
            "ours_s": ours_s,
            "ratio": common.speed_ratio(base_s, ours_s),
            "baseline_runs": base_t,
            "ours_runs": ours_t,
        })
    pair.baseline.reset_hooks(0)
    return rows


def teacher_step_time(batch: int, px: int, device: str, repeats: int, seed: int = 0) -> dict:
    """Time of one toolkit teacher (ResNet-50, CE_w) training step; no baseline."""
    torch.manual_seed(seed)
    task = ClassificationTask(models.create_model("resnet-50", NUM_CLASSES), class_weight())
    step = ToolkitStep(task, device)
    data = {"image": normalise(make_images(batch, px, seed), px), "label": make_labels(batch)}
    dev = resolve_device(device)
    step(data)  # warm-up
    runs = []
    for _ in tqdm(range(repeats), desc=f"teacher step b{batch} {px}px", leave=False):
        start = time.perf_counter()
        step(data)
        common.sync_device(dev)
        runs.append(time.perf_counter() - start)
    return {"s_per_step": common.median(runs), "runs": runs, "batch": batch, "px": px}


def epoch_projection(s_per_step: float, images_per_step: int) -> dict[str, float]:
    """Projected seconds for one epoch of the full training set from one step time."""
    per_image = s_per_step / images_per_step
    return {
        "s_per_image": per_image,
        "epoch_s": per_image * EPOCH_IMAGES,
        "epoch_h": per_image * EPOCH_IMAGES / 3600.0,
        "images_per_epoch": EPOCH_IMAGES,
    }


def breakdown(batch: int, px: int, device: str, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Where the D-KD step's time goes: each part, the toolkit's way vs the seed's way.

    Parts: the teacher forward (``frozen_forward`` on channels-last vs a plain NCHW
    forward recording the graph, then ``.detach()``), the student forward + backward
    (channels-last vs NCHW) and the channel relation forward + backward on the teacher's
    feature shape (hw x hw identity vs direct Gram). Alternating, medians in seconds.
    """
    dev = resolve_device(device)
    nets = build_nets(px, seed)
    seed_nets = nets.copy()
    cl = torch.channels_last
    x = normalise(make_images(batch, px, seed), px).to(dev)
    x_cl = x.contiguous(memory_format=cl)
    teacher = nets.teacher.to(dev, memory_format=cl).eval().requires_grad_(False)
    student = nets.student.to(dev, memory_format=cl).train()
    seed_teacher = seed_nets.teacher.to(dev).eval()
    seed_student = seed_nets.student.to(dev).train()
    with torch.no_grad():
        feats = teacher.forward_kd(x_cl)["feats_7x7"].float()
    f_s = (feats + 0.1 * torch.randn_like(feats)).relu().contiguous()
    f_t = feats.contiguous()

    def cr(fn) -> None:
        fn(f_s.detach().requires_grad_(True), f_t).backward()

    def student_step(net, inp) -> None:
        net.forward_kd(inp)["logits"].sum().backward()

    parts = {
        "teacher_forward": (lambda: frozen_forward(teacher, x_cl),
                            lambda: {k: v.detach() for k, v in seed_teacher.forward_kd(x).items()}),
        "student_forward_backward": (lambda: student_step(student, x_cl),
                                     lambda: student_step(seed_student, x)),
        "channel_relation": (lambda: cr(channel_relation), lambda: cr(seed_channel_relation)),
    }
    out: dict[str, Any] = {"batch": batch, "px": px, "device": str(dev)}
    for name, (ours_fn, seed_fn) in parts.items():
        t = common.alternate(ours_fn, seed_fn, repeats, 1, sync=lambda: common.sync_device(dev),
                             desc=f"breakdown {name}")
        ours_s, base_s = common.median(t.ours), common.median(t.baseline)
        out[name] = {"ours_s": ours_s, "baseline_s": base_s,
                     "ratio": common.speed_ratio(base_s, ours_s)}
    return out


# ----------------------------------------------------------------------------- scaling


def _scaling_child(batch: int, px: int, device: str, repeats: int) -> dict[str, Any]:
    """In a fresh process: time and peak memory of the toolkit D-KD step at one batch size.

    One warm-up step (kernels, momentum buffers), then ``repeats`` timed steps. The peak
    memory covers all steps and is counted from after the networks and the batch were
    built, so it is the training working set (activations, gradients, optimizer state,
    allocator slack on CPU), not the weights.
    """
    step = ToolkitStep(dkd_task(build_nets(px)), device)
    data = {"image": normalise(make_images(batch, px), px), "label": make_labels(batch)}
    dev = resolve_device(device)
    runs: list[float] = []

    def steps() -> None:
        step(data)
        for _ in range(repeats):
            start = time.perf_counter()
            step(data)
            common.sync_device(dev)
            runs.append(time.perf_counter() - start)

    mem = common.peak_memory(steps, dev)
    return {
        "batch": batch, "px": px, "s_per_step": common.median(runs), "runs": runs,
        "s_per_image": common.median(runs) / batch,
        "peak_mib": mem["peak_bytes"] / 2**20, "memory_method": mem["method"],
    }


def scaling(batches: Sequence[int], px: int, device: str, repeats: int) -> list[dict[str, Any]]:
    """D-KD step time and peak memory per batch size, each in a fresh subprocess."""
    rows = []
    for batch in tqdm(batches, desc=f"D-KD scaling {px}px", unit="batch", leave=False):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_scaling_child",
               str(batch), str(px), str(device), str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scaling probe batch={batch} px={px} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: one comparison printed as JSON (``run.py`` runs them all)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_scaling_child"]:
        batch, px, device, repeats = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        print(json.dumps(_scaling_child(batch, px, device, repeats)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--item", choices=["dkd", "ssd", "teacher", "breakdown"], default="dkd")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.item == "teacher":
        print(json.dumps(teacher_step_time(args.batch, args.px, args.device, args.repeats), indent=2))
        return 0
    if args.item == "breakdown":
        print(json.dumps(breakdown(args.batch, args.px, args.device, args.repeats), indent=2))
        return 0
    prepare = prepare_dkd if args.item == "dkd" else prepare_ssdkd
    pair = prepare(args.batch, args.px, args.device)
    timings = time_pair(pair, args.repeats, 1, args.device, desc=args.item)
    entry = common.make_result(timings, "s/step", {"batch": args.batch, "px": args.px}, 1.5,
                               extra={"check": pair.check})
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
