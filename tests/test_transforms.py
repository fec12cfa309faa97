"""Training/evaluation transforms: shapes, dtype, range, determinism under a seed."""

import cv2
import numpy as np
import pytest
import torch

from raug.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_transform,
    eval_transform,
    train_transform,
)

LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_train_transform_shape_dtype_range(image, size):
    t = train_transform(size)
    for seed in range(30):
        out = apply_transform(t, image, seed)
        assert out.shape == (3, size, size)
        assert out.dtype == torch.float32
        assert out.min().item() >= LOW - 1e-5
        assert out.max().item() <= HIGH + 1e-5


def test_train_transform_is_a_function_of_the_seed(image):
    a, b = train_transform(64), train_transform(64, seed=123)
    outs = [apply_transform(a, image, s) for s in range(40)]
    again = [apply_transform(b, image, s) for s in range(40)]
    assert all(torch.equal(x, y) for x, y in zip(outs, again))
    # the seed changes the result, and augmentation steps are drawn independently
    assert len({o.numpy().tobytes() for o in outs}) >= 25


def test_eval_transform_is_resize_and_normalise(image):
    out = apply_transform(eval_transform(32), image)
    resized = cv2.resize(image, (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    expected = (resized - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    # the same uint8 resize; normalisation in float32 here vs albumentations' float64 lookup
    # table: <= 19u = 1.1e-6 (u = 2^-24, see test_optimisations' rotation test) < 1e-5
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert torch.equal(out, apply_transform(eval_transform(32), image))


def test_flip_probabilities_are_independent(image):
    """With one shared stream the steps' on/off draws are not copies of each other."""
    t = train_transform(32)
    base = apply_transform(eval_transform(32), image)
    hflip = vflip = both = 0
    for s in range(400):
        out = apply_transform(t, image, s)
        # a flip of the uint8 image is exact (difference 0); anything else differs by at
        # least one uint8 step, 1 / 255 / 0.229 = 0.017: 1e-5 separates them on any CPU
        h = torch.allclose(out, base.flip(2), atol=1e-5)
        v = torch.allclose(out, base.flip(1), atol=1e-5)
        b = torch.allclose(out, base.flip(1).flip(2), atol=1e-5)
        hflip, vflip, both = hflip + h, vflip + v, both + b
    # untouched-by-others share ~0.28; h only ~0.5*0.8, v only ~0.5*0.2, both ~0.5*0.2
    assert vflip > 0
    assert both > 0
    assert hflip > vflip
