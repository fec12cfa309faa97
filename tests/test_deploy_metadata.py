"""Deployment of networks that fuse patient metadata (issue #17, "Portable").

Two-input ONNX export with the columns named, ``predict.py --metadata`` encoded exactly as
preparation encodes (checked against the training dataset's own numbers), the gaps counted,
``.pth`` and ``.onnx`` agreeing, refusals, and int8 with calibration metadata. A 64 px
MobileNet-V2 with MetaBlock fusion and random weights keeps it fast; the ONNX files are
built once per module.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import models
from raug.data.loaders import META_COLUMNS, IsicDataset, read_parsed_csv
from raug.deploy import export as export_mod
from raug.deploy import predict as predict_mod
from raug.deploy.export import export_onnx
from raug.deploy.metadata import NO_ROW, read_metadata_csv
from raug.deploy.onnx_backend import OnnxPredictor, read_metadata
from raug.deploy.predict import predict_batch
from raug.deploy.spec import SpecError
from raug.deploy.submission import is_tool_csv
from raug.deploy.synthetic import demo_checkpoint_payload, synthetic_images
from raug.deploy.torch_backend import TorchPredictor, load_model
from raug.files.checkpoint import save_checkpoint
from raug.isic2019 import prepare, synthesize
from raug.isic2019.schema import METADATA_CSV, DataWarning

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
FUSION = models.FusionSpec.from_config("metablock", [40, 11], 0, 1280)
# As for the image-only student (tests/test_deploy.py): float32 rounding of two kernel
# paths grows like u * sqrt(K) * max|z| with the widest reduction K = 1280 (the MetaBlock
# gates are element-wise, one rounding each, and add nothing wider), and softmax halves an
# absolute logit error; for logits of at most ~15 that is 3.2e-5 < 1e-4, the export's own
# verification tolerance. Measured by the export's own check on this model: 3e-8.
FP32_PATHS_TOL = 1e-4
# Official-format metadata of the four test images: image 0 complete; image 1 with blanks,
# mixed case and no age; image 2 with an unknown site and an invalid age; image 3 has no
# row; ISIC_9 is not among the images.
META_CSV = """image,age_approx,anatom_site_general,lesion_id,sex
ISIC_0000000,55.0,anterior torso,L1,female
ISIC_0000001,, Head/Neck ,,  MALE
ISIC_0000002,abc,scalp,L3,
ISIC_9,30,palms/soles,L9,male
"""
# By hand: age / 100, female, male, anterior torso, head/neck, lateral torso,
# lower extremity, oral/genital, palms/soles, posterior torso, upper extremity.
EXPECTED = np.array([
    [0.55, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    [0.0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
    [0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
], np.float32)
EXPECTED_GAPS = [
    (),
    ("age_missing",),
    ("age_invalid", "sex_missing", "site_unknown"),
    (NO_ROW,),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy_meta")


@pytest.fixture(scope="module")
def fused_model() -> models.KDNet:
    torch.manual_seed(0)
    model = models.create_model("mobilenet", 8, fusion=FUSION).eval()
    with torch.no_grad():  # spread the logits so that probabilities differ visibly
        model.classifier.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def fused_ckpt(work, fused_model) -> Path:
    payload = demo_checkpoint_payload(fused_model, SIZE, fusion=FUSION.to_dict())
    return save_checkpoint(work / "fused.pth", payload)


@pytest.fixture(scope="module")
def fused_onnx(work, fused_ckpt) -> Path:
    model, spec = load_model(fused_ckpt)
    path = work / "fused.onnx"
    assert export_onnx(model, spec, path) <= FP32_PATHS_TOL
    return path


@pytest.fixture(scope="module")
def images(work) -> Path:
    folder = work / "images"
    folder.mkdir()
    for i, img in enumerate(synthetic_images(4, 96, seed=3)):
        Image.fromarray(img).save(folder / f"ISIC_{i:07d}.jpg")
    return folder


@pytest.fixture(scope="module")
def meta_csv(work) -> Path:
    path = work / "meta.csv"
    path.write_text(META_CSV)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------- encoding


def test_metadata_csv_is_encoded_by_hand_values_with_its_gaps(meta_csv):
    table = read_metadata_csv(meta_csv)
    features, gaps = table.lookup([f"ISIC_{i:07d}" for i in range(4)])
    np.testing.assert_array_equal(features, EXPECTED)
    assert gaps == EXPECTED_GAPS
    # preparation's own warnings, kept for the command's output
    assert len(table.warnings) == 2
    assert "unknown anatom_site_general value(s) 'scalp'" in table.warnings[0]
    assert "invalid age_approx value(s) 'abc'" in table.warnings[1]
    assert table.summary(gaps) == (
        f"metadata {meta_csv}: 1 of 4 image(s) complete; no_row 1, age_missing 1, "
        "age_invalid 1, sex_missing 1, site_unknown 1 (counted as missing -> 0, as "
        "preparation does)"
    )


def test_prediction_encoding_equals_the_training_datasets(tmp_path):
    """The official CSV through predict's reader gives bit for bit the numbers the training
    dataset reads from the prepared CSVs, including the values preparation repairs."""
    root = synthesize(tmp_path / "ds", num_images=40, image_size=32, seed=5, progress=False)
    meta_path = root / METADATA_CSV
    with open(meta_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    edits = [("age_approx", ""), ("age_approx", "47.5"), ("age_approx", "-3"),
             ("anatom_site_general", "scalp"), ("anatom_site_general", " LATERAL TORSO"),
             ("sex", "Female "), ("sex", "unknown"), ("anatom_site_general", "")]
    for row, (column, value) in zip(rows, edits, strict=False):
        row[column] = value
    with open(meta_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        prepare(root, size=None, workers=1, progress=False)
        table = read_metadata_csv(meta_path)
    for part, csv_name in (("train", "ISIC2019_parsed_train.csv"),
                           ("test", "ISIC2019_parsed_test.csv")):
        frame = read_parsed_csv(root / part / csv_name)
        dataset = IsicDataset(frame, root / part / "imgs", None, csv_name)
        features, gaps = table.lookup(dataset.ids)
        assert dataset.meta.numpy().tobytes() == features.tobytes()
        assert NO_ROW not in {g for image_gaps in gaps for g in image_gaps}
    edited = {row["image"]: row for row in rows[: len(edits)]}
    features, gaps = table.lookup(list(edited))
    assert features[1, 0] == np.float32(47.5) / np.float32(100.0)
    assert features[0, 0] == features[2, 0] == 0.0  # missing, invalid
    # (the synthesizer leaves some cells empty itself: only the edited column is checked)
    assert "age_missing" in gaps[0]
    assert "age_invalid" in gaps[2]
    assert not {"age_missing", "age_invalid"} & set(gaps[1])
    assert "site_unknown" in gaps[3]
    assert not features[3, 3:].any()
    assert features[4, 3 + 2] == 1.0  # lateral torso, case and blanks ignored
    assert features[5, 1] == 1.0
    assert "sex_unknown" in gaps[6]
    assert not features[6, 1:3].any()
    assert "site_missing" in gaps[7]


# --------------------------------------------------------------------------------- export


def test_checkpoint_without_fusion_key_infers_it(work, fused_model):
    payload = demo_checkpoint_payload(fused_model, SIZE)
    _, spec = load_model(save_checkpoint(work / "seed_like.pth", payload))
    assert spec.fusion == FUSION.to_dict()
    assert spec.uses_metadata


def test_fused_export_has_two_inputs_and_names_the_columns(fused_onnx):
    proto = onnx.load(str(fused_onnx))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}
    assert list(inputs) == ["input", "metadata"]
    assert inputs["input"][1:] == [3, SIZE, SIZE]
    assert inputs["metadata"][1:] == [11]
    meta = {k: json.loads(v) for k, v in read_metadata(fused_onnx).items()}
    assert meta["fusion"] == FUSION.to_dict()
    assert meta["metadata_input"]["name"] == "metadata"
    assert meta["metadata_input"]["columns"] == list(META_COLUMNS)
    assert meta["metadata_input"]["shape"] == ["batch", 11]
    encoding = meta["metadata_input"]["encoding"]
    assert "/ 100" in encoding["age_approx"]
    assert "-> 0" in encoding["age_approx"]
    assert "-> all 0" in encoding["sex"]
    assert "-> all 0" in encoding["anatom_site_general"]


# ------------------------------------------------------------------------------- predict


def test_pth_and_onnx_give_the_same_probabilities_and_metadata_matters(
    work, fused_ckpt, fused_onnx, images, meta_csv, capsys
):
    results = {}
    for model in (fused_ckpt, fused_onnx):
        out = work / f"preds_{model.suffix[1:]}.csv"
        assert predict_mod.main(["--model", str(model), "--images", str(images), "--out",
                                 str(out), "--metadata", str(meta_csv), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "1 of 4 image(s) complete; no_row 1, age_missing 1, age_invalid 1" in err
        assert "warning:" in err
        assert "scalp" in err
        rows = _read_csv(out)
        assert [r["metadata"] for r in rows] == [
            "complete", "age_missing", "age_invalid;sex_missing;site_unknown", "no_row"]
        results[model.suffix] = np.array([[float(r[c]) for c in r if c not in
                                           ("image", "PRED", "metadata")] for r in rows])
        assert is_tool_csv(out)  # a rerun may replace it without --force
    assert np.abs(results[".pth"] - results[".onnx"]).max() <= FP32_PATHS_TOL
    # the metadata reach the network: other metadata, other probabilities
    predictor = TorchPredictor(fused_ckpt)
    batch = np.zeros((4, 3, SIZE, SIZE), np.float32)
    shifted = predictor.predict_probs(batch, EXPECTED) - predictor.predict_probs(batch, EXPECTED[::-1].copy())
    assert np.abs(shifted).max() > 100 * FP32_PATHS_TOL


def test_grad_cam_of_a_fused_model_feeds_each_images_metadata(work, fused_ckpt, images):
    predictor = TorchPredictor(fused_ckpt)
    paths = sorted(images.iterdir())
    written = predictor.explain(paths, [0, 1, 2, 3], work / "cams", progress=False,
                                meta=EXPECTED)
    assert [p.name for p in written] == [f"{p.stem}_gradcam.png" for p in paths]
    with pytest.raises(ValueError, match="fuses metadata"):
        predictor.explain(paths[:1], [0], work / "cams", progress=False)


def test_tta_gives_every_view_the_images_metadata(fused_onnx):
    predictor = OnnxPredictor(fused_onnx)
    batch = np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    tta = predict_batch(predictor, batch, tta=True, meta=EXPECTED)
    single = np.stack([predict_batch(predictor, batch[i:i + 1], tta=True, meta=EXPECTED[i:i + 1])[0]
                       for i in range(4)])
    np.testing.assert_allclose(tta, single, atol=1e-6)


def test_isic_format_keeps_its_columns_and_counts_on_stderr(work, fused_onnx, images, meta_csv, capsys):
    out = work / "lb.csv"
    assert predict_mod.main(["--model", str(fused_onnx), "--images", str(images), "--out", str(out),
                             "--metadata", str(meta_csv), "--format", "isic2019",
                             "--no-progress"]) == 0
    assert list(_read_csv(out)[0]) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC",
                                       "SCC", "UNK"]
    assert "no_row 1" in capsys.readouterr().err


def test_fused_model_without_metadata_is_refused_in_one_line(work, fused_onnx, fused_ckpt, images,
                                                            capsys):
    for model in (fused_onnx, fused_ckpt):
        out = work / "refused.csv"
        assert predict_mod.main(["--model", str(model), "--images", str(images), "--out",
                                 str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        assert err.startswith("error:")
        assert "fuses patient metadata (metablock: age_approx, female, male" in err
        assert "give --metadata CSV" in err
        assert not out.exists()


def test_image_only_model_with_metadata_is_refused(work, fused_model, images, meta_csv, capsys):
    plain = models.create_model("mobilenet", 8).eval()
    ckpt = save_checkpoint(work / "plain.pth", demo_checkpoint_payload(plain, SIZE))
    out = work / "plain.csv"
    assert predict_mod.main(["--model", str(ckpt), "--images", str(images), "--out", str(out),
                             "--metadata", str(meta_csv), "--no-progress"]) == 2
    assert "is an image-only model (no metadata fusion) and would ignore it" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="does not use patient metadata"):
        TorchPredictor(ckpt).predict_probs(np.zeros((1, 3, SIZE, SIZE), np.float32), EXPECTED[:1])


def test_metadata_csv_is_an_input_no_output_replaces(work, fused_onnx, images, meta_csv, capsys):
    before = meta_csv.read_text()
    assert predict_mod.main(["--model", str(fused_onnx), "--images", str(images), "--out",
                             str(meta_csv), "--metadata", str(meta_csv), "--force"]) == 2
    assert "the metadata CSV" in capsys.readouterr().err
    assert meta_csv.read_text() == before


def test_model_with_other_metadata_width_is_refused(work):
    other = models.FusionSpec.from_config("concat", 5, 0, 1280)
    model = models.create_model("mobilenet", 8, fusion=other)
    ckpt = save_checkpoint(work / "m5.pth", demo_checkpoint_payload(model, SIZE, fusion=other.to_dict()))
    with pytest.raises(SpecError, match="fuses 5 metadata features but the prepared metadata has 11"):
        load_model(ckpt)


def test_onnx_predict_with_metadata_runs_with_torch_blocked(work, fused_onnx, images, meta_csv,
                                                            tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "onnx", "albumentations"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, str(ROOT / "tools" / "predict.py"), "--model", str(fused_onnx),
           "--images", str(images), "--out", str(out), "--metadata", str(meta_csv), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(blocker)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (work / "preds_onnx.csv").read_text()


# ------------------------------------------------------------------------------------ int8


def test_int8_static_with_calibration_metadata(work, fused_ckpt, images, meta_csv, capsys):
    out = work / "cli.onnx"
    base = ["--checkpoint", str(fused_ckpt), "--out", str(out), "--exporter", "legacy",
            "--quantize", "int8", "--calibration", str(images), "--no-progress"]
    assert export_mod.main(base) == 2  # static calibration of a fused model needs metadata
    assert "static calibration needs the images' metadata CSV" in capsys.readouterr().err
    assert export_mod.main([*base, "--calibration-metadata", str(meta_csv), "--force"]) == 0
    err = capsys.readouterr().err
    assert "calibration metadata" in err
    assert "1 of 4 image(s) complete" in err
    int8 = OnnxPredictor(work / "cli.int8.onnx")
    assert [i.name for i in int8.session.get_inputs()] == ["input", "metadata"]
    assert json.loads(read_metadata(work / "cli.int8.onnx")["quantization"])["num_calibration"] == 4
    probs = int8.predict_probs(np.zeros((2, 3, SIZE, SIZE), np.float32), EXPECTED[:2])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_int8_dynamic_of_a_fused_model(work, fused_onnx):
    from raug.deploy.quantize import quantize_onnx

    report = quantize_onnx(fused_onnx, work / "fused.dyn.int8.onnx")
    assert report.mode == "dynamic"
    assert report.num_compared == 16
    assert report.top1_agreement >= 0.5
