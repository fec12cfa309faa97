"""Image transforms: the seed's imgaug training pipeline rebuilt with albumentations.

imgaug is unmaintained; :func:`train_transform` reproduces the seed's
``ImgTrainTransform`` step by step (the mapping is documented in
``docs/engine.md``). Every transform maps an RGB ``uint8`` array (H, W, 3) to a
normalised ``float32`` tensor (3, img_size, img_size), or with ``normalise=False``
to the ``uint8`` tensor (3, img_size, img_size) before normalisation: what the
run's loaders ship (4x fewer bytes); :func:`raug.train.engine.to_device` then
normalises on the device with the same arithmetic.

Randomness: albumentations draws from the generator owned by the ``Compose``
object, never from the global numpy/python RNGs. :func:`apply_transform` reseeds
that generator per sample when a seed is given, so an augmented sample is a
pure function of (image, seed) -- which is what makes a resumed run identical to
an uninterrupted one, whatever the number of loader workers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

# ImageNet normalisation: what the backbones were pretrained with, and what every
# checkpoint records (``normalization``) for prediction.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# imgaug's CoarseDropout(0.02, size_percent=0.25) drops 2 % of the cells of a
# mask drawn at 1/4 of the image resolution: square holes of 4 px covering ~2 %.
_COARSE_HOLE_PX = 4
_COARSE_AREA_FRACTION = 0.02


def _coarse_dropout_holes(img_size: int) -> int:
    """Number of 4x4 holes that cover ~2 % of an ``img_size`` square image."""
    cells = (img_size / _COARSE_HOLE_PX) ** 2
    return max(1, round(_COARSE_AREA_FRACTION * cells))


def _normalise(mean: Sequence[float], std: Sequence[float], normalise: bool = True) -> list:
    if not normalise:  # uint8 (3, S, S): normalised on the device (raug.train.engine.to_device)
        return [ToTensorV2()]
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def train_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int | None = None,
    normalise: bool = True,
) -> A.Compose:
    """The training augmentation (albumentations equivalent of the seed's imgaug pipeline).

    Args:
        img_size: output side in pixels (square).
        mean: per-channel normalisation mean on the 0-1 scale.
        std: per-channel normalisation std on the 0-1 scale.
        seed: seed of the pipeline's own generator (``None``: fresh entropy).
        normalise: ``False`` leaves out the normalisation (``mean``/``std`` unused):
            the output is the ``uint8`` tensor the device normalises.

    Returns:
        A ``Compose`` taking ``image=`` (H, W, 3) ``uint8`` RGB and returning
        ``{"image": float32 tensor (3, img_size, img_size)}`` (``uint8`` when not
        ``normalise``).
    """
    holes = _coarse_dropout_holes(img_size)
    steps = [
        # zoom 1-2x about the centre at constant size = scale up, then centre crop
        A.Affine(scale={"x": (1.0, 2.0), "y": (1.0, 2.0)}, p=0.25),
        A.Resize(img_size, img_size),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.2),
        # imgaug mode="symmetric" repeats the edge pixel = OpenCV BORDER_REFLECT
        A.Affine(rotate=(-120, 120), border_mode=cv2.BORDER_REFLECT, p=0.25),
        # blur_limit=0: kernel size follows sigma, as imgaug's GaussianBlur does
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.0, 1.5), p=0.25),
        A.OneOf(
            [
                A.PixelDropout(dropout_prob=0.025, p=1.0),
                A.CoarseDropout(
                    num_holes_range=(holes, holes),
                    hole_height_range=(_COARSE_HOLE_PX, _COARSE_HOLE_PX),
                    hole_width_range=(_COARSE_HOLE_PX, _COARSE_HOLE_PX),
                    p=1.0,
                ),
            ],
            p=0.1,
        ),
        A.OneOf(
            [
                # imgaug Add((-15, 15), per_channel=0.5): same shift on all channels
                # or an independent shift per channel, with equal odds
                A.OneOf(
                    [
                        A.RandomBrightnessContrast(
                            brightness_limit=(-15 / 255, 15 / 255),
                            contrast_limit=(0.0, 0.0),
                            brightness_by_max=True,
                            p=1.0,
                        ),
                        A.RGBShift(r_shift_limit=15, g_shift_limit=15, b_shift_limit=15, p=1.0),
                    ],
                    p=1.0,
                ),
                A.HueSaturationValue(
                    hue_shift_limit=10, sat_shift_limit=10, val_shift_limit=0, p=1.0
                ),
            ],
            p=0.25,
        ),
        *_normalise(mean, std, normalise),
    ]
    compose = A.Compose(steps)
    seed_transform(compose, seed)
    return compose


def eval_transform(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalise: bool = True,
) -> A.Compose:
    """Evaluation transform: resize to a square ``img_size`` and normalise (no randomness).

    ``normalise=False``: the resized ``uint8`` tensor, normalised later on the device.
    """
    return A.Compose([A.Resize(img_size, img_size), *_normalise(mean, std, normalise)])


def seed_transform(transform: A.Compose, seed: int | None) -> None:
    """Make every step of ``transform`` draw from ONE pair of generators seeded with ``seed``.

    albumentations' own ``Compose(seed=...)``/``set_random_seed`` gives each step
    a separate generator with the *same* seed, so the steps' first draws are
    identical and their on/off decisions correlated (e.g. a vertical flip would
    only ever happen together with a horizontal one). Sharing one stream keeps
    the draws independent.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def apply_transform(transform: A.Compose, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
    """Run ``transform`` on one RGB ``uint8`` image, reseeding it first when ``seed`` is given.

    Args:
        transform: a pipeline from :func:`train_transform` or :func:`eval_transform`.
        image: (H, W, 3) ``uint8`` RGB array.
        seed: per-sample seed; ``None`` keeps drawing from the pipeline's current state.

    Returns:
        The transformed image as a contiguous tensor (3, H', W'): ``float32``, or
        ``uint8`` for a pipeline built with ``normalise=False``.
    """
    if seed is not None:
        seed_transform(transform, int(seed))
    out = transform(image=image)["image"]
    if out.dtype == torch.uint8:
        return out.contiguous()
    return out.float().contiguous()
