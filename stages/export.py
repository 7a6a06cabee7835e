"""Stage `export`: the fine-tuned classifier (``cache/finetune/model.pt``) → ONNX with the grouping
in the graph (``cache/export/classifier.onnx``), checked against torch with onnxruntime
(``cache/metrics/export/check.json``, git-tracked: max |logit difference|, must be <= 1e-4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import layout
from recon import trainstate
from recon.export import OPSET, check_onnx, export_onnx
from recon.weights import load_finetuned
from stages.common import console, load_params, metrics_dir


@dataclass
class ExportParams:
    checkpoint: str = layout.default(layout.FINETUNED)
    onnx: str = layout.default("export/classifier.onnx")
    n_points: int | None = None      # example input size; None: the fine-tuning recipe's
    opset: int = OPSET
    check: bool = True
    atol: float = 1e-4
    seed: int = 0


def params(overrides: dict | None = None) -> ExportParams:
    return load_params(ExportParams, "export", overrides)


def run(p: ExportParams) -> dict:
    model, ckpt = load_finetuned(p.checkpoint)
    n_points = p.n_points or int(ckpt.get("recipe", {}).get("n_points", 1024))
    path = export_onnx(model, p.onnx, n_points, p.opset)
    report = {"onnx": str(path), "n_points": n_points, "classes": len(ckpt["class_names"]), "opset": p.opset}
    if p.check:
        points = np.random.default_rng(p.seed).normal(size=(2, n_points, 3)).astype(np.float32)
        report["max_abs_diff"] = check_onnx(path, model, points, p.atol)
    trainstate.write_json(metrics_dir(path.parent) / "check.json", report)
    console.print(f"[green]export: {path}[/]", report)
    return report
