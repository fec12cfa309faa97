"""kd_losses: golden values of the seed, invariants, gradients, ranking, views, dtypes."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kd_losses as K

GOLDEN = Path(__file__).parent / "data" / "kd_reference.npz"
RTOL = 1e-9


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numeric]


@pytest.fixture(scope="module")
def ref():
    with np.load(GOLDEN) as data:
        return {k: torch.from_numpy(data[k].copy()) for k in data.files}


def _outs(ref):
    out_s = {"logits": ref["logits_s"], "avg_pool": ref["pool_s"], "feats_7x7": ref["feat_s"]}
    out_t = {"logits": ref["logits_t"], "avg_pool": ref["pool_t"], "feats_7x7": ref["feat_t"]}
    return out_s, out_t


def _ssd(ref, rtf, rss):
    return K.ssd_kd_terms(
        ref["ssd_logits_s"],
        ref["ssd_logits_t"],
        ref["ssd_proj_s"],
        ref["ssd_proj_t"],
        ref["ssd_target"],
        ref["class_weight"],
        K.SSDKDWeights(ratio_tf=rtf, ratio_ss=rss),
    )


GOLDEN_CALLS = {
    "soft_kd_T5": lambda r: K.soft_kd(r["logits_s"], r["logits_t"], T=5),
    "rkd_distance": lambda r: K.rkd_distance(r["pool_s"], r["pool_t"]),
    "rkd_angle": lambda r: K.rkd_angle(r["pool_s"], r["pool_t"]),
    "channel_relation": lambda r: K.channel_relation(r["feat_s"], r["feat_t"]),
    "fitnet_mse": lambda r: K.fitnet(r["feat_s"], r["feat_t"]),
    "blkd_total": lambda r: K.d_kd(*_outs(r), r["target"], r["class_weight"], method="blkd")[
        "loss"
    ],
    "d_kd_total_drkd1_crkd1000": lambda r: K.d_kd(
        *_outs(r), r["target"], r["class_weight"],
        weights=K.DKDWeights(lambd=0.5, T=5, relational=K.RelationalWeights(1, 1000)),
    )["loss"],
    "d_kd_total_drkd2_crkd10": lambda r: K.d_kd(
        *_outs(r), r["target"], r["class_weight"],
        weights=K.DKDWeights(relational=K.RelationalWeights(lambd_drkd=2, lambd_crkd=10)),
    )["loss"],
    "teacher_ss_loss": lambda r: K.rotation_ss_loss(r["ssd_proj_t"]),
    "student_ss_loss": lambda r: K.rotation_ss_loss(r["ssd_proj_s"]),
}
for _rtf, _rss in ((1, 0.75), (0.5, 0.25)):
    for _k in ("ce", "kd", "tf", "ss", "n_tf", "n_ss"):
        GOLDEN_CALLS[f"ssd_{_k}_rtf{_rtf}_rss{_rss}"] = lambda r, k=_k, a=float(_rtf), b=_rss: _ssd(
            r, a, b
        )[k]


@pytest.mark.parametrize("key", sorted(GOLDEN_CALLS))
def test_reproduces_seed_golden_values(ref, key):
    got = GOLDEN_CALLS[key](ref)
    want = ref[key]
    if key.startswith(("ssd_n_tf", "ssd_n_ss")):
        assert int(got) == int(want)
    else:
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(float(want), rel=RTOL, abs=0)


def test_golden_file_is_fully_covered(ref):
    inputs = {
        "logits_s",
        "logits_t",
        "target",
        "class_weight",
        "pool_s",
        "pool_t",
        "feat_s",
        "feat_t",
        "ssd_logits_s",
        "ssd_logits_t",
        "ssd_proj_s",
        "ssd_proj_t",
        "ssd_target",
    }
    assert set(ref) - inputs == set(GOLDEN_CALLS)


# ---------------------------------------------------------------- helpers


def direct_channel_relation(f_s, f_t):
    """The direct Gram formula (independent reference)."""
    n, c, h, w = f_s.shape
    a, b = f_s.reshape(n, c, h * w), f_t.reshape(n, c, h * w)
    g_s = a @ a.transpose(1, 2) / (c * h * w)
    g_t = b @ b.transpose(1, 2) / (c * h * w)
    return ((g_s - g_t) ** 2).mean().sqrt()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# ---------------------------------------------------------------- weighted CE / soft KD


def test_weighted_ce_is_weighted_mean_and_accepts_lists():
    z, y = _rand(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    w = [1.0, 2.0, 0.5, 3.0]
    nll = -torch.log_softmax(z, 1)[torch.arange(6), y]
    wy = torch.tensor(w, dtype=z.dtype)[y]
    assert float(K.weighted_ce(z, y, w)) == pytest.approx(
        float((wy * nll).sum() / wy.sum()), rel=1e-12
    )
    assert float(K.weighted_ce(z, y)) == pytest.approx(float(nll.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="class_weight has shape"):
        K.weighted_ce(z, y, [1.0, 2.0])


def test_soft_kd_has_no_t_squared_and_is_kl():
    z_s, z_t = _rand(5, 8, seed=1), _rand(5, 8, seed=2)
    p_t = torch.softmax(z_t / 3, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s / 3, 1))).sum(1).mean()
    assert float(K.soft_kd(z_s, z_t, 3.0)) == pytest.approx(float(kl), rel=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        K.soft_kd(z_s, z_t, 0)


# ---------------------------------------------------------------- invariants


def test_terms_vanish_when_student_equals_teacher():
    z, e, f = _rand(6, 8), _rand(6, 16, seed=1), _rand(6, 12, 3, 3, seed=2)
    assert float(K.soft_kd(z, z.clone(), 4.0)) == pytest.approx(0.0, abs=1e-15)
    assert float(K.rkd_distance(e, e.clone())) == 0.0
    assert float(K.rkd_angle(e, e.clone())) == 0.0
    assert float(K.fitnet(f, f.clone())) == 0.0
    assert float(K.channel_relation(f, f.clone())) == 0.0
    z4, p4, y = _rand(8, 5, seed=3), _rand(8, 7, seed=4), torch.tensor([1, 4])
    terms = K.ssd_kd_terms(z4, z4.clone(), p4, p4.clone(), y)
    for key in ("kd", "tf", "ss"):
        assert float(terms[key]) == pytest.approx(0.0, abs=1e-14)


def _student_teacher_pairs():
    return {
        "soft_kd": (lambda s, t: K.soft_kd(s, t, 4.0), (6, 8), (6, 8)),
        "rkd_distance": (K.rkd_distance, (6, 16), (6, 24)),
        "rkd_angle": (K.rkd_angle, (6, 16), (6, 24)),
        "channel_relation": (K.channel_relation, (4, 12, 3, 3), (4, 12, 3, 3)),
        "fitnet": (K.fitnet, (4, 12, 3, 3), (4, 12, 3, 3)),
    }


@pytest.mark.parametrize("name", sorted(_student_teacher_pairs()))
def test_gradients_reach_only_the_student(name):
    fn, s_shape, t_shape = _student_teacher_pairs()[name]
    s = _rand(*s_shape, seed=5).requires_grad_(True)
    t = _rand(*t_shape, seed=6).requires_grad_(True)
    fn(s, t).backward()
    assert t.grad is None
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_composite_losses_leave_teacher_without_gradient():
    out_s = {
        "logits": _rand(8, 5, seed=1),
        "avg_pool": _rand(8, 6, seed=2),
        "feats_7x7": _rand(8, 4, 2, 2, seed=3),
    }
    out_t = {
        "logits": _rand(8, 5, seed=4),
        "avg_pool": _rand(8, 9, seed=5),
        "feats_7x7": _rand(8, 4, 2, 2, seed=6),
    }
    for d in (out_s, out_t):
        for v in d.values():
            v.requires_grad_(True)
    proj_s, proj_t = (
        _rand(8, 3, seed=7).requires_grad_(True),
        _rand(8, 3, seed=8).requires_grad_(True),
    )
    K.ssd_kd_loss(out_s, out_t, proj_s, proj_t, torch.tensor([0, 3]))["loss"].backward()
    K.d_kd(out_s, out_t, torch.arange(8) % 5)["loss"].backward()
    assert all(v.grad is None for v in out_t.values())
    assert proj_t.grad is None
    assert all(v.grad is not None for v in out_s.values())
    assert proj_s.grad is not None


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "channel_relation"])
def test_relational_terms_permutation(name):
    fn, s_shape, t_shape = _student_teacher_pairs()[name]
    s, t = _rand(*s_shape, seed=9), _rand(*t_shape, seed=10)
    perm = torch.tensor([2, 0, 3, 1, *range(4, s.shape[0])])
    base = float(fn(s, t))
    assert float(fn(s[perm], t[perm])) == pytest.approx(base, rel=1e-12)
    assert abs(float(fn(s[perm], t)) - base) > 1e-6 * base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    z_s, z_t = _rand(8, 5, seed=1, dtype=dtype), _rand(8, 5, seed=2, dtype=dtype)
    e_s, e_t = _rand(8, 6, seed=3, dtype=dtype), _rand(8, 7, seed=4, dtype=dtype)
    f_s, f_t = _rand(8, 4, 2, 2, seed=5, dtype=dtype), _rand(8, 4, 2, 2, seed=6, dtype=dtype)
    y2, y8 = torch.tensor([0, 4]), torch.arange(8) % 5
    cw = torch.ones(5, dtype=torch.float64)  # deliberately another dtype
    out_s = {"logits": z_s, "avg_pool": e_s, "feats_7x7": f_s}
    out_t = {"logits": z_t, "avg_pool": e_t, "feats_7x7": f_t}
    results = [
        K.weighted_ce(z_s, y8, cw),
        K.soft_kd(z_s, z_t, 4.0),
        K.rkd_distance(e_s, e_t),
        K.rkd_angle(e_s, e_t),
        K.channel_relation(f_s, f_t),
        K.fitnet(f_s, f_t),
        K.rotation_ss_loss(e_s),
        K.d_kd(out_s, out_t, y8, cw)["loss"],
        *(
            v
            for k, v in K.ssd_kd_terms(z_s, z_t, e_s, e_t, y2, cw).items()
            if not k.startswith("n_")
        ),
        K.ssd_kd_loss(out_s, out_t, e_s, e_t, y2, cw)["loss"],
    ]
    for r in results:
        assert r.dtype == dtype
        assert r.dim() == 0
        assert torch.isfinite(r)


@pytest.mark.parametrize("term", [K.rkd_distance, K.rkd_angle])
def test_rkd_anchor_rows_partition_the_loss_and_its_gradient(term):
    """Per-rank anchors (issue #16): the parts of a partition of the rows rebuild the loss.

    Equal parts average to the full loss, unequal parts weighted by their size do too,
    and so do the gradients, i.e. what data-parallel ranks computing only their own
    anchors against the global batch add up to. Float64: the claim is an identity, only
    the summation order differs (~1e-16 relative), so 1e-12 is a wide margin.
    """
    s = _rand(12, 6, seed=21).requires_grad_(True)
    t = _rand(12, 9, seed=22)
    full = term(s, t)
    (full_grad,) = torch.autograd.grad(full, s)
    for parts in ([slice(0, 4), slice(4, 8), slice(8, 12)], [slice(0, 5), slice(5, 12)]):
        sizes = [p.stop - p.start for p in parts]
        values = [term(s, t, anchors=p) for p in parts]
        total = sum(n * v for n, v in zip(sizes, values)) / 12
        (grad,) = torch.autograd.grad(total, s)
        assert total.item() == pytest.approx(full.item(), rel=1e-12)
        assert torch.allclose(grad, full_grad, rtol=1e-12, atol=1e-15)
        assert len({round(v.item(), 6) for v in values}) == len(values)  # parts really differ
    assert term(s, t, anchors=slice(0, 12)).item() == pytest.approx(full.item(), rel=1e-15)
    with pytest.raises(ValueError, match=r"anchors slice\(10, 14, None\) is not a non-empty run"):
        term(s, t, anchors=slice(10, 14))
    with pytest.raises(ValueError, match="anchors"):
        term(s, t, anchors=slice(0, 12, 2))


def test_rkd_angle_anchor_rows_need_only_their_triplets():
    """The angles of anchors A are the rows A of the full N x N x N cosine block.

    Float64 cosines of 5-term sums; a kernel may block the smaller batch differently,
    which moves the last bit (~1e-16): 1e-14 absolute.
    """
    e = _rand(7, 5, seed=23)
    full = K.triplet_angles(e).reshape(7, 7, 7)
    assert torch.allclose(K.triplet_angles(e, slice(2, 5)).reshape(3, 7, 7), full[2:5],
                          rtol=0, atol=1e-14)


def test_rkd_distance_of_a_single_sample_is_zero_not_nan():
    s = _rand(1, 4).requires_grad_(True)
    loss = K.rkd_distance(s, _rand(1, 6, seed=1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_shape_errors_name_the_term():
    with pytest.raises(ValueError, match=r"channel_relation.*adapter"):
        K.channel_relation(_rand(2, 3, 4, 4), _rand(2, 5, 4, 4))
    with pytest.raises(ValueError, match="rkd_distance: student batch 3 != teacher batch 4"):
        K.rkd_distance(_rand(3, 4), _rand(4, 4))


# ---------------------------------------------------------------- channel relation


def test_channel_relation_matches_direct_formula_value_and_gradient_float64():
    f_s = _rand(3, 20, 4, 4, seed=11).requires_grad_(True)
    f_t = _rand(3, 20, 4, 4, seed=12)
    ours = K.channel_relation(f_s, f_t)
    (g_ours,) = torch.autograd.grad(ours, f_s)
    ref = direct_channel_relation(f_s, f_t)
    (g_ref,) = torch.autograd.grad(ref, f_s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-16)


def test_channel_relation_gradcheck():
    f_t = _rand(2, 5, 2, 3, seed=13)
    f_s = _rand(2, 5, 2, 3, seed=14).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: K.channel_relation(x, f_t), (f_s,))


def test_channel_relation_float32_close_student_is_accurate():
    # f_t = f_s + 0.01 noise: the three norms of the identity nearly cancel
    f_s64 = _rand(4, 256, 7, 7, seed=15).relu()
    f_t64 = f_s64 + 0.01 * _rand(4, 256, 7, 7, seed=16)
    truth = direct_channel_relation(f_s64.requires_grad_(True), f_t64)
    (g_truth,) = torch.autograd.grad(truth, f_s64)
    f_s = f_s64.detach().float().requires_grad_(True)
    f_t = f_t64.float()
    ours = K.channel_relation(f_s, f_t)
    (g_ours,) = torch.autograd.grad(ours, f_s)
    direct32 = direct_channel_relation(f_s.detach(), f_t)
    assert ours.dtype == torch.float32
    # ours: float64 products of float32-rounded inputs (u = 2^-24 = 6e-8), ~100x amplified
    # by the 1 % difference: ~6e-6; direct32: float32 Grams of length hw = 49 differenced at
    # 1 % of their size: u * sqrt(49) * 100 = 4e-5 (entries' errors average further). < 1e-4
    assert ours.item() == pytest.approx(truth.item(), rel=1e-4)
    assert ours.item() == pytest.approx(direct32.item(), rel=1e-4)
    assert float((g_ours.double() - g_truth).norm() / g_truth.norm()) < 1e-4


def test_channel_relation_at_zero_has_zero_gradient_not_nan():
    f = _rand(2, 6, 3, 3, seed=17, dtype=torch.float32)
    f_s = f.clone().requires_grad_(True)
    loss = K.channel_relation(f_s, f.clone())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(f_s.grad, torch.zeros_like(f))


# ---------------------------------------------------------------- views and ranking


def test_rotate_views_layout_and_direction():
    x = _rand(2, 3, 4, 4, seed=18)
    v = K.rotate_views(x)
    assert v.shape == (8, 3, 4, 4)
    for i in range(2):
        hwc = x[i].permute(1, 2, 0).numpy()
        for r in range(4):
            # the seed rotated H x W x C arrays with np.rot90 (counter-clockwise)
            want = torch.from_numpy(np.rot90(hwc, r).copy()).permute(2, 0, 1)
            assert torch.equal(v[4 * i + r], want)
    ccw = K.rotate_views(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))[1, 0]
    assert ccw.tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert K.view_labels(torch.tensor([3, 5])).tolist() == [3, 3, 3, 3, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="H == W"):
        K.rotate_views(torch.zeros(1, 3, 4, 6))


def test_view_similarity_equals_seed_cosine_construction():
    proj = _rand(12, 5, seed=19)
    b = 3
    nor = proj[torch.arange(12) % 4 == 0]
    aug = proj[torch.arange(12) % 4 != 0]
    nor_e = nor.unsqueeze(2).expand(-1, -1, 3 * b).transpose(0, 2)
    aug_e = aug.unsqueeze(2).expand(-1, -1, b)
    seed_sim = F.cosine_similarity(aug_e, nor_e, dim=1)
    torch.testing.assert_close(K.view_similarity(proj), seed_sim, rtol=1e-12, atol=1e-14)
    own = torch.arange(b).repeat_interleave(3)
    assert float(K.rotation_ss_loss(proj)) == pytest.approx(
        float(F.cross_entropy(seed_sim, own)), rel=1e-12
    )


# Teacher logits of the 6 rotated rows of 2 images with labels (0, 2): ranks 0,2,1,0,2,1.
ROT_LOGITS_T = torch.tensor(
    [[5.0, 1, 0], [1, 3, 2], [2, 3, 1], [0, 0, 5], [1, 2, 0], [0, 1, 0.5]], dtype=torch.float64
)
ROT_OWN = torch.tensor([0, 0, 0, 2, 2, 2])


@pytest.mark.parametrize(
    ("ratio", "kept"),
    [
        (1.0, [1, 1, 1, 1, 1, 1]),
        (0.75, [1, 1, 1, 1, 0, 1]),  # 3 wrong: both rank-1 rows, then the first rank-2 row
        (0.5, [1, 0, 1, 1, 0, 1]),  # 2 wrong: the two rank-1 rows
        (0.25, [1, 0, 1, 1, 0, 0]),  # 1 wrong: tie between rank-1 rows, earlier row wins
        (0.0, [1, 0, 0, 1, 0, 0]),
    ],
)
def test_error_level_ranking_by_hand(ratio, kept):
    mask, n = K.error_level_mask(torch.softmax(ROT_LOGITS_T / 4, 1), ROT_OWN, ratio)
    assert mask.tolist() == [bool(k) for k in kept]
    assert int(n) == sum(kept)


def test_error_level_rank_ties_between_classes_keep_class_order():
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    mask, n = K.error_level_mask(scores, torch.tensor([0, 1]), 0.0)
    assert mask.tolist() == [True, False]
    assert int(n) == 1


@pytest.mark.parametrize(("ratio_tf", "n_expected"), [(1.0, 6), (0.5, 4), (0.25, 3)])
def test_ssd_tf_term_averages_exactly_the_kept_rows(ratio_tf, n_expected):
    logits_t = torch.zeros(8, 3, dtype=torch.float64)
    rot_rows = [1, 2, 3, 5, 6, 7]
    logits_t[rot_rows] = ROT_LOGITS_T
    logits_s = _rand(8, 3, seed=20)
    proj = _rand(8, 4, seed=21)
    out = K.ssd_kd_terms(logits_s, logits_t, proj, proj, torch.tensor([0, 2]),
                          weights=K.SSDKDWeights(ratio_tf=ratio_tf))
    assert int(out["n_tf"]) == n_expected
    mask, _ = K.error_level_mask(ROT_LOGITS_T, ROT_OWN, ratio_tf)
    s, t = logits_s[rot_rows][mask], ROT_LOGITS_T[mask]
    want = 16 * F.kl_div(
        torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1), reduction="batchmean"
    )
    assert float(out["tf"]) == pytest.approx(float(want), rel=1e-12)


def test_ssd_ss_ranking_by_hand():
    e = torch.eye(3, dtype=torch.float64)
    proj_t = torch.zeros(12, 3, dtype=torch.float64)
    proj_t[[0, 4, 8]] = e  # normal views of images 0, 1, 2
    # rotated rows: image 0 -> (own, other, own); image 1 -> (own, own, other);
    # image 2 -> (other, other, own): 5 right rows, 4 wrong rows of rank 1
    # (e.g. e1 + 0.4 e0 is closest to image 1, then to its own image 0).
    proj_t[[1, 3]] = e[0]
    proj_t[2] = e[1] + 0.4 * e[0]
    proj_t[[5, 6]] = e[1]
    proj_t[7] = e[2] + 0.4 * e[1]
    proj_t[[9, 10]] = e[0] + 0.4 * e[2]
    proj_t[11] = e[2]
    args = (_rand(12, 4, seed=22), _rand(12, 4, seed=23), _rand(12, 5, seed=24), proj_t)
    target = torch.tensor([0, 1, 2])
    for ratio, n_ss in ((0.0, 5), (0.25, 6), (0.5, 7), (0.75, 8), (1.0, 9)):
        assert int(K.ssd_kd_terms(*args, target, weights=K.SSDKDWeights(ratio_ss=ratio))["n_ss"]) == n_ss
    sim_t = K.view_similarity(proj_t)
    mask, _ = K.error_level_mask(sim_t, torch.arange(3).repeat_interleave(3), 0.5)
    # wrong rows (rotated indices 1, 5, 6, 7) tie at rank 1: the first two are kept
    assert mask.tolist() == [True, True, True, True, True, True, False, False, True]


def test_ssd_rejects_bad_layouts():
    with pytest.raises(ValueError, match="4 views per image"):
        K.ssd_kd_terms(_rand(6, 3), _rand(6, 3), _rand(6, 2), _rand(6, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="target must hold the 2 image labels"):
        K.ssd_kd_terms(_rand(8, 3), _rand(8, 3), _rand(8, 2), _rand(8, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="ratio"):
        K.error_level_mask(_rand(3, 3), torch.zeros(3, dtype=torch.long), 1.5)


# ---------------------------------------------------------------- composition


def _full_outs(n=8):
    out_s = {
        "logits": _rand(n, 5, seed=1),
        "avg_pool": _rand(n, 6, seed=2),
        "feats_7x7": _rand(n, 4, 2, 2, seed=3),
    }
    out_t = {
        "logits": _rand(n, 5, seed=4),
        "avg_pool": _rand(n, 9, seed=5),
        "feats_7x7": _rand(n, 4, 2, 2, seed=6),
    }
    return out_s, out_t


@pytest.mark.parametrize(
    ("method", "keys"),
    [
        ("none", {"ce"}),
        ("blkd", {"ce", "kd"}),
        ("rkd", {"ce", "kd", "rkd_distance", "rkd_angle"}),
        ("crkd", {"ce", "kd", "channel_relation"}),
        ("d_kd", {"ce", "kd", "rkd_distance", "rkd_angle", "channel_relation"}),
        ("fitnet", {"ce", "fitnet"}),
    ],
)
def test_d_kd_methods_terms_and_weighting(method, keys):
    out_s, out_t = _full_outs()
    y, cw = torch.arange(8) % 5, torch.tensor([1.0, 2, 3, 1, 0.5], dtype=torch.float64)
    r = K.d_kd(
        out_s,
        out_t,
        y,
        cw,
        method=method,
        weights=K.DKDWeights(lambd=0.3, T=2.0, lambd_fitnet=3.0,
                             relational=K.RelationalWeights(lambd_drkd=2.0, lambd_crkd=7.0)),
    )
    assert set(r) == keys | {"loss"}
    ce = K.weighted_ce(out_s["logits"], y, cw)
    torch.testing.assert_close(r["ce"], ce)
    if method == "none":
        want = ce
    elif method == "fitnet":
        want = ce + 3.0 * K.fitnet(out_s["feats_7x7"], out_t["feats_7x7"])
    else:
        want = 0.7 * ce + 0.3 * 4.0 * K.soft_kd(out_s["logits"], out_t["logits"], 2.0)
        if "rkd_angle" in keys:
            want = want + 2.0 * (25 * r["rkd_distance"] + 50 * r["rkd_angle"])
        if "channel_relation" in keys:
            want = want + 7.0 * r["channel_relation"]
    assert float(r["loss"]) == pytest.approx(float(want), rel=1e-12)


def test_d_kd_does_not_touch_inactive_inputs_and_rejects_unknown_methods():
    out_s, out_t = _full_outs()
    y = torch.arange(8) % 5
    # blkd needs logits only: missing feature keys prove the relational terms are skipped
    logits_only = K.d_kd({"logits": out_s["logits"]}, {"logits": out_t["logits"]}, y, method="blkd")
    assert set(logits_only) == {"loss", "ce", "kd"}
    with pytest.raises(ValueError, match="avg_pool"):
        K.d_kd({"logits": out_s["logits"]}, {"logits": out_t["logits"]}, y, method="rkd")
    with pytest.raises(ValueError, match="none, blkd, rkd, crkd, d_kd, fitnet"):
        K.d_kd(out_s, out_t, y, method="ssd")
    assert K.KD_METHODS == ("none", "blkd", "rkd", "crkd", "d_kd", "fitnet")


def test_ssd_kd_loss_composes_all_parts():
    out_s, out_t = _full_outs()
    proj_s, proj_t, y = _rand(8, 3, seed=7), _rand(8, 4, seed=8), torch.tensor([0, 3])
    r = K.ssd_kd_loss(out_s, out_t, proj_s, proj_t, y, weights=K.SSDKDWeights(
        hr_w=0.5, relational=K.RelationalWeights(lambd_drkd=2.0, lambd_crkd=3.0)))
    assert set(r) == {
        "loss",
        "ce",
        "kd",
        "tf",
        "ss",
        "hr",
        "rkd_distance",
        "rkd_angle",
        "channel_relation",
        "n_tf",
        "n_ss",
    }
    hr = 2.0 * (25 * r["rkd_distance"] + 50 * r["rkd_angle"]) + 3.0 * r["channel_relation"]
    assert float(r["hr"]) == pytest.approx(float(hr), rel=1e-12)
    want = 0.1 * r["ce"] + 0.9 * r["kd"] + 2.7 * r["tf"] + 10 * r["ss"] + 0.5 * hr
    assert float(r["loss"]) == pytest.approx(float(want), rel=1e-12)
    terms = K.ssd_kd_terms(out_s["logits"], out_t["logits"], proj_s, proj_t, y)
    for k in ("ce", "kd", "tf", "ss"):
        torch.testing.assert_close(r[k], terms[k], rtol=0, atol=0)
    assert float(K.rkd_distance(out_s["avg_pool"], out_t["avg_pool"])) == float(r["rkd_distance"])
    no_hr = K.ssd_kd_loss(out_s, out_t, proj_s, proj_t, y, weights=K.SSDKDWeights(hr_w=0.0))
    assert float(no_hr["hr"]) == 0.0
    assert "channel_relation" not in no_hr
