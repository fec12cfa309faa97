"""The ``_kd_method`` tables and the weights classes: what derives from them holds.

Every row's declared parts are exactly what its loss returns, the scripts' config keys
and defaults are the weights classes' own, and a new row (an ablation) works end to end
from the table alone.
"""

import dataclasses

import pytest
import torch

import kd_losses as K
from kd_losses.methods import DKD_FAMILY, SSD_KD_FAMILY, DKDMethod
from kd_losses.weights import config_defaults, weight_problems
from raug.methods.kd_config import DKD_CONFIG, KD_SHARED_CONFIG, SSDKD_CONFIG, dkd_checks

WEIGHT_CASES = [
    K.DKDWeights(),
    K.DKDWeights(relational=K.RelationalWeights(lambd_drkd=0.0)),
    K.DKDWeights(relational=K.RelationalWeights(lambd_crkd=0.0)),
    K.DKDWeights(lambd=0.2, T=2.0, lambd_fitnet=0.0,
                 relational=K.RelationalWeights(0.0, 0.0)),
]


def _outs(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    out_s = {"logits": rand(n, 5), "avg_pool": rand(n, 4), "feats_7x7": rand(n, 3, 2, 2)}
    out_t = {"logits": rand(n, 5), "avg_pool": rand(n, 7), "feats_7x7": rand(n, 3, 2, 2)}
    return out_s, out_t


@pytest.mark.parametrize("weights", WEIGHT_CASES)
@pytest.mark.parametrize("name", list(DKD_FAMILY))
def test_each_dkd_row_declares_exactly_the_parts_its_loss_returns(name, weights):
    out_s, out_t = _outs()
    parts = K.d_kd(out_s, out_t, torch.arange(6) % 5, method=name, weights=weights)
    row = DKD_FAMILY[name]
    assert set(parts) - {"loss"} == set(row.terms(weights))
    # a feature-map part is there exactly when the row asks for the adapter
    assert row.needs_adapter(weights) == bool({"channel_relation", "fitnet"} & set(parts))
    assert row.min_batch(weights) == (3 if "rkd_angle" in parts else 2)


@pytest.mark.parametrize("hr_w", [0.0, 1.0])
@pytest.mark.parametrize("relational", [K.RelationalWeights(), K.RelationalWeights(0.0, 5.0),
                                        K.RelationalWeights(2.0, 0.0)])
def test_the_ssd_kd_row_declares_exactly_the_parts_its_loss_returns(hr_w, relational):
    out_s, out_t = _outs(8)
    gen = torch.Generator().manual_seed(3)
    proj_s, proj_t = (torch.randn(8, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    weights = K.SSDKDWeights(hr_w=hr_w, relational=relational)
    parts = K.ssd_kd_loss(out_s, out_t, proj_s, proj_t, torch.tensor([0, 3]), weights=weights)
    row = SSD_KD_FAMILY["ssd_kd"]
    assert set(parts) - {"loss"} == set(row.terms(weights))
    assert row.needs_adapter(weights) == ("channel_relation" in parts)


def test_only_the_student_alone_runs_without_a_teacher():
    assert [n for n, row in DKD_FAMILY.items() if not row.needs_teacher] == ["none"]
    assert tuple(DKD_FAMILY) == K.KD_METHODS


def test_config_defaults_are_the_weights_classes_defaults():
    dkd = {**KD_SHARED_CONFIG, **DKD_CONFIG}
    ssd = {**KD_SHARED_CONFIG, **SSDKD_CONFIG}
    assert {k: dkd[k] for k in config_defaults(K.DKDWeights)} == config_defaults(K.DKDWeights)
    assert {k: ssd[k] for k in config_defaults(K.SSDKDWeights)} == config_defaults(K.SSDKDWeights)
    assert K.DKDWeights.from_config(dkd) == K.DKDWeights()
    assert K.SSDKDWeights.from_config(ssd) == K.SSDKDWeights()
    # every config value reaches its field (a changed key is not silently dropped)
    changed = K.DKDWeights.from_config({**dkd, "_lambd": 0.25, "_lambd_crkd": 7})
    assert (changed.lambd, changed.relational.lambd_crkd) == (0.25, 7.0)


def test_weights_are_frozen_and_checked_from_their_declared_ranges():
    with pytest.raises(dataclasses.FrozenInstanceError):
        K.DKDWeights().lambd = 0.1  # type: ignore[misc]
    config = {**KD_SHARED_CONFIG, **DKD_CONFIG, "_lambd": 2, "_T": 0, "_lambd_drkd": True}
    assert weight_problems(K.DKDWeights, config) == [
        "_lambd=2 is invalid: expected a number in [0, 1]",
        "_T=0 is invalid: expected a number > 0",
        "_lambd_drkd=True is invalid: expected a number >= 0",
    ]


def test_a_new_row_is_an_ablation_end_to_end(monkeypatch):
    """The worked example of docs/methods.md: soft KD plus the FitNet hint, one table row."""
    row = DKDMethod("kd_hint", "blkd + lambd_fitnet fitnet", soft_kd=True, fitnet=True)
    monkeypatch.setitem(DKD_FAMILY, "kd_hint", row)
    weights = K.DKDWeights(lambd=0.3, T=2.0, lambd_fitnet=0.5)
    out_s, out_t = _outs()
    y = torch.arange(6) % 5
    parts = K.d_kd(out_s, out_t, y, method="kd_hint", weights=weights)
    assert set(parts) - {"loss"} == {"ce", "kd", "fitnet"} == set(row.terms(weights))
    want = (0.7 * K.weighted_ce(out_s["logits"], y) + 0.3 * 4.0 * K.soft_kd(
        out_s["logits"], out_t["logits"], 2.0) + 0.5 * K.fitnet(out_s["feats_7x7"], out_t["feats_7x7"]))
    assert float(parts["loss"]) == pytest.approx(float(want), rel=1e-12)
    # the script's checks accept it from the same table (and its adapter/teacher needs follow)
    config = {**KD_SHARED_CONFIG, **DKD_CONFIG, "_kd_method": "kd_hint", "_batch_size": 2,
              "_teacher_ckpt": "teacher.pth"}
    assert [p for p in dkd_checks(config) if "_kd_method" in p] == []
    assert row.needs_teacher
    assert row.needs_adapter(weights)
