"""ONNX export of a fine-tuned classifier (raw points [B, N, 3] in, logits [B, classes] out) and
of a part-segmentation model (points [B, N, 3] and categories [B] in, logits [B, N, parts] out).

Grouping (FPS + kNN) is part of the graph. ``recon.network.pointops.farthest_point_sample`` updates its
running minimum in place (``out=``), which the TorchScript-based exporter cannot translate, so
the graph uses :func:`fps_exportable`: the same arithmetic (same summation order, same
near-origin rule, same first-maximum tie break) written out of place; the tracer unrolls its
fixed ``npoint - 1`` iterations. Tests check it equals ``farthest_point_sample`` index for index.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from recon.downstream.partseg_net import ReConPartSeg
from recon.network.model import ReConClassifier, head_input
from recon.network.pointops import (
    FPS_INIT_DIST,
    FPS_NEAR_ORIGIN_SQ,
    gather_points,
    square_distance,
)

OPSET = 17


def fps_exportable(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling equal to ``farthest_point_sample``, without in-place updates."""
    coords = xyz.transpose(1, 2)                                          # [B,3,N]
    x, y, z = coords[:, 0], coords[:, 1], coords[:, 2]
    sq_norm = x * x + y * y + z * z
    running = torch.where(sq_norm > FPS_NEAR_ORIGIN_SQ, torch.full_like(sq_norm, FPS_INIT_DIST),
                          torch.full_like(sq_norm, -1.0))
    cur = torch.zeros_like(sq_norm[:, :1], dtype=torch.long)              # [B,1]
    chosen = [cur]
    for _ in range(1, npoint):
        c = torch.gather(coords, 2, cur.unsqueeze(1).expand(-1, 3, -1))    # [B,3,1]
        dx, dy, dz = x - c[:, 0], y - c[:, 1], z - c[:, 2]
        running = torch.minimum(running, dx * dx + dy * dy + dz * dz)
        cur = running.argmax(dim=1, keepdim=True)
        chosen.append(cur)
    return torch.cat(chosen, dim=1)


def knn_exportable(query: Tensor, xyz: Tensor, k: int) -> Tensor:
    """``recon.network.pointops.knn`` (float32, ascending) without the autocast guard."""
    return square_distance(query, xyz).topk(k, dim=-1, largest=False, sorted=True).indices


def group_points_exportable(points: Tensor, num_group: int, group_size: int) -> tuple[Tensor, Tensor]:
    """``recon.network.pointops.group_points`` (same indices) from the export-friendly FPS and kNN."""
    center = gather_points(points, fps_exportable(points, num_group))
    idx = knn_exportable(center, points, group_size)
    return gather_points(points, idx) - center.unsqueeze(2), center


class ExportableClassifier(nn.Module):
    """A ``ReConClassifier`` whose grouping is export-friendly; same weights, same logits."""

    def __init__(self, classifier: ReConClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_group, self.group_size = classifier.cfg.num_group, classifier.cfg.group_size

    def forward(self, points: Tensor) -> Tensor:
        neighborhood, center = group_points_exportable(points, self.num_group, self.group_size)
        tokens = self.classifier.encoder(neighborhood, center, None)["tokens"]
        return self.classifier.head(head_input(tokens, self.classifier.cfg.img_queries))


class ExportablePartSeg(nn.Module):
    """A ``ReConPartSeg`` whose grouping is export-friendly; same weights, same logits."""

    def __init__(self, model: ReConPartSeg) -> None:
        super().__init__()
        self.model = model.eval()
        self.num_group, self.group_size = model.cfg.num_group, model.cfg.group_size

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        neighborhood, center = group_points_exportable(points, self.num_group, self.group_size)
        return self.model.segment(points, neighborhood, center, category)


def _export(wrapper: nn.Module, example: tuple[Tensor, ...], path: str | Path, input_names: list[str],
            dynamic_axes: dict, opset: int) -> Path:
    """Trace ``wrapper`` on ``example`` with the TorchScript exporter into ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # the TorchScript exporter is deprecated, not gone
        torch.onnx.export(wrapper.eval(), example, str(tmp), dynamo=False, input_names=input_names,
                          output_names=["logits"], opset_version=opset, dynamic_axes=dynamic_axes)
    tmp.replace(path)
    return path


def export_onnx(classifier: ReConClassifier, path: str | Path, n_points: int = 1024,
                opset: int = OPSET) -> Path:
    """Write the ONNX graph (dynamic batch and point count) with the TorchScript exporter."""
    return _export(ExportableClassifier(classifier), (torch.randn(2, n_points, 3),), path, ["points"],
                   {"points": {0: "batch", 1: "points"}, "logits": {0: "batch"}}, opset)


def export_partseg_onnx(model: ReConPartSeg, path: str | Path, n_points: int = 2048,
                        opset: int = OPSET) -> Path:
    """The segmentation model as ONNX: ``points`` float32 [B, N, 3] and ``category`` int64 [B] in,
    ``logits`` [B, N, parts] out; batch and point count dynamic."""
    example = (torch.randn(2, n_points, 3), torch.zeros(2, dtype=torch.long))
    return _export(ExportablePartSeg(model), example, path, ["points", "category"],
                   {"points": {0: "batch", 1: "points"}, "category": {0: "batch"},
                    "logits": {0: "batch", 1: "points"}}, opset)


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, classifier: ReConClassifier, points: np.ndarray,
               atol: float = 1e-4) -> float:
    """Max |logits_onnx - logits_torch| on ``points``; raises AssertionError above ``atol``."""
    session = onnx_session(path)
    onnx_logits = session.run(None, {"points": np.ascontiguousarray(points, dtype=np.float32)})[0]
    with torch.no_grad():
        torch_logits = classifier.eval()(torch.from_numpy(np.asarray(points, dtype=np.float32))).numpy()
    return _compare(onnx_logits, torch_logits, atol)


def check_partseg_onnx(path: str | Path, model: ReConPartSeg, points: np.ndarray, category: np.ndarray,
                       atol: float = 1e-4) -> float:
    """Max |logits_onnx - logits_torch| of the segmentation model; AssertionError above ``atol``."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    category = np.ascontiguousarray(category, dtype=np.int64)
    onnx_logits = onnx_session(path).run(None, {"points": points, "category": category})[0]
    with torch.no_grad():
        torch_logits = model.eval()(torch.from_numpy(points), torch.from_numpy(category)).numpy()
    return _compare(onnx_logits, torch_logits, atol)


def _compare(onnx_logits: np.ndarray, torch_logits: np.ndarray, atol: float) -> float:
    if onnx_logits.shape != torch_logits.shape:
        raise AssertionError(f"ONNX logits have shape {onnx_logits.shape}, torch {torch_logits.shape}")
    diff = float(np.abs(onnx_logits - torch_logits).max())
    if not diff <= atol:
        raise AssertionError(f"ONNX logits differ from torch by {diff:.3g} (> {atol})")
    return diff
