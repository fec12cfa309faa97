"""Nothing lost, nothing mixed up: the export and predict commands as a hostile user runs them.

Every command here either does the right thing or stops with exit 2 and one ``error:`` line,
and no file that existed before is changed (issue #20, items 1 and 7). The model is a 64 px
random-weight MobileNet-V2 exported once with the fast legacy exporter.

Read-only file system: the tests run as root, so ``chmod`` stops nothing. One test mounts a
real read-only tmpfs in a private mount namespace (``unshare --mount``; skipped where that is
not permitted), the other makes the atomic writer's ``mkstemp`` raise ``EROFS`` (always runs).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raug.deploy import export as export_mod
from raug.deploy import predict as predict_mod
from raug.deploy.export import export_onnx, export_torchscript
from raug.deploy.filekind import describe_bytes
from raug.deploy.submission import image_ids, is_tool_csv
from raug.deploy.synthetic import demo_checkpoint_payload, demo_model, synthetic_images
from raug.deploy.torch_backend import load_model
from raug.files.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    model = demo_model("mobilenet", 8, SIZE, seed=0, logit_std=3.0, num_images=16)
    return save_checkpoint(work / "student.pth", demo_checkpoint_payload(model, SIZE))


@pytest.fixture(scope="module")
def onnx_model(work, ckpt) -> Path:
    path = work / "student.onnx"
    export_onnx(*load_model(ckpt), path, dynamo=False)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(synthetic_images(3, SIZE, seed=3)):
        Image.fromarray(img).save(folder / f"ISIC_{i:07d}.{'png' if i == 1 else 'jpg'}")
    return folder


def _snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under ``roots`` with its bytes (to prove nothing changed)."""
    files = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                files[path] = path.read_bytes()
    return files


def _run(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main([*argv, "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


def _refused(code: int, err: list[str], *needles: str) -> None:
    """Exit 2 with exactly one line, ``error: ...``, mentioning every needle."""
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err)


def _predict(model: Path, images: list[Path], out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--images", *map(str, images), "--out", str(out), *extra]


# ------------------------------------------------------------------ item 1: outputs vs inputs


def test_predict_refuses_out_equal_to_an_input_image(onnx_model, images, capsys):
    target = images / "ISIC_0000001.png"
    before = _snapshot(images, onnx_model)
    code, err = _run(predict_mod.main, _predict(onnx_model, [target, images / "ISIC_0000000.jpg"],
                                                target), capsys)
    _refused(code, err, "input", str(target))
    assert _snapshot(images, onnx_model) == before


def test_predict_refuses_out_equal_to_the_model_also_through_a_symlink(
    onnx_model, images, tmp_path, capsys
):
    before = _snapshot(images, onnx_model)
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], onnx_model), capsys)
    _refused(code, err, "model")
    link = tmp_path / "preds.csv"
    link.symlink_to(onnx_model)
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], link), capsys)
    _refused(code, err, "model")
    assert link.is_symlink()
    assert _snapshot(images, onnx_model) == before


def test_predict_refuses_out_inside_the_image_folder(onnx_model, images, tmp_path, capsys):
    before = _snapshot(images)
    for out in (images / "preds.csv", images / "new" / "preds.csv"):
        code, err = _run(predict_mod.main, _predict(onnx_model, [images], out), capsys)
        _refused(code, err, "image folder")
    # through a symlinked folder that leads into the image folder
    (tmp_path / "elsewhere").symlink_to(images)
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], tmp_path / "elsewhere" / "p.csv"),
                     capsys)
    _refused(code, err, "image folder")
    assert _snapshot(images) == before
    assert not (images / "new").exists()


def test_predict_refuses_a_folder_as_out(onnx_model, images, tmp_path, capsys):
    (tmp_path / "results").mkdir()
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], tmp_path / "results"), capsys)
    _refused(code, err, "folder")


def test_predict_overwrites_only_its_own_csv_unless_forced(onnx_model, images, tmp_path, capsys):
    truth = tmp_path / "ISIC_2019_Training_GroundTruth.csv"  # same header as a submission
    truth.write_text("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_0000000,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    notes = tmp_path / "notes.csv"
    notes.write_text("patient,comment\n17,follow up\n")
    for victim in (truth, notes):
        before = victim.read_bytes()
        for fmt in ("default", "isic2019"):
            code, err = _run(predict_mod.main,
                             _predict(onnx_model, [images], victim, "--format", fmt), capsys)
            _refused(code, err, str(victim), "--force")
            assert victim.read_bytes() == before
    # a CSV this tool wrote is replaced without --force, in either format
    out = tmp_path / "preds.csv"
    for fmt in ("default", "isic2019", "default"):
        code, err = _run(predict_mod.main, _predict(onnx_model, [images], out, "--format", fmt), capsys)
        assert code == 0, err
    assert out.read_text().startswith("image,PRED,")
    # --force replaces a foreign file (but never an input, see above)
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], notes, "--force"), capsys)
    assert code == 0, err
    assert notes.read_text().startswith("image,PRED,")


def test_tool_csv_recognition(tmp_path):
    cases = {
        "default.csv": ("image,PRED,AK,BCC\na,BCC,0.25000000,0.75000000\n", True),
        "isic.csv": ("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
                     "a,0.10000000,0.20000000,0.30000000,0.10000000,0.10000000,0.10000000,"
                     "0.05000000,0.05000000,0.00000000\n", True),
        "header_only.csv": ("image,PRED,AK,BCC\n", True),
        "truth.csv": ("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\na,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n",
                      False),
        "engine.csv": ("image,REAL,PRED,AK,BCC\na,AK,AK,0.9,0.1\n", False),
        "short_row.csv": ("image,PRED,AK,BCC\na,BCC,0.25000000\n", False),
        "text.csv": ("hello\n", False),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert is_tool_csv(path) is expected, name
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert is_tool_csv(binary) is False


def test_export_refuses_out_equal_to_the_checkpoint(ckpt, tmp_path, capsys):
    victim = shutil.copy(ckpt, tmp_path / "best.pth")
    before = _snapshot(victim)
    for flag in ("--out", "--torchscript"):
        argv = ["--checkpoint", str(victim), "--out", str(tmp_path / "m.onnx"), flag, str(victim)]
        code, err = _run(export_mod.main, argv, capsys)
        _refused(code, err, "checkpoint")
    link = tmp_path / "link.onnx"
    link.symlink_to(victim)
    code, err = _run(export_mod.main, ["--checkpoint", str(victim), "--out", str(link)], capsys)
    _refused(code, err, "checkpoint")
    assert _snapshot(victim) == before
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_outputs_that_collide_or_sit_in_the_calibration_folder(
    ckpt, images, tmp_path, capsys
):
    out = tmp_path / "m.onnx"
    for argv in (
        ["--out", str(out), "--torchscript", str(out)],
        ["--out", str(out), "--quantize", "int8", "--int8-out", str(out)],
        ["--out", str(images / "m.onnx"), "--quantize", "int8", "--calibration", str(images)],
        ["--out", str(out), "--quantize", "int8", "--calibration", str(images),
         "--int8-out", str(images / "ISIC_0000000.jpg")],
    ):
        before = _snapshot(images)
        code, err = _run(export_mod.main, ["--checkpoint", str(ckpt), *argv], capsys)
        _refused(code, err)
        assert _snapshot(images) == before
        assert not out.exists()


def test_export_overwrites_only_its_own_files_unless_forced(ckpt, onnx_model, tmp_path, capsys):
    foreign_onnx = tmp_path / "other.onnx"
    foreign_onnx.write_bytes(b"\x08\x07\x12\x05other")  # an ONNX-looking file of someone else
    foreign_pt = tmp_path / "other.pt"
    with zipfile.ZipFile(foreign_pt, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    for argv in (["--out", str(foreign_onnx)],
                 ["--out", str(tmp_path / "m.onnx"), "--torchscript", str(foreign_pt)]):
        before = _snapshot(foreign_onnx, foreign_pt)
        code, err = _run(export_mod.main, ["--checkpoint", str(ckpt), *argv], capsys)
        _refused(code, err, "--force")
        assert _snapshot(foreign_onnx, foreign_pt) == before
    # the project's own ONNX file is replaced without --force
    ours = shutil.copy(onnx_model, tmp_path / "ours.onnx")
    code, err = _run(export_mod.main,
                     ["--checkpoint", str(ckpt), "--out", str(ours), "--exporter", "legacy"], capsys)
    assert code == 0, err
    code, err = _run(export_mod.main, ["--checkpoint", str(ckpt), "--out", str(foreign_onnx),
                                       "--exporter", "legacy", "--force"], capsys)
    assert code == 0, err
    assert foreign_onnx.read_bytes() == ours.read_bytes()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_recognises_its_own_torchscript(ckpt, tmp_path):
    from raug.deploy.filekind import is_deploy_torchscript

    out = tmp_path / "student.pt"
    export_torchscript(*load_model(ckpt), out)
    assert is_deploy_torchscript(out)
    assert not is_deploy_torchscript(ckpt)  # a checkpoint is a zip too, without the metadata


def test_explain_refuses_foreign_overlays_and_the_image_folder(ckpt, images, tmp_path, capsys):
    cams = tmp_path / "cams"
    cams.mkdir()
    foreign = cams / "ISIC_0000000_gradcam.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(foreign)
    before = _snapshot(images, cams)
    out = tmp_path / "p.csv"
    code, err = _run(predict_mod.main, _predict(ckpt, [images], out, "--explain", str(cams)), capsys)
    _refused(code, err, str(foreign), "--force")
    code, err = _run(predict_mod.main, _predict(ckpt, [images], out, "--explain", str(images)), capsys)
    _refused(code, err, "image folder")
    assert _snapshot(images, cams) == before
    assert not out.exists()
    # overlays written by the tool are recognised and replaced on a second run
    fresh = tmp_path / "fresh"
    for _ in range(2):
        code, err = _run(predict_mod.main, _predict(ckpt, [images], out, "--explain", str(fresh)), capsys)
        assert code == 0, err
    assert len(list(fresh.iterdir())) == 3


# ----------------------------------------------------------------- item 7: what the file is


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"", "empty"),
        (b"image,MEL,NV\nISIC_1,0.2,0.8\n", "CSV"),
        (b'{"model": "mobilenet"}\n', "JSON"),
        (b"just some notes\nabout the model\n", "text"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
        (b"\x08\x08\x12\x07pytorch\x1a\x062.1", "ONNX"),
        (b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8", "pickle"),
        (b"PK\x03\x04\x14\x00\x00\x00", "ZIP"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\x1f\x8b\x08\x00", "gzip"),
    ],
)
def test_describe_bytes(content, kind):
    assert kind in describe_bytes(content)


def _make_model_file(kind: str, tmp_path: Path, onnx_model: Path, ckpt: Path) -> Path:
    path = tmp_path / "model.pth"
    if kind == "csv":
        path.write_text("image,MEL,NV\nISIC_0000000,0.2,0.8\n")
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "json":
        path.write_text(json.dumps({"class_names": ["AK"]}))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "jpeg":
        Image.new("RGB", (8, 8)).save(path, format="JPEG")
    elif kind == "onnx":
        shutil.copy(onnx_model, path)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "not a model")
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("csv", "CSV"), ("text", "text"), ("json", "JSON"), ("empty", "empty"), ("jpeg", "JPEG"),
     ("onnx", "ONNX"), ("zip", "ZIP")],
)
def test_a_non_checkpoint_model_file_is_named_for_what_it_is(
    kind, needle, tmp_path, onnx_model, ckpt, images, capsys
):
    model = _make_model_file(kind, tmp_path, onnx_model, ckpt)
    out = tmp_path / "p.csv"
    code, err = _run(predict_mod.main, _predict(model, [images], out), capsys)
    _refused(code, err, needle, str(model))
    assert "execute code" not in err[0]
    assert not out.exists()
    code, err = _run(export_mod.main, ["--checkpoint", str(model), "--out", str(tmp_path / "m.onnx")],
                     capsys)
    _refused(code, err, needle)


def test_a_non_onnx_file_named_onnx_is_named_for_what_it_is(tmp_path, ckpt, images, capsys):
    for content, needle in ((b"image,MEL\nx,1.0\n", "CSV"), (ckpt.read_bytes(), "PyTorch checkpoint")):
        model = tmp_path / "model.onnx"
        model.write_bytes(content)
        code, err = _run(predict_mod.main, _predict(model, [images], tmp_path / "p.csv"), capsys)
        _refused(code, err, needle)


def test_an_image_given_as_model_is_named(images, tmp_path, capsys):
    model = images / "ISIC_0000000.jpg"
    code, err = _run(predict_mod.main, _predict(model, [images], tmp_path / "p.csv"), capsys)
    _refused(code, err, "JPEG")


def test_nothing_predicted_writes_nothing(onnx_model, tmp_path, capsys):
    bad = tmp_path / "lesion.jpg"
    bad.write_text("not an image")
    out = tmp_path / "p.csv"
    code, err = _run(predict_mod.main, _predict(onnx_model, [bad], out), capsys)
    _refused(code, err, str(bad), "nothing written")
    assert not out.exists()
    # an earlier result at the same place is kept as it was
    out.write_text("image,PRED,AK\nold,AK,1.00000000\n")
    code, err = _run(predict_mod.main, _predict(onnx_model, [bad], out), capsys)
    _refused(code, err, "nothing written")
    assert out.read_text() == "image,PRED,AK\nold,AK,1.00000000\n"


def test_image_ids_are_unique():
    paths = [Path("x/a.jpg"), Path("x/a.png"), Path("x/b.jpg")]
    assert image_ids(paths) == ["a.jpg", "a.png", "b"]
    with pytest.raises(ValueError, match=r"a\.jpg.*a\.png"):
        image_ids(paths, keep_extension=False)
    assert image_ids([Path("a.jpg"), Path("b.jpg")], keep_extension=False) == ["a", "b"]
    with pytest.raises(ValueError, match="same file name"):
        image_ids([Path("x/a.jpg"), Path("y/a.jpg")])


def test_same_stem_inputs_get_unique_ids(onnx_model, images, tmp_path, capsys):
    shutil.copy(images / "ISIC_0000001.png", images / "ISIC_0000000.png")  # stem of a .jpg
    out = tmp_path / "p.csv"
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], out), capsys)
    assert code == 0, err
    ids = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert ids == ["ISIC_0000000.jpg", "ISIC_0000000.png", "ISIC_0000001", "ISIC_0000002"]
    # the leaderboard needs ids without extension: refused, naming the clashing files
    isic = tmp_path / "isic.csv"
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], isic, "--format", "isic2019"),
                     capsys)
    _refused(code, err, "ISIC_0000000.jpg", "ISIC_0000000.png")
    assert not isic.exists()


# ------------------------------------------------------------------ item 7: read-only storage


def _fail_mkstemp(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))


def test_read_only_storage_is_one_line_exit_2_monkeypatched(
    ckpt, onnx_model, images, tmp_path, monkeypatch, capsys
):
    """``tempfile.mkstemp`` (the atomic writer's first write) raises EROFS, as on a ro mount."""
    monkeypatch.setattr("tempfile.mkstemp", _fail_mkstemp)
    out = tmp_path / "p.csv"
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], out), capsys)
    _refused(code, err, "Read-only file system")
    code, err = _run(export_mod.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")],
                     capsys)
    _refused(code, err, "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_write_failure_after_prediction_is_one_line(onnx_model, images, tmp_path, monkeypatch, capsys):
    def fail(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(predict_mod, "atomic_write_text", fail)
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], tmp_path / "p.csv"), capsys)
    _refused(code, err, "Read-only file system", "p.csv")


def _can_mount_in_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
        capture_output=True, check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_in_namespace(), reason="mounting is not permitted here")
def test_read_only_mount_is_one_line_exit_2(onnx_model, images, tmp_path):
    """A real read-only tmpfs, mounted in a private mount namespace (gone with the process)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    predict = (f"{sys.executable} {ROOT / 'tools' / 'predict.py'} --model {onnx_model} "
               f"--images {images} --out {ro / 'p.csv'} --no-progress")
    script = f"mount -t tmpfs -o ro tmpfs {ro} && {predict}"
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, check=False)
    err = proc.stderr.strip().splitlines()
    _refused(proc.returncode, err, "Read-only file system")


def test_out_path_through_a_file_is_one_line(onnx_model, images, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me\n")
    code, err = _run(predict_mod.main, _predict(onnx_model, [images], blocker / "p.csv"), capsys)
    _refused(code, err, str(blocker))
    assert blocker.read_text() == "keep me\n"
    assert np.all([p.name != "p.csv" for p in tmp_path.rglob("*")])
