"""Stage `export`: a fine-tuned network → ONNX with the grouping in the graph, checked against torch
with onnxruntime (max |logit difference|, must be <= 1e-4): the classifier
(``cache/finetune/model.pt`` → ``cache/export/classifier.onnx``, report ``cache/metrics/export/check.json``)
or, for a part-segmentation checkpoint (``cache/partseg/model.pt``; ``points`` + ``category`` in,
per-point logits out), ``cache/export/partseg.onnx`` with ``cache/metrics/export/partseg_check.json``.
The report dvc.yaml declares is the headline (:func:`headline`); the whole report (file, sizes,
opset, tolerance) is ``check_details.json`` / ``partseg_check_details.json`` beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import layout
from recon.downstream.export import OPSET, check_onnx, check_partseg_onnx, export_onnx, export_partseg_onnx
from recon.downstream.partseg_finetune import load_partseg_model
from recon.downstream.weights import load_finetuned
from stages.common import console, metrics_dir, write_metrics
from stages.params import build_params


@dataclass
class ExportParams:
    checkpoint: str = layout.default(layout.FINETUNED)  # fine-tuned model.pt (classifier or part segmentation)
    onnx: str = layout.default("export/classifier.onnx")  # output .onnx file
    n_points: int | None = None      # example input size; None: the fine-tuning recipe's
    opset: int = OPSET               # ONNX opset
    check: bool = True               # compare with torch in onnxruntime
    atol: float = 1e-4               # the check's tolerance on |logit difference|
    seed: int = 0                    # the check's random input


def params(overrides: dict | None = None, sets: list[str] | None = None) -> ExportParams:
    return build_params(ExportParams, "export", overrides, sets)


def headline(report: dict) -> dict:
    """What experiments compare (``check.json``, ``partseg_check.json``): whether the ONNX model's
    logits are within the tolerance of torch's, named by model (``onnx_ok``, ``seg_onnx_ok``: one
    column each in `dvc exp show`); the difference itself, which moves with float noise on every
    run, stays in the details. Nothing when the check was skipped."""
    if not isinstance(report.get("max_abs_diff"), (int, float)):
        return {}
    name = "seg_onnx_ok" if report.get("task") == "partseg" else "onnx_ok"
    atol = report.get("atol", ExportParams.atol)   # reports from before the tolerance was recorded: the default
    return {name: bool(report["max_abs_diff"] <= atol)}


def checkpoint_task(ckpt: dict) -> str:
    """``partseg`` for a checkpoint saved by the part-segmentation fine-tune, else ``classification``."""
    return "partseg" if ckpt.get("task") == "partseg" else "classification"


def run(p: ExportParams) -> dict:
    # memory-mapped: only the small entries are read here; the loaders below read the weights once
    ckpt = torch.load(p.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if "not_used" in ckpt:   # a placeholder of a stage that did not apply (the demo's parts on your own meshes)
        return write_unused(p, ckpt)
    if checkpoint_task(ckpt) == "partseg":
        return run_partseg(p)
    model, ckpt = load_finetuned(p.checkpoint)
    n_points = p.n_points or int(ckpt.get("recipe", {}).get("n_points", 1024))
    path = export_onnx(model, p.onnx, n_points, p.opset)
    report = {"onnx": str(path), "n_points": n_points, "classes": len(ckpt["class_names"]), "opset": p.opset,
              "atol": p.atol}
    if p.check:
        points = np.random.default_rng(p.seed).normal(size=(2, n_points, 3)).astype(np.float32)
        report["max_abs_diff"] = check_onnx(path, model, points, p.atol)
    write_metrics(metrics_dir(path.parent) / "check.json", report, headline(report))
    console.print(f"[green]export: {path}[/]", report)
    return report


def run_partseg(p: ExportParams) -> dict:
    model, ckpt = load_partseg_model(p.checkpoint)
    n_points = p.n_points or int(ckpt.get("recipe", {}).get("n_points", 2048))
    path = export_partseg_onnx(model, p.onnx, n_points, p.opset)
    report = {"onnx": str(path), "task": "partseg", "n_points": n_points, "categories": len(ckpt["class_names"]),
              "parts": int(ckpt["num_parts"]), "opset": p.opset, "atol": p.atol}
    if p.check:
        rng = np.random.default_rng(p.seed)
        points = rng.normal(size=(2, n_points, 3)).astype(np.float32)
        category = rng.integers(0, len(ckpt["class_names"]), size=2)
        report["max_abs_diff"] = check_partseg_onnx(path, model, points, category, p.atol)
    write_metrics(metrics_dir(path.parent) / f"{path.stem}_check.json", report, headline(report))
    console.print(f"[green]export: {path}[/]", report)
    return report


def write_unused(p: ExportParams, ckpt: dict) -> dict:
    """Placeholders for a placeholder checkpoint: an empty ``.onnx`` file (DVC expects the output)
    and a report that says why; nothing is exported."""
    path = Path(p.onnx)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    report = {"onnx": str(path), "task": ckpt.get("task"), "not_used": ckpt["not_used"]}
    name = f"{path.stem}_check.json" if ckpt.get("task") == "partseg" else "check.json"
    write_metrics(metrics_dir(path.parent) / name, report, headline(report))
    console.print(f"export: not needed ({ckpt['not_used']}); {path} is an empty placeholder")
    return report
