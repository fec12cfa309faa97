"""kd_losses under autocast: every loss part leaves the package in float32 at least.

The networks hand float16/bfloat16 tensors to the loss under AMP; each term upcasts
them and runs with autocast off (``kd_losses/_precision.py``). Checked here under CPU
autocast with bf16 and fp16 inputs, for every part of :func:`kd_losses.d_kd` (every
method of ``DKD_FAMILY``) and of :func:`kd_losses.ssd_kd_loss`: dtype, finiteness,
closeness to the float64 result of the same rounded inputs, and gradients that reach
the low-precision inputs. Plus the channel relation times ``lambd_crkd = 1000``, the
term that capped GradScaler's scale when it came back in float16.
(float32 and float64 inputs keep their numerics: the golden tests in
``test_kd_losses.py`` run in float64 at 1e-9.)
"""

import pytest
import torch

import kd_losses as K

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numeric]

# Unit roundoff of bfloat16 (8 significant bits): a single rounding of a value to bf16
# moves it by up to U_BF16 relative (fp16, 11 bits, by up to 2^-11).
U_BF16 = 2.0**-8
# A part computed in float32 from the rounded inputs differs from the float64 result of
# the same inputs by float32 roundoff only: 2^-24 = 6e-8 per operation, a few 1e-7 after
# the softmax/KL, distance and angle chains at these sizes (observed <= 6e-7). A part
# that went through 16 bits anywhere (its result, a bmm lowered by autocast, a 16-bit
# distance matrix) carries an error of order U_BF16 = 3.9e-3 (2^-11 = 4.9e-4 for fp16).
# RTOL = U_BF16 / 256 = 1.5e-5 sits ~25x above the float32 error and 32x below one fp16
# rounding, 256x below one bf16 rounding: it separates the two cases.
RTOL = U_BF16 / 256

N, K_CLASSES, C, HW, D_S, D_T = 8, 7, 16, 3, 24, 32
CLASS_WEIGHT = [1.0, 2.0, 0.5, 1.5, 1.0, 3.0, 0.7]

# (input dtype, autocast dtype): bf16 everywhere, fp16 inputs under fp16 autocast (the
# CUDA fp16 AMP case; every op of the terms runs in float32 after the upcast, so the CPU
# supports it).
CASES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
CASE_IDS = ["bf16", "fp16"]


def _outputs(seed: int) -> tuple[dict, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 network-like outputs: logits, non-negative pooled and post-ReLU features."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    out_s = {"logits": 3 * r(N, K_CLASSES), "avg_pool": r(N, D_S).abs(),
             "feats_7x7": r(N, C, HW, HW).relu()}
    out_t = {"logits": 3 * r(N, K_CLASSES), "avg_pool": r(N, D_T).abs(),
             "feats_7x7": r(N, C, HW, HW).relu()}
    target = torch.randint(0, K_CLASSES, (N,), generator=g)
    return out_s, out_t, target, r(N, 12), r(N, 20)


def _low(d: dict, dtype: torch.dtype) -> dict:
    """The student/teacher dicts rounded to ``dtype``, student leaves requiring grad."""
    return {k: v.to(dtype) for k, v in d.items()}


def _ref(d: dict, dtype: torch.dtype) -> dict:
    """The same rounded values in float64: the reference sees exactly the inputs the
    low-precision run sees, so only the arithmetic differs."""
    return {k: v.to(dtype).double() for k, v in d.items()}


def _leaves(d: dict) -> dict:
    return {k: v.detach().requires_grad_() for k, v in d.items()}


def _check_part(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if name.startswith("n_"):  # rows kept by the error-level ranking
        assert got.dtype == torch.int64, name
        assert torch.equal(got, want), name
        return
    assert got.dtype == torch.float32, f"{name}: {got.dtype}"
    assert torch.isfinite(got).all(), name
    # see RTOL above: float32 arithmetic on the rounded inputs, nothing in 16 bits
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=0, msg=name)


def _check_grads(got: dict, want: dict) -> None:
    """Gradients reach every low-precision leaf in its dtype, finite and close to float64.

    The float32 gradient is rounded once to the leaf's dtype (relative error <= U_BF16 / 2
    for bf16) on top of float32 arithmetic, so rtol = U_BF16, with an absolute floor of
    U_BF16 * max|g| for entries near 0 (their rounding is relative to themselves, but the
    float32 sums behind them carry errors relative to the largest terms).
    """
    for k, leaf in got.items():
        if leaf.grad is None:
            assert want[k].grad is None, k
            continue
        assert leaf.grad.dtype == leaf.dtype, k
        assert torch.isfinite(leaf.grad).all(), k
        ref = want[k].grad
        atol = U_BF16 * ref.abs().max().item()
        torch.testing.assert_close(leaf.grad.double(), ref, rtol=U_BF16, atol=atol, msg=k)


def _check_parts_and_grads(got, want, low_s, ref_s):
    """Every part within its bound of the float64 reference, then the gradients of the totals."""
    for name in got:
        _check_part(name, got[name], want[name])
    got["loss"].backward()
    want["loss"].backward()
    _check_grads(low_s, ref_s)


@pytest.mark.parametrize(("dtype", "amp"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", list(K.DKD_FAMILY))
def test_every_d_kd_part_is_float32_under_autocast(method, dtype, amp):
    for seed in range(2):
        out_s, out_t, target, _, _ = _outputs(seed)
        low_s, ref_s = _leaves(_low(out_s, dtype)), _leaves(_ref(out_s, dtype))
        with torch.autocast("cpu", dtype=amp):
            got = K.d_kd(low_s, _low(out_t, dtype), target, CLASS_WEIGHT, method=method)
        want = K.d_kd(ref_s, _ref(out_t, dtype), target, CLASS_WEIGHT, method=method)
        assert set(got) == {"loss", *K.DKD_FAMILY[method].terms(K.DKDWeights())}
        _check_parts_and_grads(got, want, low_s, ref_s)


@pytest.mark.parametrize(("dtype", "amp"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("hr_w", [1.0, 0.0], ids=["hr", "no_hr"])
def test_every_ssd_kd_part_is_float32_under_autocast(dtype, amp, hr_w):
    weights = K.SSDKDWeights(hr_w=hr_w)
    for seed in range(2):
        out_s, out_t, target, proj_s, proj_t = _outputs(seed)
        low_s, ref_s = _leaves(_low(out_s, dtype)), _leaves(_ref(out_s, dtype))
        low_s["proj"] = proj_s.to(dtype).requires_grad_()
        ref_s["proj"] = proj_s.to(dtype).double().requires_grad_()
        with torch.autocast("cpu", dtype=amp):
            got = K.ssd_kd_loss(
                low_s, _low(out_t, dtype), low_s["proj"], proj_t.to(dtype),
                target[: N // 4], CLASS_WEIGHT, weights,
            )
        want = K.ssd_kd_loss(
            ref_s, _ref(out_t, dtype), ref_s["proj"], proj_t.to(dtype).double(),
            target[: N // 4], CLASS_WEIGHT, weights,
        )
        assert set(got) == {"loss", *K.SSD_KD_FAMILY["ssd_kd"].terms(weights)}
        _check_parts_and_grads(got, want, low_s, ref_s)


@pytest.mark.parametrize(("dtype", "amp"), CASES, ids=CASE_IDS)
def test_standalone_terms_are_float32_under_autocast(dtype, amp):
    """The terms used outside the two totals: the teacher head's rotation loss (phase 1),
    the view similarity, the raw distance and angle matrices."""
    out_s, _, _, proj_s, _ = _outputs(3)
    emb = out_s["avg_pool"]
    calls = {
        "rotation_ss_loss": lambda x: K.rotation_ss_loss(x[1]),
        "view_similarity": lambda x: K.view_similarity(x[1]),
        "pairwise_distances": lambda x: K.pairwise_distances(x[0]),
        "triplet_angles": lambda x: K.triplet_angles(x[0]),
    }
    for name, call in calls.items():
        low = (emb.to(dtype).requires_grad_(), proj_s.to(dtype).requires_grad_())
        with torch.autocast("cpu", dtype=amp):
            got = call(low)
        want = call((emb.to(dtype).double(), proj_s.to(dtype).double()))
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got).all(), name
        # elementwise: the diagonal of the distances is exactly 0 in both; other entries
        # are O(1), so the relative bound of RTOL applies with an absolute floor at 0
        torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=RTOL, msg=name)
        got.sum().backward()
        used = [x for x in low if x.grad is not None]
        assert used, name
        assert all(x.grad.dtype == dtype for x in used), name


def test_channel_relation_times_1000_stays_finite_for_fp16_features():
    # G = F F^T / (C h w): with F_s = a everywhere and F_t = 0, every entry of G_s is
    # a^2 hw / (C hw) = a^2 / C, so CR = a^2 / C. a = 20, C = 4: CR = 100 (exact in fp16).
    # lambd_crkd * CR = 1e5 > 65504, the largest float16: a float16 CR overflows once
    # weighted, and any GradScaler scale makes the scaled loss inf (every step skipped).
    c, a = 4, 20.0
    feat_s = torch.full((2, c, 2, 2), a, dtype=torch.float16, requires_grad=True)
    feat_t = torch.zeros(2, c, 2, 2, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        cr = K.channel_relation(feat_s, feat_t)
    assert cr.dtype == torch.float32
    assert cr.item() == a * a / c
    assert torch.isinf(cr.to(torch.float16) * 1000)  # what a float16 result would give
    weighted = 1000 * cr
    assert torch.isfinite(weighted)
    assert weighted.item() == 1e5
    assert torch.isfinite(weighted * 2.0**16)  # GradScaler's initial scale still fits
    weighted.backward()
    assert feat_s.grad.dtype == torch.float16
    assert torch.isfinite(feat_s.grad).all()


def test_channel_relation_keeps_digits_a_float16_result_would_lose():
    # A small CR (student close to the teacher): float16 keeps 11 significant bits, so a
    # float16 result is off by up to 2^-11 = 4.9e-4 relative, which lambd_crkd = 1000
    # turns into an absolute error of the same relative size in the loss. The float32
    # result of the same fp16 inputs matches the float64 reference to float32 roundoff
    # (the Gram products run in float64 inside): rtol 2^-20 = 9.5e-7 >> 2^-24.
    g = torch.Generator().manual_seed(7)
    feat_t = torch.rand(2, 8, 3, 3, generator=g, dtype=torch.float64).to(torch.float16)
    noise = 1e-2 * torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64)
    feat_s = (feat_t.double() + noise).to(torch.float16)
    ref = K.channel_relation(feat_s.double(), feat_t.double())
    with torch.autocast("cpu", dtype=torch.float16):
        cr = K.channel_relation(feat_s, feat_t)
    assert cr.dtype == torch.float32
    torch.testing.assert_close(1000 * cr.double(), 1000 * ref, rtol=2.0**-20, atol=0)
    fp16_error = abs(ref.to(torch.float16).double() - ref).item() / ref.item()
    assert fp16_error > 2.0**-20  # the float16 rounding of this value would not pass
