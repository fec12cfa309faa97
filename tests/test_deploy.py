"""Portable deployment: export, int8, prediction CSV, robust image reading, TTA, Grad-CAM.

Fast by construction: a 64 px MobileNet-V2 with random weights whose BatchNorm statistics are
re-estimated (``demo_model``) so predictions depend on the input, and a handful of small
images written here. The expensive artefacts (ONNX fp32/int8 exports) are built once per
module.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import albumentations as A
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from raug.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raug.deploy import export as export_mod
from raug.deploy import predict as predict_mod
from raug.deploy.export import (
    DeployHead,
    ExportError,
    export_onnx,
    export_torchscript,
    verify_onnx,
)
from raug.deploy.gradcam import grad_cam, overlay, upsample_cam
from raug.deploy.images import (
    ImageLoadError,
    collect_images,
    load_rgb,
    pil_to_rgb,
)
from raug.deploy.onnx_backend import OnnxPredictor, read_metadata, softmax
from raug.deploy.predict import (
    parse_prepare_size,
    predict_batch,
    resolve_prepare_size,
)
from raug.deploy.preprocess import TTA_VIEWS, preprocess, tta_view
from raug.deploy.quantize import calibration_inputs, quantize_onnx
from raug.deploy.spec import SpecError, file_sha256, spec_from_checkpoint, spec_from_metadata
from raug.deploy.submission import ISIC2019_HEADER, isic2019_csv, predictions_csv
from raug.deploy.synthetic import (
    demo_checkpoint_payload,
    demo_model,
    synthetic_batch,
    synthetic_images,
)
from raug.deploy.torch_backend import TorchPredictor, load_model
from raug.files.atomic import atomic_write_with
from raug.files.checkpoint import save_checkpoint
from raug.isic2019.image_size import shorter_side_size

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC"]
SIZE = 64
# ONNX Runtime and PyTorch (whose kernels also differ by CPU) run the demo MobileNet-V2 in
# float32 with different summation orders. Per path the logits carry ~u * sqrt(K) * max|z|
# of rounding (u = 2^-24, widest reduction K = 1280, max|z| = 15: 3.2e-5; measured 1.3e-5
# against float64) and softmax halves an absolute logit error (|dp| <= max|dz| / 2), so two
# paths' probabilities agree to ~3.2e-5 < FP32_PATHS_TOL, the export's own verification
# tolerance (raug.deploy.export.DEFAULT_TOL); observed <= 4e-6 (generic and AVX2 kernels).
FP32_PATHS_TOL = 1e-4


def _payload(model: torch.nn.Module, **overrides) -> dict:
    return demo_checkpoint_payload(model, SIZE, **overrides)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return demo_model("mobilenet", 8, SIZE, seed=0, logit_std=3.0, num_images=24)


@pytest.fixture(scope="module")
def ckpt(work, model) -> Path:
    return save_checkpoint(work / "student.pth", _payload(model))


@pytest.fixture(scope="module")
def images(work) -> Path:
    """Eight dermoscopy-like images of assorted sizes and formats, one in a sub-folder."""
    folder = work / "images"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(synthetic_images(8, 96, seed=7)):
        h, w = (96, 96) if i % 3 == 0 else ((80, 120) if i % 3 == 1 else (130, 70))
        pil = Image.fromarray(img).resize((w, h))
        target = folder / ("sub" if i == 5 else "") / f"ISIC_{i:07d}.{'png' if i % 2 else 'jpg'}"
        pil.save(target)
    return folder


@pytest.fixture(scope="module")
def onnx_fp32(work, ckpt) -> tuple[Path, float]:
    model, spec = load_model(ckpt)
    path = work / "student.onnx"
    return path, export_onnx(model, spec, path)


@pytest.fixture(scope="module")
def onnx_int8(work, onnx_fp32, images):
    path, _ = onnx_fp32
    spec = OnnxPredictor(path).spec
    calib = calibration_inputs(images, spec, progress=False)
    others = synthetic_batch(32, SIZE, IMAGENET_MEAN, IMAGENET_STD, seed=21)
    return quantize_onnx(path, work / "student.int8.onnx", calib, compare_inputs=others)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


# ---------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(("shape", "size"), [((37, 53, 3), 64), ((300, 200, 3), 224), ((64, 64, 3), 64)])
def test_preprocess_is_bit_identical_to_albumentations(shape, size):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    mean, std = (0.6, 0.5, 0.4), (0.2, 0.25, 0.3)
    ref = A.Compose([A.Resize(size, size), A.Normalize(mean, std)])(image=img)["image"]
    np.testing.assert_array_equal(preprocess(img, size, mean, std), ref.transpose(2, 0, 1))


def test_preprocess_matches_engine_eval_transform():
    transforms = pytest.importorskip("raug.data.transforms")
    img = np.random.default_rng(2).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    ref = transforms.eval_transform(SIZE)(image=img)["image"]
    np.testing.assert_array_equal(preprocess(img, SIZE, IMAGENET_MEAN, IMAGENET_STD), ref.numpy())


def test_tta_views_are_the_eight_distinct_dihedral_transforms():
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 5)).astype(np.float32)
    views = [tta_view(x, turns, flip) for _, turns, flip in TTA_VIEWS]
    assert len({v.tobytes() for v in views}) == 8
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1][0, 0], np.rot90(x[0, 0]))
    np.testing.assert_array_equal(views[4][0, 0], x[0, 0, :, ::-1])
    # the set is a group: every view of a view is again one of the views
    seen = {v.tobytes() for v in views}
    assert all(tta_view(views[5], t, f).tobytes() in seen for _, t, f in TTA_VIEWS)


# ------------------------------------------------------------------------------ image reading


def test_pil_modes_become_rgb(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    base = Image.fromarray(rgb)

    out = load_rgb(_save(tmp_path / "l.png", Image.fromarray(grey)))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    alpha = np.full((6, 7), 128, np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    out = load_rgb(_save(tmp_path / "rgba.png", Image.fromarray(np.dstack([rgb, alpha]))))
    expected = np.rint(rgb.astype(np.float32) * (alpha[..., None] / 255.0)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])  # transparent -> black surround
    np.testing.assert_array_equal(out[0, 1], rgb[0, 1])

    cmyk = base.convert("CMYK")
    out = load_rgb(_save(tmp_path / "cmyk.tif", cmyk))
    np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB")))

    pal = base.quantize(16)
    out = load_rgb(_save(tmp_path / "p.png", pal))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))

    # 16-bit grey is rescaled (v / 257), not clipped at 255
    values = np.array([[0, 1000, 32768, 25700, 65535]], np.uint16)
    out = load_rgb(_save(tmp_path / "g16.png", Image.fromarray(values)))
    assert out.shape == (1, 5, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 4, 128, 100, 255])

    for img in (Image.fromarray(grey).convert("LA"), Image.fromarray(grey > 128).convert("1")):
        out = pil_to_rgb(img)
        assert out.shape == (6, 7, 3)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def _save(path: Path, img: Image.Image) -> Path:
    img.save(path)
    return path


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (only the header is ever read)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.jpg"
    text.write_text("this is not an image\n")
    full = folder / "full.jpg"
    Image.fromarray(synthetic_images(1, 96, seed=9)[0]).save(full, quality=95)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return {"text": text, "truncated": truncated, "bomb": _bomb_png(folder / "bomb.png")}


def test_load_rgb_refuses_bad_files_by_name(tmp_path):
    bad = _bad_files(tmp_path)
    for kind, path in bad.items():
        with pytest.raises(ImageLoadError) as info:
            load_rgb(path)
        assert str(path) in str(info.value), kind
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_rgb(bad["bomb"])
    small = _save(tmp_path / "ok.png", Image.new("RGB", (40, 40)))
    with pytest.raises(ImageLoadError, match="exceeds the limit of 1000 pixels"):
        load_rgb(small, max_pixels=1000)


def test_prepare_size_shrinks_like_the_data_preparation(tmp_path):
    # one rule for preparation and prediction (raug/isic2019/image_size.py): shorter side 320, never enlarged
    expected_sizes = {(800, 600): (427, 320), (600, 800): (320, 427), (300, 200): (300, 200),
                      (1001, 333): (962, 320)}
    for (w, h), size in expected_sizes.items():
        assert shorter_side_size(w, h, 320) == size
        assert shorter_side_size(w, h, None) == (w, h)
    big = Image.fromarray(synthetic_images(1, 400, seed=13)[0]).resize((800, 600))
    path = _save(tmp_path / "big.jpg", big)
    with Image.open(path) as im:  # the preparation's own steps (raug/isic2019/images.py)
        im.draft("RGB", (427, 320))
        expected = np.asarray(im.convert("RGB").resize((427, 320), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(load_rgb(path, prepare_size=320), expected)
    assert load_rgb(path).shape == (600, 800, 3)  # no preparation: full size
    small = _save(tmp_path / "small.png", Image.new("RGB", (100, 50), (1, 2, 3)))
    assert load_rgb(small, prepare_size=320).shape == (50, 100, 3)  # never enlarged
    assert parse_prepare_size("none") is None
    assert parse_prepare_size("256") == 256


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :10] = 255  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = tmp_path / "rotated.png"
    Image.fromarray(rgb).save(path, exif=exif)
    out = load_rgb(path, prepare_size=20)
    assert out.shape == (30, 20, 3)  # axes swapped, shorter side 20
    assert out[:4].mean() > 200  # the left band is now on top
    assert out[-4:].mean() < 50


def test_collect_images_recurses_and_names_missing_paths(images, tmp_path):
    found = collect_images([images])
    assert [p.stem for p in found] == [f"ISIC_{i:07d}" for i in range(8) if i != 5] + ["ISIC_0000005"]
    assert collect_images([found[0], images])[0] == found[0]  # no duplicates, order kept
    assert len(collect_images([found[0], images])) == 8
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_images([tmp_path / "nope"])


# ---------------------------------------------------------------------------------- export


@pytest.mark.numeric
def test_onnx_export_round_trip_and_metadata(onnx_fp32, ckpt, model, images):
    path, diff = onnx_fp32
    assert diff <= FP32_PATHS_TOL
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert [i.name for i in proto.graph.input] == ["input"]  # image only: no metadata input
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert set(meta) == {"deploy_format", "deploy_format_version", "model_name", "class_names",
                         "img_size", "normalization", "input", "output", "source_checkpoint"}
    assert meta["class_names"] == CLASSES
    assert meta["img_size"] == SIZE
    assert meta["model_name"] == "mobilenet"
    assert meta["normalization"]["mean"] == pytest.approx(IMAGENET_MEAN)
    assert meta["normalization"]["std"] == pytest.approx(IMAGENET_STD)
    assert meta["input"]["layout"] == "NCHW"
    assert meta["input"]["color"] == "RGB"
    assert meta["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert meta["output"] == {"name": "probs", "kind": "probs", "shape": ["batch", 8]}
    assert meta["source_checkpoint"] == {"file": "student.pth", "sha256": file_sha256(ckpt), "epoch": 3}

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rgb = [load_rgb(p) for p in collect_images([images])]
    batch = np.stack([preprocess(x, SIZE, IMAGENET_MEAN, IMAGENET_STD) for x in rgb])
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(batch)), 1).numpy()
    for sl in (slice(0, 1), slice(1, 4)):
        (out,) = session.run(["probs"], {"input": batch[sl]})
        assert out.shape == ref[sl].shape
        np.testing.assert_allclose(out, ref[sl], atol=FP32_PATHS_TOL, rtol=0)
    assert len(set(ref.argmax(1))) >= 2  # the demo model is not degenerate


def test_failed_verification_writes_nothing(work, ckpt, monkeypatch):
    model, spec = load_model(ckpt)
    out = work / "failed" / "model.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch") as info:
        export_onnx(model, spec, out, dynamo=False, tol=-1.0)
    assert str(info.value).startswith(str(out))  # names the target, not the temporary file
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d, m: d / "missing.pth", "missing.pth"),
        (lambda d, m: _write(d / "garbage.pth", b"\x00not a checkpoint"), "garbage.pth"),
        (lambda d, m: save_checkpoint(d / "vgg.pth", _payload(m, model_name="vgg-16")), "vgg-16"),
        (lambda d, m: save_checkpoint(d / "bare.pth", {"model_state_dict": m.state_dict()}), "model_name"),
    ],
    ids=["missing", "corrupt", "unknown-arch", "not-self-describing"],
)
def test_export_cli_clear_errors(tmp_path, model, capsys, make, needle):
    path = make(tmp_path, model)
    assert export_mod.main(["--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert str(path.name) in err
    assert not (tmp_path / "x.onnx").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(work, ckpt, model):
    model_, spec = load_model(ckpt)
    out = work / "student.pt"
    assert export_torchscript(model_, spec, out) <= 1e-4  # the same ATen kernels: 0 on any CPU
    extra = {"ssdkd_deploy.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(json.loads(extra["ssdkd_deploy.json"])["class_names"])
    assert meta == CLASSES
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        # the traced graph runs the same ATen kernels as eager PyTorch: equal on any CPU
        torch.testing.assert_close(loaded(x), torch.softmax(model(x), 1), atol=1e-5, rtol=0)


@pytest.mark.numeric
def test_verify_onnx_detects_a_different_model(onnx_fp32, model):
    path, _ = onnx_fp32
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.bias += torch.linspace(0.0, 1.0, 8)
    assert verify_onnx(path, DeployHead(model).eval(), SIZE) <= FP32_PATHS_TOL
    with pytest.raises(ExportError):
        verify_onnx(path, DeployHead(other).eval(), SIZE)


# ------------------------------------------------------------------------------ quantisation


@pytest.mark.numeric
def test_static_int8_is_smaller_and_agrees(onnx_int8, images):
    report = onnx_int8
    assert report.mode == "static"
    assert report.int8_bytes == report.path.stat().st_size
    assert report.ratio >= 2.5
    assert report.num_calibration == 8
    assert report.num_compared == 32
    assert report.compared_on == "given inputs"
    # a random-weight stand-in quantises worse than a trained net (see raug.deploy.synthetic)
    assert report.top1_agreement >= 0.65
    int8 = OnnxPredictor(report.path)
    assert int8.spec.class_names == tuple(CLASSES)
    assert int8.spec.extra["quantization"]["mode"] == "static"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(report.path)).graph.node)
    probs = int8.predict_probs(calibration_inputs(images, int8.spec, progress=False))
    # softmax kept in float: sums to 1 within (K + 1)u + 7u (this float32 sum) = 16u = 1e-6
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_dynamic_int8_without_calibration(work, onnx_fp32):
    fp32_path, _ = onnx_fp32
    report = quantize_onnx(fp32_path, work / "dyn.int8.onnx")
    assert report.mode == "dynamic"
    assert report.compared_on == "random inputs"
    assert report.ratio >= 2.5
    assert OnnxPredictor(report.path).predict_probs(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, 8)


def test_export_cli_logits_int8_with_legacy_exporter(work, ckpt, model, images, capsys):
    out = work / "cli" / "logits.onnx"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--output", "logits",
            "--exporter", "legacy", "--quantize", "int8", "--calibration", str(images),
            "--no-progress"]
    assert export_mod.main(argv) == 0
    err = capsys.readouterr().err
    assert "max abs diff" in err
    assert "smaller" in err
    assert "top-1" in err
    predictor = OnnxPredictor(out)
    assert predictor.spec.output_kind == "logits"
    x = np.random.default_rng(5).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    (raw,) = predictor.session.run(["logits"], {"input": x})
    # relative to the logit scale: 2 paths * u * sqrt(K) = 4.3e-6 (see FP32_PATHS_TOL)
    assert np.abs(raw - logits).max() <= FP32_PATHS_TOL * max(1.0, np.abs(logits).max())
    np.testing.assert_allclose(predictor.predict_probs(x), softmax(logits), atol=FP32_PATHS_TOL,
                               rtol=0)
    int8 = OnnxPredictor(work / "cli" / "logits.int8.onnx")  # default int8 name
    assert int8.spec.output_kind == "logits"
    np.testing.assert_allclose(int8.predict_probs(x).sum(1), 1.0, atol=1e-5)


# -------------------------------------------------------------------------------- prediction


@pytest.mark.numeric
def test_predict_csv_format_and_pth_equals_onnx(work, ckpt, onnx_fp32, images):
    onnx_path, _ = onnx_fp32
    results = {}
    for name, model_path in (("onnx", onnx_path), ("pth", ckpt)):
        out = work / f"preds_{name}.csv"
        argv = ["--model", str(model_path), "--images", str(images), "--out", str(out),
                "--batch-size", "3", "--no-progress"]
        assert predict_mod.main(argv) == 0
        header, rows = _read_csv(out)
        assert header == ["image", "PRED", *CLASSES]
        assert [r[0] for r in rows] == [p.stem for p in collect_images([images])]
        probs = np.array([[float(v) for v in r[2:]] for r in rows])
        # 8 decimals: 8 * 5e-9, plus softmax's (K + 1)u = 5.4e-7 (u = 2^-24): < 1e-6
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
        assert [r[1] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
        results[name] = probs
    assert np.abs(results["onnx"] - results["pth"]).max() <= FP32_PATHS_TOL
    assert len(set(results["pth"].argmax(1))) >= 2


def test_predict_skips_bad_files_and_exits_nonzero(work, onnx_fp32, images, capsys):
    onnx_path, _ = onnx_fp32
    bad = _bad_files(work / "bad")
    out = work / "preds_bad.csv"
    argv = ["--model", str(onnx_path), "--images", str(images), str(work / "bad"),
            "--out", str(out), "--no-progress"]
    assert predict_mod.main(argv) == 1
    err = capsys.readouterr().err
    for path in bad.values():
        assert str(path) in err
    assert "decompression bomb" in err
    _, rows = _read_csv(out)
    assert len(rows) == 8  # every good image still predicted


def test_tta_sums_to_one_and_is_exact_for_symmetric_images(ckpt):
    predictor = TorchPredictor(ckpt)
    rng = np.random.default_rng(8)
    noise = rng.uniform(0, 255, (SIZE, SIZE, 3))
    sym = sum(np.rot90(v, k) for v in (noise, noise[:, ::-1]) for k in range(4)) / 8
    sym = np.rint(sym).astype(np.uint8)
    for turns, flip in [(1, False), (0, True), (3, True)]:
        view = np.rot90(sym[:, ::-1] if flip else sym, turns)
        np.testing.assert_array_equal(view, sym)
    asym = synthetic_images(1, SIZE, seed=11)[0]
    batch = np.stack([preprocess(x, SIZE, IMAGENET_MEAN, IMAGENET_STD) for x in (sym, asym)])
    plain = predict_batch(predictor, batch)
    tta = predict_batch(predictor, batch, tta=True)
    # each view's softmax sums to 1 within (K + 1)u, the float64 mean keeps that, the cast
    # adds 0.5u and this float32 sum 7u: 16.5u = 9.8e-7 (u = 2^-24)
    np.testing.assert_allclose(tta.sum(1), 1.0, atol=1e-6)
    # the 8 views of the symmetric image are the same pixels in batches of the same shape:
    # the same per-view probabilities, averaged in float64 -- equal on any CPU
    np.testing.assert_allclose(tta[0], plain[0], atol=1e-5, rtol=0)
    manual = np.mean([predictor.predict_probs(tta_view(batch[1:], t, f)) for _, t, f in TTA_VIEWS], 0)
    # batch-size rounding only: 2 * u * sqrt(1280) * max|z| (3.1 here), halved by softmax:
    # 6.6e-6 < 2e-5 (see FP32_PATHS_TOL)
    np.testing.assert_allclose(tta[1:], manual, atol=2e-5, rtol=0)
    assert np.abs(tta[1] - plain[1]).max() > 1e-3


def test_predict_cli_tta(work, onnx_fp32, images):
    onnx_path, _ = onnx_fp32
    out = work / "preds_tta.csv"
    argv = ["--model", str(onnx_path), "--images", str(images), "--out", str(out), "--tta", "--no-progress"]
    assert predict_mod.main(argv) == 0
    _, rows = _read_csv(out)
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    # 8 decimals: 8 * 5e-9, plus softmax's (K + 1)u = 5.4e-7 (u = 2^-24): < 1e-6
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_recorded_preparation_size_is_the_prediction_default(work, model, images):
    """A model trained on images prepared at 48 px shrinks new images to 48 px by default,
    through the checkpoint and through its ONNX export; unrecorded models use 320."""
    record = {"size": 48, "split_hash": "ab" * 32}
    ckpt = save_checkpoint(work / "prep48.pth", _payload(model, data_preparation=record))
    onnx_path = work / "prep48.onnx"
    export_onnx(*load_model(ckpt), onnx_path)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["data_preparation"] == record

    def probs(model_path, *extra):
        out = work / "prep48.csv"
        argv = ["--model", str(model_path), "--images", str(images), "--out", str(out), "--no-progress"]
        assert predict_mod.main([*argv, *extra]) == 0
        return np.array([[float(v) for v in r[2:]] for r in _read_csv(out)[1]])

    for model_path in (ckpt, onnx_path):
        auto = probs(model_path)
        np.testing.assert_array_equal(auto, probs(model_path, "--prepare-size", "48"))
        assert np.abs(auto - probs(model_path, "--prepare-size", "none")).max() > 1e-3  # it did shrink
    np.testing.assert_allclose(probs(ckpt), probs(onnx_path), atol=FP32_PATHS_TOL, rtol=0)

    spec = load_model(ckpt)[1]
    assert resolve_prepare_size("auto", spec) == 48
    assert resolve_prepare_size(None, spec) is None
    assert resolve_prepare_size(200, spec) == 200
    originals = _payload(model, data_preparation={"size": None, "split_hash": "x"})
    assert resolve_prepare_size("auto", spec_from_checkpoint(originals, "o.pth")) is None
    assert resolve_prepare_size("auto", spec_from_checkpoint(_payload(model), "old.pth")) == 320
    assert parse_prepare_size("auto") == "auto"
    with pytest.raises(SpecError, match="data_preparation"):
        spec_from_checkpoint(_payload(model, data_preparation={"size": -3}), "bad.pth")


def test_predictions_csv_text():
    text = predictions_csv(["a", "b"], np.array([[0.25, 0.75], [0.9, 0.1]], np.float32), ["X", "Y"])
    assert text == "image,PRED,X,Y\na,Y,0.25000000,0.75000000\nb,X,0.89999998,0.10000000\n"


def test_isic2019_csv_hand_computed():
    """Columns by name in the challenge's order, ids as given, values clipped to [0, 1], and
    UNK = 1 - max(p) strictly below the threshold."""
    probs = np.array([
        # AK    BCC   BKL   DF    MEL    NV         SCC   VASC
        [0.10, 0.20, 0.05, 0.05, 0.30, 0.10, 0.10, 0.10],  # top 0.30 < 0.5: UNK 0.70
        [0.00, 0.00, 0.00, 0.00, -1e-9, 1.0000004, 0.00, 0.00],  # float32 overshoot: clipped
        [0.50, 0.50, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # top == threshold: not below, UNK 0
    ])
    zeros = ",".join(["0.00000000"] * 6)
    expected = (
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
        "ISIC_1,0.30000000,0.10000000,0.20000000,0.10000000,0.05000000,0.05000000,0.10000000,"
        "0.10000000,0.70000000\n"
        f"ISIC_2,0.00000000,1.00000000,{zeros},0.00000000\n"
        "ISIC_3,0.00000000,0.00000000,0.50000000,0.50000000,0.00000000,0.00000000,0.00000000,"
        "0.00000000,0.00000000\n"
    )
    names = ["ISIC_1", "ISIC_2", "ISIC_3"]
    assert isic2019_csv(names, probs, CLASSES, unk_threshold=0.5) == expected
    # the model's column order does not matter: columns are matched by class name
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    assert isic2019_csv(names, probs[:, order], [CLASSES[i] for i in order], 0.5) == expected
    # default: UNK 0 for every image
    no_unk = isic2019_csv(names, probs, CLASSES)
    assert no_unk.splitlines()[1].endswith(",0.10000000,0.00000000")
    with pytest.raises(ValueError, match="ISIC 2019 diagnoses"):
        isic2019_csv(["x"], np.ones((1, 2)), ["NV", "PSORIASIS"])


def test_predict_isic2019_format(work, onnx_fp32, images, capsys):
    onnx_path, _ = onnx_fp32
    base = ["--model", str(onnx_path), "--images", str(images), "--no-progress"]
    assert predict_mod.main([*base, "--out", str(work / "default.csv")]) == 0
    _, default_rows = _read_csv(work / "default.csv")
    default = {r[0]: dict(zip(CLASSES, map(float, r[2:]), strict=True)) for r in default_rows}
    for extra, unk_rule in (([], lambda top: 0.0), (["--unk-threshold", "1"], lambda top: 1 - top)):
        out = work / "isic.csv"
        assert predict_mod.main([*base, "--out", str(out), "--format", "isic2019", *extra]) == 0
        header, rows = _read_csv(out)
        assert tuple(header) == ISIC2019_HEADER
        assert [r[0] for r in rows] == [p.stem for p in collect_images([images])]  # no extension
        for row in rows:
            values = dict(zip(header[1:], map(float, row[1:]), strict=True))
            assert all(0.0 <= v <= 1.0 for v in values.values())
            for name in CLASSES:
                assert values[name] == pytest.approx(default[row[0]][name], abs=1e-8)
            top = max(default[row[0]].values())
            assert values["UNK"] == pytest.approx(unk_rule(top), abs=2e-8)
    # the threshold belongs to the ISIC format and to [0, 1]
    assert predict_mod.main([*base, "--out", str(work / "x.csv"), "--unk-threshold", "0.5"]) == 2
    assert "isic2019" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_mod.main([*base, "--out", str(work / "x.csv"), "--format", "isic2019",
                          "--unk-threshold", "1.5"])
    assert not (work / "x.csv").exists()


def test_onnx_predict_runs_with_torch_blocked(work, onnx_fp32, images, tmp_path):
    onnx_path, _ = onnx_fp32
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "onnx", "albumentations"):  # the ONNX path needs none of them
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    out = tmp_path / "preds.csv"
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    cmd = [sys.executable, str(ROOT / "tools" / "predict.py"), "--model", str(onnx_path),
           "--images", str(images), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "ref.csv"
    assert predict_mod.main([*cmd[2:6], "--out", str(ref), "--no-progress"]) == 0
    assert out.read_text() == ref.read_text()  # same bytes as the in-process (torch) run
    # the pth branch really needs torch: the same blocker makes it fail cleanly (exit 2)
    cmd_pth = [*cmd]
    cmd_pth[3] = str(work / "student.pth")
    proc = subprocess.run(cmd_pth, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "torch is blocked" in proc.stderr


# ---------------------------------------------------------------------------------- Grad-CAM


@pytest.mark.numeric
def test_grad_cam_matches_closed_form_for_a_linear_head(model):
    x = torch.from_numpy(np.stack([preprocess(img, SIZE, IMAGENET_MEAN, IMAGENET_STD)
                                   for img in synthetic_images(3, SIZE, seed=12)]))
    classes = [0, 4, 7]
    cam = grad_cam(model, x, classes)
    with torch.no_grad():
        feats = model.forward_features(x)
        # avg-pool + linear head: d y_c / d A_k = W_ck / (h w) everywhere
        weights = model.classifier.weight[classes] / (feats.shape[2] * feats.shape[3])
        expected = torch.relu(torch.einsum("nk,nkhw->nhw", weights, feats))
        expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    # float32 sums over 1280 channels in two orders: random-walk rounding ~u * sqrt(1280) =
    # 2.1e-6 of the map's scale (u = 2^-24), and the map is normalised to a maximum of 1
    torch.testing.assert_close(cam, expected, atol=1e-5, rtol=1e-4)
    assert cam.shape == (3, SIZE // 32, SIZE // 32)
    heat = upsample_cam(cam[1].numpy(), (90, 70))  # to the size of the original image
    assert heat.shape == (90, 70)
    assert heat.min() >= 0.0
    assert heat.max() <= 1.0
    assert float(cam.min()) >= 0.0
    assert float(cam.max()) <= 1.0


def test_grad_cam_heatmap_and_overlay_shapes():
    cam = np.array([[0.0, 1.0], [0.25, 0.5]], np.float32)
    heat = upsample_cam(cam, (90, 70))
    assert heat.shape == (90, 70)
    assert heat.min() >= 0.0
    assert heat.max() <= 1.0
    rgb = np.full((90, 70, 3), 100, np.uint8)
    out = overlay(rgb, cam, alpha=0.0)
    np.testing.assert_array_equal(out, rgb)
    hot = overlay(rgb, cam, alpha=1.0)
    assert hot.shape == rgb.shape
    np.testing.assert_array_equal(hot[0, -1], [128, 0, 0])  # peak: fully opaque jet red
    np.testing.assert_array_equal(hot[0, 0], rgb[0, 0])  # zero heat: original pixel


def test_predict_explain_writes_overlays(work, ckpt, images):
    out_dir = work / "cams"
    chosen = collect_images([images])[1:3]
    argv = ["--model", str(ckpt), "--images", *map(str, chosen), "--out", str(work / "p.csv"),
            "--explain", str(out_dir), "--no-progress"]
    assert predict_mod.main(argv) == 0
    assert len(list(out_dir.iterdir())) == 2
    for path in chosen:
        cam_png = out_dir / f"{path.stem}_gradcam.png"
        with Image.open(cam_png) as img:
            assert img.mode == "RGB"
            assert img.size == Image.open(path).size


def test_explain_with_onnx_is_refused(work, onnx_fp32, images, capsys):
    onnx_path, _ = onnx_fp32
    argv = ["--model", str(onnx_path), "--images", str(images), "--out", str(work / "q.csv"),
            "--explain", str(work / "no_cams"), "--no-progress"]
    assert predict_mod.main(argv) == 2
    assert ".pth" in capsys.readouterr().err
    assert not (work / "q.csv").exists()


# ------------------------------------------------------------------------------ spec / files


def test_spec_errors_name_the_source(tmp_path, ckpt):
    with pytest.raises(SpecError, match="deploy_format"):
        spec_from_metadata({"model_name": '"mobilenet"'}, "x.onnx")
    garbage = _write(tmp_path / "garbage.onnx", b"\x12\x34 definitely not protobuf")
    with pytest.raises(SpecError, match=r"garbage\.onnx"):
        read_metadata(garbage)
    with pytest.raises(SpecError, match=r"garbage\.onnx"):
        OnnxPredictor(garbage)
    with pytest.raises(SpecError, match="img_size"):
        spec_from_checkpoint(
            {**_payload(torch.nn.Linear(1, 1)), "img_size": "big"}, tmp_path / "c.pth"
        )
    with pytest.raises(SpecError, match="num_classes=9"):
        spec_from_checkpoint({**_payload(torch.nn.Linear(1, 1)), "num_classes": 9}, tmp_path / "c.pth")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, failing)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write_with(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.slow
def test_bench_deploy_quick(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_deploy.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    for role, params in (("teacher", 23_524_424), ("student", 2_234_120)):
        res = results["models"][role]
        assert res["params"] == params
        assert res["bytes"]["onnx_fp32"] / res["bytes"]["onnx_int8"] > 3.0
        assert res["onnx_export_max_abs_diff"] <= 1e-4  # the export's DEFAULT_TOL, enforced there
        assert all(v > 0 for fmt in res["latency_ms"].values() for v in fmt.values())
    assert "int8 student vs eager fp32 teacher (1_thread)" in results["speedups"]
