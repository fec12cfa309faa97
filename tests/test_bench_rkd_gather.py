"""benchmarks/bench_rkd_gather.py: the per-rank memory table of the gathered RKD terms."""

import pytest
import torch

from benchmarks import bench_rkd_gather as B

CPU = torch.device("cpu")


def test_the_model_scales_with_own_anchors_not_the_global_batch():
    # O(N_local x N_global x D) + O(N_local x N_global^2): doubling N_global at a fixed
    # number of ranks multiplies own anchors' model by 4 to 8, all anchors' by 4 to 8
    # times more again (one factor N_global more)
    for n in (256, 512):
        own, own2 = B.model_bytes(n, n // 8), B.model_bytes(2 * n, 2 * n // 8)
        full, full2 = B.model_bytes(n, n), B.model_bytes(2 * n, 2 * n)
        assert 4 <= own2 / own <= 8 and 4 <= full2 / full <= 8
        assert full / own == 8  # every term has one anchor factor
    # the case: 8 ranks x 128 images fits a GPU only with own anchors
    assert B.model_bytes(1024, 128) / 2**30 < 7 < 40 < B.model_bytes(1024, 1024) / 2**30


def test_a_case_over_the_limit_shows_its_model_only(capsys):
    rows = B.bench([16], ranks=4, device=CPU, limit_gib=1e-9)
    assert [r["mode"] for r in rows] == list(B.MODES)
    assert all("peak_gib" not in r for r in rows)
    table = B.format_table(rows)
    assert "| 16 | 4 | not run / " in table and table.count("not run") == 2


@pytest.mark.parametrize("mode", B.MODES)
def test_measured_step_runs_the_anchor_rows_it_names(mode, monkeypatch):
    seen = []
    real = B.relational_kd

    def spy(out_s, out_t, weights, anchors=None):
        seen.append((out_s["avg_pool"].shape, anchors))
        return real(out_s, out_t, weights, anchors=anchors)

    monkeypatch.setattr(B, "relational_kd", spy)
    got = B._measure(mode, 16, 4, CPU)
    assert got["peak_bytes"] >= 0 and got["seconds"] > 0
    want = None if mode == "all anchors" else slice(0, 4)
    assert seen == [(torch.Size([16, B.D_STUDENT]), want)]
