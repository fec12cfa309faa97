"""Stand-ins for benchmarks and tests: dermoscopy-like images and "alive" random networks.

A freshly initialised network is a poor stand-in for a trained one: its BatchNorm layers hold
the default running statistics (mean 0, variance 1), so activations shrink or blow up layer
after layer. The outputs then barely depend on the input (every image gets the same class)
and the tiny values can be subnormal floats, which makes CPU timings meaningless.
:func:`demo_model` re-estimates the BatchNorm statistics on synthetic images and scales the
classifier by a probe onto the main directions of feature variation, giving input-dependent,
non-degenerate predictions and activation ranges like a trained model's -- enough for latency, size and agreement checks,
not for accuracy.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

import models
from raug.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raug.deploy.preprocess import preprocess

#: The eight ISIC 2019 diagnoses in label (alphabetical) order, as the engine writes them.
DEMO_CLASSES = ("AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC")


def synthetic_images(num: int, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    """Dermoscopy-like RGB ``uint8`` images: skin field, dark vignette, one textured lesion.

    Args:
        num: number of images.
        size: side in pixels (square).
        seed: random seed; the same seed gives the same images.

    Returns:
        ``num`` arrays of shape ``(size, size, 3)``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for _ in range(num):
        skin = rng.uniform([170, 110, 90], [240, 190, 160]).astype(np.float32)
        img = np.broadcast_to(skin, (size, size, 3)).copy()
        img += rng.normal(0, 6, (size, size, 3)).astype(np.float32)
        cx, cy = rng.uniform(0.3, 0.7, 2)
        ax, ay = rng.uniform(0.08, 0.3, 2)
        angle = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / ax
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ay
        lesion = np.clip(1.2 - np.sqrt(u**2 + v**2), 0, 1)[..., None]
        # brown-to-black lesion colours (R > G > B) with a blotchy, mostly grey texture
        darkness = rng.uniform(0.25, 0.8)
        colour = (skin * darkness * rng.uniform([0.75, 0.55, 0.45], [0.95, 0.75, 0.7]))
        blotches = rng.normal(0, 25, (8, 8, 1)) + rng.normal(0, 8, (8, 8, 3))
        texture = cv2.resize(blotches.astype(np.float32), (size, size))
        img = img * (1 - lesion) + (colour + texture) * lesion
        vignette = np.clip(1.6 - 2.2 * np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2), 0, 1)
        images.append(np.clip(img * vignette[..., None], 0, 255).astype(np.uint8))
    return images


def synthetic_batch(
    num: int, size: int, mean: tuple, std: tuple, seed: int = 0
) -> np.ndarray:
    """:func:`synthetic_images` preprocessed into a ``(num, 3, size, size)`` float32 batch."""
    return np.stack([preprocess(img, size, mean, std) for img in synthetic_images(num, size, seed)])


def recalibrate_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int = 16) -> None:
    """Replace every BatchNorm's running statistics by their average over ``inputs``.

    Args:
        model: any network (left in eval mode).
        inputs: ``(N, C, H, W)`` inputs on the model's device.
        batch_size: batch size of the statistics passes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all passes
    model.train()
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size])
    for bn in norms:
        bn.momentum = 0.1
    model.eval()


def shrink_residual_branches(model: nn.Module, scale: float) -> None:
    """Scale the last BatchNorm weight of every residual branch by ``scale``.

    A randomly initialised BatchNorm network is chaotic: each block amplifies a small
    perturbation of its input, so int8 rounding noise doubles every couple of blocks and
    drowns the signal (measured here: 73 % relative error on MobileNet-V2's pooled features).
    Trained residual networks behave far more tamely, partly because their residual branches
    stay small (the "zero-init residual" start of Goyal et al. 2017 makes them exactly zero).
    Shrinking the branches brings the stand-in closer to that regime.

    Args:
        model: a project model (torchvision ``InvertedResidual`` / ``Bottleneck`` blocks).
        scale: factor for the branch's final BatchNorm weight (1 = unchanged).
    """
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "use_res_connect", False):  # MobileNet-V2 inverted residual
                module.conv[-1].weight.mul_(scale)
            elif isinstance(getattr(module, "bn3", None), nn.BatchNorm2d):  # ResNet bottleneck
                module.bn3.weight.mul_(scale)


def demo_model(
    name: str,
    num_classes: int = 8,
    img_size: int = 224,
    seed: int = 0,
    logit_std: float = 2.0,
    mean: tuple = (0.485, 0.456, 0.406),
    std: tuple = (0.229, 0.224, 0.225),
    num_images: int = 48,
    residual_scale: float = 0.2,
) -> nn.Module:
    """A random-weight project model with realistic activations and spread-out logits.

    The backbone keeps its random weights, with residual branches shrunk
    (:func:`shrink_residual_branches`) and BatchNorm statistics re-estimated on synthetic
    images. The classifier is replaced by a linear probe onto the ``num_classes`` principal
    directions of the pooled features over those images, whitened and scaled to
    ``logit_std``: like a trained head, it reads the strongest input-dependent variation of
    the features, not the tiny residue a random head would see (which any rounding, e.g.
    int8, would swamp).

    Args:
        name: ``"mobilenet"`` or ``"resnet-50"``.
        num_classes: K (at most ``num_images``).
        img_size: image side used for the statistics.
        seed: weight and image seed.
        logit_std: standard deviation of each logit across the synthetic images.
        mean: normalisation mean of the inputs.
        std: normalisation std of the inputs.
        num_images: synthetic images for the BatchNorm statistics and the probe.
        residual_scale: see :func:`shrink_residual_branches`.

    Returns:
        The model in eval mode on the CPU.
    """
    torch.manual_seed(seed)
    model = models.create_model(name, num_classes, pretrained=False)
    shrink_residual_branches(model, residual_scale)
    inputs = torch.from_numpy(synthetic_batch(num_images, img_size, mean, std, seed=seed + 1))
    recalibrate_batchnorm(model, inputs)
    with torch.no_grad():
        pooled = torch.cat(
            [
                model.forward_head(model.forward_features(inputs[i : i + 16]), pre_logits=True)
                for i in range(0, num_images, 16)
            ]
        ).double()
        centre = pooled.mean(dim=0)
        _, sing, vh = torch.linalg.svd(pooled - centre, full_matrices=False)
        scale = logit_std * (num_images - 1) ** 0.5 / sing[:num_classes].clamp_min(1e-12)
        weight = vh[:num_classes] * scale[:, None]
        model.classifier.weight.copy_(weight.float())
        model.classifier.bias.copy_((-weight @ centre).float())
    return model


def demo_checkpoint_payload(
    model: nn.Module, img_size: int, model_name: str = "mobilenet", **overrides: object
) -> dict:
    """A self-describing checkpoint dict for ``model``, as the engine would save it.

    Args:
        model: a project model with :data:`DEMO_CLASSES` outputs (e.g. :func:`demo_model`).
        img_size: the input side recorded as ``img_size``.
        model_name: the architecture recorded as ``model_name``.
        **overrides: keys to replace or add (e.g. ``data_preparation``).

    Returns:
        The payload for :func:`raug.files.checkpoint.save_checkpoint`.
    """
    payload = {
        "model_name": model_name,
        "num_classes": len(DEMO_CLASSES),
        "class_names": list(DEMO_CLASSES),
        "img_size": img_size,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "model_state_dict": model.state_dict(),
        "epoch": 3,
        "config": {},
        "metrics": {},
    }
    payload.update(overrides)
    return payload
