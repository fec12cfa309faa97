"""SSD-KD: rotation-head task, phase-2 task (parts, totals, views, frozen teacher), head reuse."""

import copy
import itertools
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import kd_losses as K
import models
from raug.data.loaders import make_loader
from raug.files.checkpoint import load_checkpoint
from raug.methods.kd_config import SSDKD_CONFIG
from raug.methods.ssdkd import SSDKDTask, teacher_head_path, uses_adapter
from raug.methods.teacher import freeze
from raug.methods.teacher_head import (
    HEAD_KIND,
    RotationHeadTask,
    head_fit_key,
    head_fit_settings,
    head_scheduler,
    prepare_teacher_head,
    rotation_accuracy,
)
from raug.run.config import SHARED_CONFIG
from raug.testing import BlobDataset, TinyNet, sgd_losses

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
B = 3  # images per batch -> 12 views
SIZE = 8
WEIGHTS = {"kd_T": 3.0, "tf_T": 2.0, "ss_T": 0.7, "ratio_tf": 0.5, "ratio_ss": 0.5,
           "hr_w": 0.5, "lambd_drkd": 2.0, "lambd_crkd": 300.0}
SSD_PARTS = {"loss", "logits", "ce", "kd", "tf", "ss", "hr", "n_tf", "n_ss",
             "rkd_distance", "rkd_angle", "channel_relation"}


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numeric]


class Recorder(nn.Module):
    """Wraps a network and keeps the last input it saw."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_features = net.num_features
        self.seen = None

    def forward_kd(self, x):
        self.seen = x.detach().clone()
        return self.net.forward_kd(x)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    teacher = freeze(TinyNet(num_classes=8, width=16, dropout=0.0))
    student = TinyNet(num_classes=8, width=8, dropout=0.0)
    return {
        "teacher": teacher,
        "teacher_head": freeze(models.ProjectionHead(16)),
        "student": student,
        "student_head": models.ProjectionHead(8),
        "adapter": models.ConvReg((8, SIZE, SIZE), (16, SIZE, SIZE)),
    }


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    return {"image": torch.randn(B, 3, SIZE, SIZE, generator=gen), "label": torch.tensor([1, 4, 4]),
            "meta": torch.zeros(B, 11), "id": ["a", "b", "c"]}


def ssd_task(tiny, **weights):
    w = K.SSDKDWeights(**{k: v for k, v in weights.items() if not k.startswith("lambd_")},
                       relational=K.RelationalWeights(weights.get("lambd_drkd", 1.0),
                                                      weights.get("lambd_crkd", 1000.0)))
    adapter = tiny["adapter"] if uses_adapter(w) else None
    return SSDKDTask(tiny["student"], tiny["student_head"], tiny["teacher"], tiny["teacher_head"],
                     adapter, class_weight=torch.linspace(0.5, 2.0, 8), weights=w)


def test_ssd_step_has_the_named_parts_and_trains_only_student_side(tiny, batch):
    task = ssd_task(tiny)
    task.train()
    frozen_before = {name: copy.deepcopy(m.state_dict()) for name, m in task.frozen.items()}
    trained_before = [p.detach().clone() for p in task.trainable_parameters()]
    out = task.train_step(batch)
    assert set(out) == SSD_PARTS
    assert out["logits"].shape == (B, 8)
    assert out["n_tf"].dtype == torch.int64
    assert 0 <= out["n_tf"].item() <= 3 * B
    assert 0 <= out["n_ss"].item() <= 3 * B
    opt = torch.optim.SGD(task.trainable_parameters(), lr=0.1)
    out["loss"].backward()
    opt.step()
    changed = [not torch.equal(a, b.detach()) for a, b in zip(trained_before, task.trainable_parameters())]
    assert all(changed)  # student, its head and the adapter all learn
    assert set(task.trained) == {"model", "proj_head", "adapter"}
    for name, module in task.frozen.items():
        assert not module.training, name
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
        for key, value in module.state_dict().items():
            assert torch.equal(value, frozen_before[name][key]), (name, key)


def test_ssd_step_feeds_both_networks_the_four_rotations_of_each_image(tiny, batch):
    tiny["teacher"] = Recorder(tiny["teacher"])
    tiny["student"] = Recorder(tiny["student"])
    task = ssd_task(tiny)
    task.train()
    task.train_step(batch)
    expected = K.rotate_views(batch["image"])
    for who in ("teacher", "student"):
        seen = tiny[who].seen
        assert torch.equal(seen, expected), who
        for i, r in itertools.product(range(B), range(4)):
            assert torch.equal(seen[4 * i + r], torch.rot90(batch["image"][i], r, dims=(-2, -1)))


def test_ssd_total_is_the_weighted_sum_of_parts_recomputed_by_hand(tiny, batch):
    task = ssd_task(tiny, **WEIGHTS)
    task.train()
    out = task.train_step(batch)
    views, y, w = K.rotate_views(batch["image"]), batch["label"], task.class_weight
    s = tiny["student"].forward_kd(views)
    proj_s = tiny["student_head"](s["avg_pool"])
    with torch.no_grad():
        t = tiny["teacher"].forward_kd(views)
        proj_t = tiny["teacher_head"](t["avg_pool"])
    terms = K.ssd_kd_terms(s["logits"], t["logits"], proj_s, proj_t, y, w,
                           weights=K.SSDKDWeights(**{k: WEIGHTS[k] for k in (
                               "kd_T", "tf_T", "ss_T", "ratio_tf", "ratio_ss")}))
    hand = {
        **terms,
        "rkd_distance": K.rkd_distance(s["avg_pool"], t["avg_pool"]),
        "rkd_angle": K.rkd_angle(s["avg_pool"], t["avg_pool"]),
        "channel_relation": K.channel_relation(tiny["adapter"](s["feats_7x7"]), t["feats_7x7"]),
    }
    hand["hr"] = (WEIGHTS["lambd_drkd"] * (25 * hand["rkd_distance"] + 50 * hand["rkd_angle"])
                  + WEIGHTS["lambd_crkd"] * hand["channel_relation"])
    # the step runs the same modules and loss functions on the same inputs: the same kernels,
    # so the parts are equal on any CPU (observed 0 with the generic and AVX2 kernels)
    for name, value in hand.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    # positive weights times non-negative parts, grouped differently: under 20 float32
    # roundings per side of a sum without cancellation, < 2 * 20u = 2.4e-6 (u = 2^-24) < 1e-5
    total = (0.1 * hand["ce"] + 0.9 * hand["kd"] + 2.7 * hand["tf"] + 10 * hand["ss"]
             + WEIGHTS["hr_w"] * hand["hr"])
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    # the logged logits are the student's on the normal views (rows 4i)
    assert torch.allclose(out["logits"], s["logits"][0::4])


def test_hr_w_zero_drops_the_relational_terms_and_the_adapter(tiny, batch):
    task = ssd_task(tiny, hr_w=0.0)
    assert "adapter" not in task.trained
    out = task.train_step(batch)
    assert set(out) == SSD_PARTS - {"rkd_distance", "rkd_angle", "channel_relation"}
    assert out["hr"].item() == 0.0
    with pytest.raises(ValueError, match="adapter is required"):
        SSDKDTask(tiny["student"], tiny["student_head"], tiny["teacher"], tiny["teacher_head"])


def test_ssd_eval_step_uses_normal_views_and_weighted_ce(tiny, batch):
    task = ssd_task(tiny)
    task.eval()
    tiny["teacher"] = Recorder(tiny["teacher"])
    with torch.inference_mode():
        out = task.eval_step(batch)
        logits = tiny["student"](batch["image"])
    assert set(out) == {"loss", "logits"}
    assert out["logits"].shape == (B, 8)
    # the same student, batch and F.cross_entropy: the same kernels on any CPU
    assert out["loss"].item() == pytest.approx(K.weighted_ce(logits, batch["label"], task.class_weight).item())


def test_a_few_ssd_steps_on_a_fixed_batch_reduce_the_loss(tiny, batch):
    losses = sgd_losses(ssd_task(tiny), batch, steps=8, lr=0.01)
    assert losses[-1] < 0.8 * losses[0], losses


def test_ssd_step_with_the_real_networks(batch):
    torch.manual_seed(0)
    teacher = freeze(models.create_model("resnet-50", 8))
    student = models.create_model("mobilenet", 8)
    task = SSDKDTask(student, models.ProjectionHead(1280), teacher,
                     freeze(models.ProjectionHead(2048)), models.build_adapter(student, teacher, 32))
    task.train()
    images = torch.nn.functional.interpolate(batch["image"], size=32)
    out = task.train_step({**batch, "image": images})
    assert set(out) == SSD_PARTS
    out["loss"].backward()
    assert task.trained["adapter"].conv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- phase 1


def test_rotation_head_task_step(tiny, batch):
    head = models.ProjectionHead(16)
    task = RotationHeadTask(head, tiny["teacher"])
    task.train()
    out = task.train_step(batch)
    assert set(out) == {"loss", "ss_acc"}
    with torch.no_grad():
        proj = head(tiny["teacher"].forward_kd(K.rotate_views(batch["image"]))["avg_pool"])
    # the same teacher, head and loss on the same views: the same kernels on any CPU
    assert out["loss"].item() == pytest.approx(K.rotation_ss_loss(proj).item(), rel=1e-6)
    assert out["ss_acc"].item() == pytest.approx(rotation_accuracy(proj).item())
    before = [p.detach().clone() for p in head.parameters()]
    out["loss"].backward()
    torch.optim.SGD(task.trainable_parameters(), lr=0.1).step()
    assert all(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    assert all(p.grad is None for p in tiny["teacher"].parameters())
    assert set(task.trained) == {"model"}


def test_rotation_accuracy_counts_views_matched_to_their_image():
    proj = torch.eye(4).repeat_interleave(4, dim=0)  # every view of image i is e_i
    assert rotation_accuracy(proj).item() == 1.0
    proj[1] = proj[4]  # image 0's first rotated view looks like image 1
    assert rotation_accuracy(proj).item() == pytest.approx(11 / 12)


def test_head_scheduler_is_the_seeds_multistep():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = head_scheduler(opt)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[29] == 1.0
    assert lrs[30] == pytest.approx(0.1)
    assert lrs[44] == pytest.approx(0.1)
    assert lrs[45] == pytest.approx(0.01)


@pytest.fixture
def head_setup(tmp_path):
    config = {**SHARED_CONFIG, **SSDKD_CONFIG, "_epochs_tune": 2, "_lr_init": 0.05,
              "_img_size": SIZE, "_device": "cpu", "_early_stop": 5,
              "_save_folder": str(tmp_path / "run")}
    torch.manual_seed(0)
    teacher = freeze(TinyNet(num_classes=8, width=16, dropout=0.0))
    train = make_loader(BlobDataset(24, num_classes=8, size=SIZE, seed=1), 6, 0, CPU, 0, train=True)
    val = make_loader(BlobDataset(12, num_classes=8, size=SIZE, seed=2), 6, 0, CPU, 0, train=False)
    info = {"path": "/teachers/a.pth", "size": 10, "mtime_ns": 5, "sha256": "a" * 64}

    def prepare(teacher_info=info, cfg=config, resume=False):
        return prepare_teacher_head(
            teacher, models.ProjectionHead(16), head_path=teacher_head_path(cfg, cfg["_save_folder"]),
            teacher_info=teacher_info, fit_key=head_fit_key(cfg), train_loader=train,
            val_loader=val, settings=head_fit_settings(cfg), resume=resume,
        )

    return {"prepare": prepare, "config": config, "info": info,
            "path": tmp_path / "run" / "teacher-head" / "teacher-head.pth"}


def test_teacher_head_is_fitted_saved_then_reused_and_refitted_when_the_teacher_changes(head_setup, caplog):
    prepare, path = head_setup["prepare"], head_setup["path"]
    with caplog.at_level(logging.INFO, logger="raug.methods.teacher_head"):
        head = prepare()
    assert "fitting the teacher's projection head: no fitted head" in caplog.text
    assert not head.training
    assert not any(p.requires_grad for p in head.parameters())
    saved = load_checkpoint(path)  # weights_only=True
    assert saved["kind"] == HEAD_KIND
    assert saved["teacher"] == head_setup["info"]
    assert saved["fit"] == {"_img_size": SIZE, "_folder": 2, "_epochs_tune": 2, "_lr_init": 0.05,
                            "_early_stop": 5}
    assert [row["epoch"] for row in saved["history"]] == [1, 2]
    assert saved["best_value"] == min(row["val.loss"] for row in saved["history"])
    assert saved["head_dim"] == 16
    for key, value in head.state_dict().items():
        assert torch.equal(saved["model_state_dict"][key], value), key
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher-head.pth"]  # work files gone

    bytes_before, mtime_before = path.read_bytes(), path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raug.methods.teacher_head"):
        again = prepare()
    assert "reused" in caplog.text
    assert "fitting" not in caplog.text
    assert path.read_bytes() == bytes_before
    assert path.stat().st_mtime_ns == mtime_before
    for key, value in again.state_dict().items():
        assert torch.equal(value, saved["model_state_dict"][key]), key

    caplog.clear()
    changed = {**head_setup["info"], "sha256": "b" * 64, "path": "/teachers/b.pth"}
    with caplog.at_level(logging.INFO, logger="raug.methods.teacher_head"):
        prepare(teacher_info=changed)
    assert "the teacher changed" in caplog.text
    assert load_checkpoint(path)["teacher"]["sha256"] == "b" * 64
    assert path.stat().st_mtime_ns != mtime_before


def test_teacher_head_refits_when_its_fit_settings_change_or_the_file_is_corrupt(head_setup, caplog):
    prepare, path = head_setup["prepare"], head_setup["path"]
    prepare()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raug.methods.teacher_head"):
        prepare(cfg={**head_setup["config"], "_epochs_tune": 1})
    assert "the fit settings changed (_epochs_tune: 2 -> 1)" in caplog.text
    assert load_checkpoint(path)["fit"]["_epochs_tune"] == 1
    path.write_bytes(b"not a checkpoint")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raug.methods.teacher_head"):
        prepare()
    assert "cannot be read" in caplog.text
    assert load_checkpoint(path)["kind"] == HEAD_KIND


def test_teacher_head_path_default_and_override(tmp_path):
    config = {"_teacher_head": None}
    run = tmp_path / "run"
    assert teacher_head_path(config, run) == run / "teacher-head" / "teacher-head.pth"
    other = tmp_path / "heads" / "r50.pth"
    assert teacher_head_path({"_teacher_head": str(other)}, run) == other
    assert teacher_head_path({"_teacher_head": "heads/r50.pth"}, run) == REPO / "heads" / "r50.pth"
