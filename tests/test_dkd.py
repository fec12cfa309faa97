"""D-KD task: named parts per _kd_method, hand-recomputed totals, frozen teacher, teacher files."""

import copy
import itertools
import logging
from types import SimpleNamespace

import pytest
import torch

import kd_losses as K
import models
from raug.data.loaders import CLASS_NAMES
from raug.errors import ConfigError
from raug.files.checkpoint import CheckpointError, save_checkpoint
from raug.methods.dkd import DKDTask, dkd_task
from raug.methods.metadata import METADATA_KEYS
from raug.methods.teacher import (
    freeze,
    frozen_forward,
    inspect_teacher,
    load_teacher,
    teacher_file_problems,
)
from raug.run.config import SHARED_CONFIG
from raug.testing import sgd_losses

SIZE = 32  # 1x1 feature maps: the smallest input the networks take
N = 4
WEIGHTS = {"lambd": 0.3, "T": 3.0, "lambd_drkd": 2.0, "lambd_crkd": 500.0, "lambd_fitnet": 0.7}
PARTS = {
    "none": {"ce"},
    "blkd": {"ce", "kd"},
    "rkd": {"ce", "kd", "rkd_distance", "rkd_angle"},
    "crkd": {"ce", "kd", "channel_relation"},
    "d_kd": {"ce", "kd", "rkd_distance", "rkd_angle", "channel_relation"},
    "fitnet": {"ce", "fitnet"},
}


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numeric]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = freeze(models.create_model("resnet-50", 8))
    student = models.create_model("mobilenet", 8)
    adapter = models.build_adapter(student, teacher, SIZE)
    return {"teacher": teacher, "student": student, "adapter": adapter}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(N, 3, SIZE, SIZE, generator=gen),
        "label": torch.tensor([0, 3, 5, 5]),
        "meta": torch.zeros(N, 11),
        "id": [f"img{i}" for i in range(N)],
    }


def make_task(nets, method, **weights):
    """A fresh task on copies of the module-scoped networks (the teacher is shared)."""
    teacher = nets["teacher"]
    w = K.DKDWeights(**{k: v for k, v in weights.items() if not k.startswith("lambd_")},
                     lambd_fitnet=weights.get("lambd_fitnet", 1.0),
                     relational=K.RelationalWeights(weights.get("lambd_drkd", 1.0),
                                                    weights.get("lambd_crkd", 1000.0)))
    needs_adapter = K.dkd_method(method).needs_adapter(w)
    adapter = copy.deepcopy(nets["adapter"]) if needs_adapter else None
    return DKDTask(
        copy.deepcopy(nets["student"]),
        None if method == "none" else teacher,
        adapter,
        class_weight=torch.linspace(0.5, 2.0, 8),
        method=method,
        weights=w,
    )


@pytest.mark.parametrize("method", list(PARTS))
def test_one_step_returns_exactly_the_methods_parts_and_updates_only_the_student(nets, batch, method):
    task = make_task(nets, method)
    task.train()
    teacher_before = {k: v.clone() for k, v in nets["teacher"].state_dict().items()}
    student_before = [p.detach().clone() for p in task.trainable_parameters()]
    out = task.train_step(batch)
    assert set(out) == {"loss", "logits"} | PARTS[method]
    assert out["logits"].shape == (N, 8)
    assert out["loss"].requires_grad
    assert out["loss"].dim() == 0
    opt = torch.optim.SGD(task.trainable_parameters(), lr=0.1)
    out["loss"].backward()
    opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(student_before, task.trainable_parameters()))
    # the teacher: no gradients, eval mode, weights and BN statistics untouched
    teacher = nets["teacher"]
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert ("teacher" in task.frozen) == (method != "none")
    assert ("adapter" in task.trained) == (method in ("crkd", "d_kd", "fitnet"))


@pytest.mark.parametrize("method", list(PARTS))
def test_total_is_the_weighted_sum_of_parts_recomputed_by_hand(nets, batch, method):
    task = make_task(nets, method, **WEIGHTS)
    task.train()
    out = task.train_step(batch)
    student, adapter = task.trained["model"], task.trained.get("adapter")
    x, y, w = batch["image"], batch["label"], task.class_weight
    s = student.forward_kd(x)  # train-mode BN: same batch, same output
    with torch.no_grad():
        t = nets["teacher"].forward_kd(x)
    hand = {"ce": K.weighted_ce(s["logits"], y, w)}
    if method not in ("none", "fitnet"):
        hand["kd"] = K.soft_kd(s["logits"], t["logits"], WEIGHTS["T"])
    if method in ("rkd", "d_kd"):
        hand["rkd_distance"] = K.rkd_distance(s["avg_pool"], t["avg_pool"])
        hand["rkd_angle"] = K.rkd_angle(s["avg_pool"], t["avg_pool"])
    if method in ("crkd", "d_kd"):
        hand["channel_relation"] = K.channel_relation(adapter(s["feats_7x7"]), t["feats_7x7"])
    if method == "fitnet":
        hand["fitnet"] = K.fitnet(adapter(s["feats_7x7"]), t["feats_7x7"])
    # the step runs the same modules and loss functions on the same inputs: the same kernels,
    # so the parts are equal on any CPU (observed 0 with the generic and AVX2 kernels)
    for name, value in hand.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name

    lambd, T = WEIGHTS["lambd"], WEIGHTS["T"]
    if method == "none":
        total = hand["ce"]
    elif method == "fitnet":
        total = hand["ce"] + WEIGHTS["lambd_fitnet"] * hand["fitnet"]
    else:
        total = (1 - lambd) * hand["ce"] + lambd * T * T * hand["kd"]
        if "rkd_distance" in hand:
            total = total + WEIGHTS["lambd_drkd"] * (25 * hand["rkd_distance"] + 50 * hand["rkd_angle"])
        if "channel_relation" in hand:
            total = total + WEIGHTS["lambd_crkd"] * hand["channel_relation"]
    # positive weights times non-negative parts, grouped differently: under 20 float32
    # roundings per side of a sum without cancellation, < 2 * 20u = 2.4e-6 (u = 2^-24) < 1e-5
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(nets, batch):
    torch.manual_seed(0)
    losses = sgd_losses(make_task(nets, "d_kd"), batch, steps=6, lr=0.003)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_eval_step_is_the_students_weighted_ce(nets, batch):
    task = make_task(nets, "d_kd")
    task.eval()
    with torch.inference_mode():
        out = task.eval_step(batch)
        logits = task.trained["model"](batch["image"])
    assert set(out) == {"loss", "logits"}
    expected = K.weighted_ce(logits, batch["label"], task.class_weight)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)  # same F.cross_entropy


def test_inference_mode_teacher_outputs_are_usable_targets(nets, batch):
    """Raw inference-mode tensors cannot be saved for backward; frozen_forward's can."""
    student, teacher = copy.deepcopy(nets["student"]), nets["teacher"]
    adapter = copy.deepcopy(nets["adapter"])
    with torch.inference_mode():
        raw = teacher.forward_kd(batch["image"])
    assert raw["feats_7x7"].is_inference()
    feats_s = adapter(student.forward_kd(batch["image"])["feats_7x7"])
    # a product saves the teacher operand for the student's gradient
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (feats_s * raw["feats_7x7"]).mean().backward()

    feats_s = adapter(student.forward_kd(batch["image"])["feats_7x7"])
    targets = frozen_forward(teacher, batch["image"])
    assert not any(v.is_inference() or v.requires_grad for v in targets.values())
    ((feats_s * targets["feats_7x7"]).mean() + K.channel_relation(feats_s, targets["feats_7x7"])).backward()
    assert adapter.conv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    for name in ("feats_7x7", "avg_pool", "logits"):
        assert torch.equal(targets[name], raw[name]), name


def test_task_refuses_a_missing_teacher_or_adapter(nets):
    student = nets["student"]
    with pytest.raises(ValueError, match="needs a teacher"):
        DKDTask(student, None, None, method="blkd")
    with pytest.raises(ValueError, match="needs an adapter"):
        DKDTask(student, nets["teacher"], None, method="d_kd")
    with pytest.raises(ValueError, match="does not use an adapter"):
        DKDTask(student, nets["teacher"], nets["adapter"], method="rkd")
    with pytest.raises(ValueError, match="_kd_method='dkd' is unknown"):
        DKDTask(student, nets["teacher"], None, method="dkd")
    # lambd_crkd = 0 switches the channel relation (and with it the adapter) off
    task = DKDTask(student, nets["teacher"], None, method="d_kd",
                   weights=K.DKDWeights(relational=K.RelationalWeights(lambd_crkd=0.0)))
    assert "adapter" not in task.trained


# ----------------------------------------------------------------------------- teacher files


def _ctx(config, tmp_path):
    data = SimpleNamespace(class_names=list(CLASS_NAMES), class_weight=None)
    base = {"_model_name_student": "mobilenet", "_model_name_teacher": "mobilenet",
            "_pretrained": False, "_resume": False, "_folder": 2, "_img_size": SIZE,
            "_teacher_ckpt": str(tmp_path / "absent.pth"), "_lambd": 0.5, "_T": 5.0,
            "_lambd_drkd": 1.0, "_lambd_crkd": 1000.0, "_lambd_fitnet": 1.0,
            **{key: SHARED_CONFIG[key] for key in METADATA_KEYS}}  # image only
    return SimpleNamespace(config={**base, **config}, data=data)


def test_method_none_neither_loads_nor_runs_a_teacher(tmp_path, batch):
    task = dkd_task(_ctx({"_kd_method": "none"}, tmp_path))  # the teacher file does not exist
    assert dict(task.frozen) == {}
    assert set(task.trained) == {"model"}
    assert set(task.train_step(batch)) == {"loss", "logits", "ce"}


@pytest.fixture(scope="module")
def small_teacher_files(tmp_path_factory):
    """MobileNet 'teachers' (small files) in the three accepted formats plus bad ones."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(3)
    net = models.create_model("mobilenet", 8)
    sd = net.state_dict()
    project = {"model_name": "mobilenet", "num_classes": 8, "class_names": list(CLASS_NAMES),
               "img_size": 64, "config": {"_folder": 3}, "epoch": 1, "model_state_dict": sd}
    files = {
        "project": save_checkpoint(folder / "project.pth", project),
        "seed": folder / "seed.pth",
        "classes": save_checkpoint(folder / "classes.pth", {
            **project, "class_names": [*CLASS_NAMES[1:], CLASS_NAMES[0]]}),
        "corrupt": folder / "corrupt.pth",
    }
    torch.save({"epoch": 7, "model_state_dict": sd}, files["seed"])
    files["corrupt"].write_bytes(b"PK\x03\x04 truncated")
    return {"files": files, "state_dict": sd}


def test_project_teacher_loads_frozen_and_warns_about_another_fold(small_teacher_files, caplog):
    path = small_teacher_files["files"]["project"]
    with caplog.at_level(logging.WARNING, logger="raug.methods.teacher"):
        teacher = load_teacher(path, "mobilenet", CLASS_NAMES, folder=2, img_size=64)
    assert "validation fold 3" in caplog.text
    assert "_folder=2" in caplog.text
    model = teacher.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for key, value in small_teacher_files["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert teacher.summary.kind == "project"
    assert teacher.summary.folder == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raug.methods.teacher"):
        load_teacher(path, "mobilenet", CLASS_NAMES, folder=3, img_size=64)
    assert "validation fold" not in caplog.text


def test_seed_format_teacher_loads(small_teacher_files):
    path = small_teacher_files["files"]["seed"]
    summary = inspect_teacher(path)
    assert (summary.kind, summary.model_name, summary.num_classes) == ("seed", "mobilenet", 8)
    assert summary.class_names is None
    assert summary.folder is None
    model = load_teacher(path, "mobilenet", CLASS_NAMES, folder=2).model
    for key, value in small_teacher_files["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_teacher_problems_name_the_file_and_the_key(small_teacher_files, tmp_path):
    files = small_teacher_files["files"]
    [missing] = teacher_file_problems(tmp_path / "nope.pth", "mobilenet", CLASS_NAMES)
    assert missing.startswith("_teacher_ckpt=")
    assert "nope.pth" in missing
    assert "does not exist" in missing
    [corrupt] = teacher_file_problems(files["corrupt"], "mobilenet", CLASS_NAMES)
    assert "corrupt.pth" in corrupt
    assert "cannot be read" in corrupt
    assert "truncated or corrupt" in corrupt
    [arch] = teacher_file_problems(files["project"], "resnet-50", CLASS_NAMES)
    assert "'mobilenet' checkpoint but _model_name_teacher='resnet-50'" in arch
    [arch_seed] = teacher_file_problems(files["seed"], "resnet-50", CLASS_NAMES)
    assert "seed.pth" in arch_seed
    assert "'mobilenet' checkpoint" in arch_seed
    [classes] = teacher_file_problems(files["classes"], "mobilenet", CLASS_NAMES)
    assert "classes.pth" in classes
    assert "trained on classes ['BCC'" in classes
    [count] = teacher_file_problems(files["seed"], "mobilenet", CLASS_NAMES[:5])
    assert "has 8 classes, the data has 5" in count
    assert teacher_file_problems(files["project"], "mobilenet", CLASS_NAMES) == []
    with pytest.raises(ConfigError, match=r"classes\.pth"):
        load_teacher(files["classes"], "mobilenet", CLASS_NAMES)
    with pytest.raises(CheckpointError, match=r"corrupt\.pth"):
        inspect_teacher(files["corrupt"])

