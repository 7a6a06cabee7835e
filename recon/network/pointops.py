"""Point-cloud operations in pure, batched torch (no CUDA extensions).

Conventions follow the reference's GPU kernels (tests/test_pointops.py checks them, also on the
reference fixtures' FPS vectors when ``../shared/fixtures/reference/`` is beside the clone):

* farthest point sampling starts at index 0, keeps a running minimum of squared
  distances initialised at 1e10, never picks (nor updates) points whose squared norm is
  <= 1e-3, and breaks ties by the first maximum;
* kNN uses squared Euclidean distance and returns neighbours in ascending distance;
* Chamfer-L2 is mean(dist1) + mean(dist2) of squared nearest-neighbour distances.

The ``*_naive`` functions are per-cloud numpy references used by tests and benchmarks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FPS_INIT_DIST = 1e10
FPS_NEAR_ORIGIN_SQ = 1e-3


# ----------------------------------------------------------------------------- torch


def farthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling, reference convention. xyz [B,N,3] -> int64 idx [B,npoint].

    Excluded (near-origin) points start with a running minimum of -1: min() never raises
    it and argmax never picks it, exactly like the kernel's skip (unless nothing is left,
    where both fall back to index 0).
    """
    B, N, _ = xyz.shape
    coords = xyz.detach().transpose(1, 2).contiguous()               # [B,3,N]
    sq_norm = _sum_sq(coords[:, 0], coords[:, 1], coords[:, 2])
    running = torch.where(sq_norm > FPS_NEAR_ORIGIN_SQ,
                          torch.full_like(sq_norm, FPS_INIT_DIST), torch.full_like(sq_norm, -1.0))
    cur = torch.zeros(B, 1, dtype=torch.long, device=xyz.device)
    chosen = [cur]
    for _ in range(1, npoint):  # 7 kernels a step: launches, not FLOPs, bound this loop on a GPU
        c = coords.gather(2, cur.unsqueeze(1).expand(B, 3, 1))       # [B,3,1]
        sq = (coords - c).square_()                                  # [B,3,N]: dx², dy², dz²
        dist = (sq[:, 0] + sq[:, 1]).add_(sq[:, 2])                  # summed left to right, as _sum_sq
        torch.minimum(running, dist, out=running)
        cur = running.argmax(dim=1, keepdim=True)                    # first maximum
        chosen.append(cur)
    return torch.cat(chosen, dim=1)


def fps_indices(clouds: np.ndarray, npoint: int, device: str | torch.device = "cpu", batch: int = 64) -> np.ndarray:
    """:func:`farthest_point_sample` of numpy clouds [N, n, >=3] (xyz first), ``batch`` clouds at a
    time on ``device``. -> int64 [N, npoint]. The one batched FPS that stores and fine-tuning use."""
    out = np.empty((clouds.shape[0], npoint), dtype=np.int64)
    for i in range(0, len(clouds), batch):
        xyz = torch.from_numpy(np.ascontiguousarray(clouds[i:i + batch, :, :3], dtype=np.float32)).to(device)
        out[i:i + batch] = farthest_point_sample(xyz, npoint).cpu().numpy()
    return out


def _sum_sq(dx: Tensor, dy: Tensor, dz: Tensor) -> Tensor:
    """dx*dx + dy*dy + dz*dz, summed left to right as the reference kernels do."""
    return (dx * dx).add_(dy * dy).add_(dz * dz)


def gather_points(xyz: Tensor, idx: Tensor) -> Tensor:
    """Gather points along dim 1. xyz [B,N,D], idx [B,...] -> [B,...,D]."""
    B = xyz.shape[0]
    flat = idx.reshape(B, -1)
    out = torch.gather(xyz, 1, flat.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    return out.reshape(*idx.shape, xyz.shape[-1])


def square_distance(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared distances [B,M,3] x [B,N,3] -> [B,M,N] as |a|^2 - 2ab + |b|^2.

    One batched matmul of augmented coordinates [-2a, |a|^2, 1] . [b, 1, |b|^2].
    """
    a_aug = torch.cat([-2.0 * a, (a * a).sum(-1, keepdim=True), torch.ones_like(a[..., :1])], -1)
    b_aug = torch.cat([b, torch.ones_like(b[..., :1]), (b * b).sum(-1, keepdim=True)], -1)
    return torch.bmm(a_aug, b_aug.transpose(1, 2))


def knn(query: Tensor, xyz: Tensor, k: int) -> Tensor:
    """Indices of the k nearest points of xyz for every query, ascending. -> [B,G,k] int64.

    Always computed in float32, also under autocast.
    """
    with torch.autocast(device_type=xyz.device.type, enabled=False):
        d = square_distance(query.detach().float(), xyz.detach().float())
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(xyz: Tensor, num_group: int, group_size: int) -> tuple[Tensor, Tensor]:
    """FPS centres + kNN groups. -> (neighborhood [B,G,S,3] relative to centre, center [B,G,3])."""
    center = gather_points(xyz, farthest_point_sample(xyz, num_group))
    idx = knn(center, xyz, group_size)
    neighborhood = gather_points(xyz, idx) - center.unsqueeze(2)
    return neighborhood, center


def pairwise_sq_dist_exact(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared distances by explicit differences [K,S,3] x [K,T,3] -> [K,S,T]."""
    a, b = a.transpose(-1, -2).contiguous(), b.transpose(-1, -2).contiguous()   # [K,3,S]
    d = [a[..., k, :].unsqueeze(-1) - b[..., k, :].unsqueeze(-2) for k in range(3)]
    return _sum_sq(d[0], d[1], d[2])


def chamfer_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Chamfer-L2: mean squared NN distance pred->target plus target->pred (no sqrt/halving).

    pred [K,S,3], target [K,S',3]; means over K*S and K*S' values; float32 at least.
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    d = pairwise_sq_dist_exact(pred.to(dtype), target.to(dtype))
    dist1 = d.amin(dim=2)
    dist2 = d.amin(dim=1)
    return dist1.mean() + dist2.mean()


# ----------------------------------------------------------------------------- numpy


def fps_naive(points: np.ndarray, npoint: int) -> np.ndarray:
    """Per-cloud numpy FPS with the reference convention. points [N,3] -> int64 [npoint]."""
    pts = np.asarray(points, dtype=np.float32)
    n = pts.shape[0]
    sq = pts[:, 0] * pts[:, 0] + pts[:, 1] * pts[:, 1] + pts[:, 2] * pts[:, 2]
    candidate = sq > np.float32(FPS_NEAR_ORIGIN_SQ)
    running = np.full(n, FPS_INIT_DIST, dtype=np.float32)
    out = np.zeros(npoint, dtype=np.int64)
    cur = 0
    for i in range(1, npoint):
        diff = pts - pts[cur]
        d = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
        running = np.where(candidate, np.minimum(running, d), running)
        cur = int(np.argmax(np.where(candidate, running, np.float32(-1.0))))
        out[i] = cur
    return out


def knn_naive(query: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    """Per-cloud brute-force kNN. query [G,3], points [N,3] -> int64 [G,k], ascending distance."""
    q = np.asarray(query, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    d = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def group_points_naive(points: np.ndarray, num_group: int, group_size: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-cloud FPS + kNN grouping. -> (neighborhood [G,S,3], center [G,3])."""
    pts = np.asarray(points, dtype=np.float32)
    center = pts[fps_naive(pts, num_group)]
    idx = knn_naive(center, pts, group_size)
    return pts[idx] - center[:, None, :], center


def chamfer_l2_naive(pred: np.ndarray, target: np.ndarray) -> float:
    """Loop over the K pairs; float64 brute force. pred [K,S,3], target [K,T,3] -> float."""
    d1, d2 = [], []
    for a, b in zip(np.asarray(pred, np.float64), np.asarray(target, np.float64)):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        d1.append(d.min(axis=1))
        d2.append(d.min(axis=0))
    return float(np.concatenate(d1).mean() + np.concatenate(d2).mean())
