"""Per-rank memory of the gathered RKD terms: every anchor vs this rank's own anchors.

With ``_gather_embeddings=True`` each of R ranks holds the global batch of N_global
embeddings. Before issue #16 every rank computed the RKD distance and angle terms over
all N_global anchors (the angle term's unit vectors are N_global x N_global x D and its
cosines N_global^3); now rank r averages only its own N_local = N_global / R anchors
against the global batch (``raug.train.distributed.own_rows``), N_local x N_global x D
and N_local x N_global^2. This script measures one forward + backward of the RKD block
``25 rkd_distance + 50 rkd_angle`` as one rank does it, for both, at the shapes of the
real networks (student MobileNet-V2 ``avg_pool``: 1280, teacher ResNet-50: 2048).

Usage (from the repository root)::

    python benchmarks/bench_rkd_gather.py [--n-global 256 512 1024] [--ranks 8]
        [--device cpu|cuda|auto] [--limit-gib 16] [--json OUT]

Peak memory: :func:`common.peak_memory` (CUDA: ``max_memory_allocated`` above the
inputs; CPU: peak RSS of a fresh subprocess above its RSS before the step). A case
whose modelled peak (:func:`model_bytes`) exceeds ``--limit-gib`` is not run and shows
the model only, so the table still covers N_global = 1024 on a small machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kd_losses import RelationalWeights, relational_kd
from raug.train.device import resolve_device

if __package__:
    from . import common
else:
    import common

D_STUDENT, D_TEACHER = 1280, 2048
RKD_ONLY = RelationalWeights(lambd_drkd=1.0, lambd_crkd=0.0)
MODES = ("all anchors", "own anchors")


def model_bytes(n_global: int, n_anchor: int, d_s: int = D_STUDENT, d_t: int = D_TEACHER) -> int:
    """Modelled float32 peak of one rank's RKD forward + backward with ``n_anchor`` anchors.

    The angle term dominates: per network the differences and unit vectors
    (A x N x D each; the student's are kept for backward, plus their gradients) and the
    A x N x N cosines (student, teacher, smooth-L1 and its gradient). A model, not a
    measurement: the table prints it next to what was measured.
    """
    a, n = n_anchor, n_global
    units = a * n * (3 * d_s + 2 * d_t)
    cosines = 4 * a * n * n
    return 4 * (units + cosines)


def _inputs(n_global: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    emb_s = torch.randn(n_global, D_STUDENT, generator=gen).relu()
    emb_t = torch.randn(n_global, D_TEACHER, generator=gen).relu()
    return emb_s.to(device), emb_t.to(device)


def _step(emb_s: torch.Tensor, emb_t: torch.Tensor, anchors: slice | None) -> float:
    student = emb_s.detach().requires_grad_(True)
    loss = relational_kd({"avg_pool": student}, {"avg_pool": emb_t}, RKD_ONLY, anchors=anchors)["hr"]
    loss.backward()
    return loss.detach().item()


def _anchors(mode: str, n_global: int, ranks: int) -> slice | None:
    # rank 0's rows; every rank's share has the same shape
    return None if mode == "all anchors" else slice(0, n_global // ranks)


def _measure(mode: str, n_global: int, ranks: int, device: torch.device) -> dict[str, Any]:
    """Peak memory and seconds of one step, in this process."""
    emb_s, emb_t = _inputs(n_global, device)
    anchors = _anchors(mode, n_global, ranks)
    start = time.perf_counter()
    out = common.peak_memory(lambda: _step(emb_s, emb_t, anchors), device)
    common.sync_device(device)
    out["seconds"] = time.perf_counter() - start
    return out


def _child(mode: str, n_global: int, ranks: int) -> dict[str, Any]:
    cpu = torch.device("cpu")
    _step(*_inputs(8, cpu), None)  # load kernels and thread pools first
    return _measure(mode, n_global, ranks, cpu)


def measure(mode: str, n_global: int, ranks: int, device: torch.device) -> dict[str, Any]:
    """:func:`_measure` on CUDA in-process, on the CPU in a fresh subprocess."""
    if device.type == "cuda":
        _step(*_inputs(8, device), None)
        return _measure(mode, n_global, ranks, device)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, str(n_global), str(ranks)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {mode} N={n_global} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(n_globals: list[int], ranks: int, device: torch.device, limit_gib: float) -> list[dict]:
    """One row per (N_global, mode): modelled and (when under the limit) measured peak."""
    rows = []
    for n_global in n_globals:
        if n_global % ranks:
            raise SystemExit(f"--n-global {n_global} is not a multiple of --ranks {ranks}")
        for mode in MODES:
            anchors = n_global if mode == "all anchors" else n_global // ranks
            row = {"n_global": n_global, "n_local": n_global // ranks, "ranks": ranks,
                   "mode": mode, "model_gib": model_bytes(n_global, anchors) / 2**30,
                   "device": str(device)}
            if row["model_gib"] <= limit_gib:
                got = measure(mode, n_global, ranks, device)
                row.update(peak_gib=got["peak_bytes"] / 2**30, method=got["method"],
                           seconds=got["seconds"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per N_global, both modes side by side."""
    lines = ["| N_global | N_local | all anchors: measured / model GiB | own anchors: measured / "
             "model GiB | all / own (measured) | s/step all / own |",
             "|---:|---:|---:|---:|---:|---:|"]
    by_n: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_n.setdefault(row["n_global"], {})[row["mode"]] = row

    def cell(row: dict) -> str:
        got = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "not run"
        return f"{got} / {row['model_gib']:.2f}"

    for n, modes in by_n.items():
        full, own = modes["all anchors"], modes["own anchors"]
        ratio = (f"{full['peak_gib'] / own['peak_gib']:.1f}x"
                 if "peak_gib" in full and "peak_gib" in own else "-")
        secs = " / ".join(f"{m['seconds']:.2f}" if "seconds" in m else "-" for m in (full, own))
        lines.append(f"| {n} | {own['n_local']} | {cell(full)} | {cell(own)} | {ratio} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_child":
        print(json.dumps(_child(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-global", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit-gib", type=float, default=16.0,
                        help="skip a case whose modelled peak is larger (default 16)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = bench(args.n_global, args.ranks, resolve_device(args.device), args.limit_gib)
    print(common.machine_info())
    print(format_table(rows))
    if args.json:
        common.write_json(args.json, {"machine": common.machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
