"""ONNX export of a fine-tuned classifier: raw points [B, N, 3] in, logits [B, classes] out.

Grouping (FPS + kNN) is part of the graph. ``recon.pointops.farthest_point_sample`` updates its
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

from recon.model import ReConClassifier, head_input
from recon.pointops import (
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
    """``recon.pointops.knn`` (float32, ascending) without the autocast guard."""
    return square_distance(query, xyz).topk(k, dim=-1, largest=False, sorted=True).indices


class ExportableClassifier(nn.Module):
    """A ``ReConClassifier`` whose grouping is export-friendly; same weights, same logits."""

    def __init__(self, classifier: ReConClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_group, self.group_size = classifier.cfg.num_group, classifier.cfg.group_size

    def forward(self, points: Tensor) -> Tensor:
        center = gather_points(points, fps_exportable(points, self.num_group))
        idx = knn_exportable(center, points, self.group_size)
        neighborhood = gather_points(points, idx) - center.unsqueeze(2)
        tokens = self.classifier.encoder(neighborhood, center, None)["tokens"]
        return self.classifier.head(head_input(tokens))


def export_onnx(classifier: ReConClassifier, path: str | Path, n_points: int = 1024,
                opset: int = OPSET) -> Path:
    """Write the ONNX graph (dynamic batch and point count) with the TorchScript exporter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableClassifier(classifier).eval()
    example = torch.randn(2, n_points, 3)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # the TorchScript exporter is deprecated, not gone
        torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, input_names=["points"],
                          output_names=["logits"], opset_version=opset,
                          dynamic_axes={"points": {0: "batch", 1: "points"}, "logits": {0: "batch"}})
    tmp.replace(path)
    return path


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
    diff = float(np.abs(onnx_logits - torch_logits).max())
    if not diff <= atol:
        raise AssertionError(f"ONNX logits differ from torch by {diff:.3g} (> {atol})")
    return diff
