"""Metadata fusion (issue #17): the seed's _comb_config forms, the two networks, the formulas."""

import pytest
import torch
import torch.nn.functional as F

import models
from models import FusionConfigError, FusionSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

M = 11  # the prepared metadata columns


# ----------------------------------------------------------------------------- _comb_config


@pytest.mark.parametrize(("name", "method", "config", "want"), [
    # the seed's int forms and defaults: metablock groups of 32, metanet groups of 64
    ("resnet-50", "metablock", 11, FusionSpec("metablock", 11, maps=64)),
    ("mobilenet", "metablock", 11, FusionSpec("metablock", 11, maps=40)),
    ("resnet-50", "metanet", 11, FusionSpec("metanet", 11, maps=32, hidden=64)),
    ("mobilenet", "metanet", 11, FusionSpec("metanet", 11, maps=20, hidden=40)),
    ("resnet-50", "concat", 11, FusionSpec("concat", 11)),
    # list forms: metablock [maps, M] (the seed read maps before setting it), metanet [M, hidden, maps]
    ("mobilenet", "metablock", [80, 11], FusionSpec("metablock", 11, maps=80)),
    ("resnet-50", "metanet", [11, 16, 128], FusionSpec("metanet", 11, maps=128, hidden=16)),
    ("resnet-50", None, None, FusionSpec()),
])
def test_comb_config_is_read_as_the_seed_reads_it(name, method, config, want):
    spec = FusionSpec.from_config(method, config, 0, models.NUM_FEATURES[name])
    assert spec == want
    assert FusionSpec.from_dict(spec.to_dict()) == spec  # what a checkpoint records
    assert FusionSpec.from_dict(None) == FusionSpec()  # checkpoints before issue #17


@pytest.mark.parametrize(("method", "config", "reducer", "match"), [
    ("concat", [11], 0, r"_comb_config=\[11\] does not fit _comb_method='concat': expected M"),
    ("metablock", [64], 0, r"expected \[maps, M\] or M"),
    ("metanet", [11, 64], 0, r"expected \[M, hidden, maps\] or M"),
    ("metablock", [48, 11], 0, "48 feature maps do not divide the network's 2048 pooled features"),
    ("metablock", 0, 0, "positive ints"),
    ("metablock", True, 0, "positive ints"),
    ("metablock", "11", 0, "positive ints"),
    ("attention", 11, 0, "_comb_method='attention' is unknown"),
    (None, 11, 0, "_comb_config=11 is set but _comb_method is None"),
    ("concat", 11, -1, "_neurons_reducer_block=-1 must be an int >= 0"),
])
def test_bad_fusion_settings_are_refused_naming_the_keys(method, config, reducer, match):
    with pytest.raises(FusionConfigError, match=match):
        FusionSpec.from_config(method, config, reducer, 2048)


# ----------------------------------------------------------------------------- networks


def _net(name, method, config, reducer=0, seed=0):
    torch.manual_seed(seed)
    spec = FusionSpec.from_config(method, config, reducer, models.NUM_FEATURES[name])
    return models.create_model(name, 8, fusion=spec).eval()


def _inputs(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.rand(n, M, generator=gen)


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet"])
@pytest.mark.parametrize(("method", "reducer", "width"), [
    ("concat", 0, None), ("concat", 16, 16 + M), ("metablock", 0, None), ("metablock", 16, 16),
    ("metanet", 0, None), ("metanet", 16, 16),
])
def test_both_networks_fuse_with_every_method(name, method, reducer, width):
    net = _net(name, method, M, reducer)
    c = models.NUM_FEATURES[name]
    width = width or (c + M if method == "concat" else c)
    x, meta = _inputs()
    with torch.no_grad():
        out = net.forward_kd(x, meta)
        other = net.forward_kd(x, meta.flip(0))
    assert out["feats_7x7"].shape == (3, c, 1, 1)  # the image branch, unchanged
    assert out["avg_pool"].shape == (3, width) and net.embedding_features == width
    assert torch.equal(out["logits"], net.classifier(out["avg_pool"]))
    assert torch.equal(net(x, meta), out["logits"])
    assert torch.equal(other["feats_7x7"], out["feats_7x7"])
    # the metadata is used (random feature maps: an untrained backbone's are nearly constant)
    feats = torch.randn(3, c, 1, 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(net.forward_head(feats, meta=meta),
                                  net.forward_head(feats, meta=meta.flip(0)))
    with pytest.raises(ValueError, match="fuses metadata"):
        net(x)
    with pytest.raises(ValueError, match=r"expects \(N, 11\)"):
        net(x, meta[:, :5])


def test_image_only_networks_keep_the_plain_layout_and_refuse_metadata():
    net = _net("mobilenet", None, None)
    keys = net.state_dict().keys()
    assert not any(k.startswith(("comb.", "reducer_block.")) for k in keys)
    assert net.embedding_features == 1280
    x, meta = _inputs()
    with pytest.raises(ValueError, match="no metadata fusion"):
        net(x, meta)


def test_fusion_modules_carry_the_seeds_names_and_shapes():
    metanet = _net("resnet-50", "metanet", M, reducer=16).state_dict()
    assert metanet["comb.metanet.0.weight"].shape == (64, M, 1, 1)
    assert metanet["comb.metanet.2.weight"].shape == (32, 64, 1, 1)
    assert metanet["reducer_block.0.weight"].shape == (16, 2048)
    assert metanet["reducer_block.1.running_var"].shape == (16,)
    assert metanet["classifier.weight"].shape == (8, 16)
    metablock = _net("mobilenet", "metablock", M).state_dict()
    assert metablock["comb.fb.0.weight"].shape == metablock["comb.gb.0.weight"].shape == (40, M)
    assert metablock["classifier.weight"].shape == (8, 1280)


def test_imagenet_backbone_loads_into_a_fused_network_and_leaves_the_head_alone():
    donor = models.create_model("mobilenet", 8)
    tv_layout = models.to_torchvision_layout(donor.state_dict(), "mobilenet")
    tv_layout["classifier.1.weight"] = torch.zeros(1000, 1280)
    tv_layout["classifier.1.bias"] = torch.zeros(1000)
    net = _net("mobilenet", "metablock", M, reducer=16)
    head = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("features.")}
    models.load_weights(net, tv_layout, skip_classifier=True)  # what ImageNet loading does
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in donor.state_dict().items() if k.startswith("features."))
    assert all(torch.equal(got[k], v) for k, v in head.items())


# ----------------------------------------------------------------------------- formulas


def _pooled_and_meta(c, n=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=gen, dtype=torch.float64),
            torch.rand(n, M, generator=gen, dtype=torch.float64))


def test_metablock_is_the_papers_gate_per_group():
    """sigmoid(tanh(x_g * f(m)_g) + g(m)_g) with f, g = BN(Linear(m)), by hand in float64."""
    block = models.MetaBlock(maps=4, meta_features=M).double().eval()
    torch.nn.init.normal_(block.fb[1].running_mean)
    x, m = _pooled_and_meta(4 * 6)

    def lin_bn(seq, v):
        lin, bn = seq
        return (v @ lin.weight.T + lin.bias - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) \
            * bn.weight + bn.bias

    f, g = lin_bn(block.fb, m), lin_bn(block.gb, m)
    want = torch.empty_like(x)
    for grp in range(4):
        cols = slice(6 * grp, 6 * grp + 6)
        want[:, cols] = torch.sigmoid(torch.tanh(x[:, cols] * f[:, grp:grp + 1]) + g[:, grp:grp + 1])
    got = block(x.reshape(4, 4, 6), m).flatten(1)
    # float64, a handful of operations per entry: only rounding differs (~1e-16)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


def test_metanet_weighs_each_group_by_the_metadata():
    """x_g * sigmoid(W2 relu(W1 m + b1) + b2)_g, by hand in float64."""
    net = models.MetaNet(meta_features=M, hidden=5, maps=3).double()
    x, m = _pooled_and_meta(3 * 7)
    conv1, conv2 = net.metanet[0], net.metanet[2]
    hidden = F.relu(m @ conv1.weight[:, :, 0, 0].T + conv1.bias)
    weight = torch.sigmoid(hidden @ conv2.weight[:, :, 0, 0].T + conv2.bias)
    want = x * weight.repeat_interleave(7, dim=1)
    assert torch.allclose(net(x.reshape(4, 3, 7), m).flatten(1), want, rtol=0, atol=1e-13)


def test_concat_appends_the_metadata_after_the_reducer_of_the_image():
    net = _net("mobilenet", "concat", M, reducer=16)
    x, meta = _inputs()
    with torch.no_grad():
        out = net.forward_kd(x, meta)["avg_pool"]
        other = net.forward_kd(x, torch.zeros_like(meta))["avg_pool"]
    assert torch.equal(out[:, 16:], meta)
    assert torch.equal(out[:, :16], other[:, :16])  # the reducer sees the image only
    assert (out[:, :16] >= 0).all()  # after the reducer's ReLU


# ----------------------------------------------------------------------------- distillation


def _kd_nets(student_method, teacher_method):
    teacher = _net("resnet-50", teacher_method, None if teacher_method is None else M, seed=4)
    student = _net("mobilenet", student_method, None if student_method is None else M, reducer=16,
                   seed=5).train()
    return student, teacher


@pytest.mark.parametrize(("student_method", "teacher_method"), [
    ("concat", "metablock"), (None, "metanet"), ("metablock", None),
])
def test_dkd_step_feeds_each_network_the_metadata_it_fuses(student_method, teacher_method):
    from kd_losses import d_kd
    from raug.methods.dkd import DKDTask

    student, teacher = _kd_nets(student_method, teacher_method)
    adapter = models.build_adapter(student, teacher, 32)
    task = DKDTask(student, teacher, adapter, method="d_kd")
    x, meta = _inputs(n=4)
    batch = {"image": x, "label": torch.tensor([0, 1, 2, 3]), "meta": meta}
    torch.manual_seed(7)  # the student's dropout
    got = task.train_step(batch)
    torch.manual_seed(7)
    out_s = student.forward_kd(x, meta) if student_method else student.forward_kd(x)
    out_s = {**out_s, "feats_7x7": adapter(out_s["feats_7x7"])}
    with torch.no_grad():
        out_t = teacher.forward_kd(x, meta) if teacher_method else teacher.forward_kd(x)
    want = d_kd(out_s, out_t, batch["label"], method="d_kd")
    for part in ("loss", "ce", "kd", "rkd_distance", "rkd_angle", "channel_relation"):
        assert torch.equal(got[part], want[part]), part


def test_ssd_kd_views_share_their_images_metadata(monkeypatch):
    from raug.methods import ssdkd

    student, teacher = _kd_nets("metanet", "metablock")
    seen = []
    real = ssdkd.frozen_forward

    def spy(module, views, meta=None):
        seen.append(meta)
        return real(module, views, meta)

    monkeypatch.setattr(ssdkd, "frozen_forward", spy)
    task = ssdkd.SSDKDTask(student, models.ProjectionHead(student.embedding_features), teacher,
                           models.ProjectionHead(teacher.embedding_features).eval(),
                           models.build_adapter(student, teacher, 32))
    x, meta = _inputs(n=2)
    out = task.train_step({"image": x, "label": torch.tensor([0, 1]), "meta": meta})
    assert torch.isfinite(out["loss"])
    # rows 4i + r are image i's views: each carries image i's metadata
    assert torch.equal(seen[0], meta[[0, 0, 0, 0, 1, 1, 1, 1]])


@pytest.mark.parametrize(("name", "method", "config", "reducer"), [
    ("resnet-50", "metablock", [32, M], 0), ("mobilenet", "metanet", [M, 7, 40], 16),
    ("mobilenet", "concat", M, 16), ("resnet-50", "concat", M, 0), ("mobilenet", None, None, 16),
    ("resnet-50", None, None, 0),
])
def test_the_fusion_of_a_state_dict_is_read_back_from_its_shapes(name, method, config, reducer):
    """For checkpoints that do not record it (the seed's): the shapes say it all."""
    net = _net(name, method, config, reducer)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}  # DataParallel prefix too
    assert models.infer_fusion(sd, models.NUM_FEATURES[name]) == net.fusion


@pytest.mark.parametrize("method", ["none", "blkd", "rkd", "crkd", "d_kd", "fitnet"])
def test_every_dkd_method_trains_a_fused_student_from_a_fused_teacher(method):
    from kd_losses import DKD_FAMILY, DKDWeights
    from raug.methods.dkd import DKDTask

    row, weights = DKD_FAMILY[method], DKDWeights()
    student = _net("mobilenet", "metanet", M, seed=6).train()  # no reducer: no dropout
    teacher = _net("mobilenet", "metablock", M, seed=7) if row.needs_teacher else None
    adapter = models.build_adapter(student, teacher, 32) if row.needs_adapter(weights) else None
    task = DKDTask(student, teacher, adapter, method=method, weights=weights)
    x, meta = _inputs(n=4)
    batch = {"image": x, "label": torch.tensor([0, 1, 2, 3]), "meta": meta}
    out = task.train_step(batch)
    out["loss"].backward()
    assert set(row.terms(weights)) <= set(out) and torch.isfinite(out["loss"])
    # the student's fusion layers learn from the KD loss
    assert student.comb.metanet[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # and the metadata changes what the step computes
        other = task.train_step({**batch, "meta": meta.flip(0)})
    assert not torch.equal(other["logits"], out["logits"].detach())
