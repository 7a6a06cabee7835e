"""Tests for recon.network.pointops: FPS, kNN, grouping and Chamfer-L2 vs naive references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import reference_dir
from recon.network import pointops as po


def load_fixture(name: str) -> dict[str, torch.Tensor]:
    path = reference_dir() / name
    from safetensors.torch import load_file
    return load_file(str(path))


def random_clouds(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=-1).amax(1).view(b, 1, 1)


# ----------------------------------------------------------------------------- FPS


def test_fps_matches_naive_on_random_clouds():
    xyz = random_clouds(4, 512, seed=0)
    xyz[1, 7] = 0.01           # near-origin points: never chosen later
    xyz[2, 0] = 0.0            # ... but index 0 is always the first sample
    idx = po.farthest_point_sample(xyz, 64)
    assert idx.dtype == torch.int64 and idx.shape == (4, 64)
    for b in range(4):
        np.testing.assert_array_equal(idx[b].numpy(), po.fps_naive(xyz[b].numpy(), 64))
    assert (idx[:, 0] == 0).all()
    assert not (idx[1] == 7).any()
    assert not (idx[2, 1:] == 0).any()
    for b in range(4):   # FPS never repeats a point on generic data
        assert len(set(idx[b].tolist())) == 64


def test_fps_reference_edge_case_exact():
    f = load_fixture("fps_cases.safetensors")
    idx = po.farthest_point_sample(f["points"], 40)
    torch.testing.assert_close(idx, f["fps_idx"].long(), rtol=0, atol=0)
    for b in range(2):
        np.testing.assert_array_equal(po.fps_naive(f["points"][b].numpy(), 40), f["fps_idx"][b].numpy())
    assert not torch.equal(idx, f["fps_idx_if_no_exclusion"].long())   # the rule matters here
    torch.testing.assert_close(po.gather_points(f["points"], idx), f["centers"], rtol=0, atol=0)


def test_fps_reference_vector_exact():
    v = load_fixture("finetune_tiny_vector.safetensors")
    idx = po.farthest_point_sample(v["input.points"], 16)
    torch.testing.assert_close(idx, v["out.fps_idx"].long(), rtol=0, atol=0)


def test_fps_plain_differs_only_by_exclusion():
    """Without near-origin points the rule is inert: FPS is the textbook algorithm."""
    xyz = random_clouds(2, 200, seed=3) * 0.5 + 0.6   # all points far from the origin
    idx = po.farthest_point_sample(xyz, 20)
    for b in range(2):
        pts = xyz[b].double()
        chosen = [0]
        d = torch.full((200,), float("inf"), dtype=torch.float64)
        for _ in range(19):
            d = torch.minimum(d, ((pts - pts[chosen[-1]]) ** 2).sum(-1))
            chosen.append(int(d.argmax()))
        assert idx[b].tolist() == chosen


# ----------------------------------------------------------------------------- kNN / grouping


def test_knn_matches_brute_force():
    xyz = random_clouds(3, 400, seed=1)
    query = po.gather_points(xyz, po.farthest_point_sample(xyz, 32))
    idx = po.knn(query, xyz, 16)
    assert idx.shape == (3, 32, 16) and idx.dtype == torch.int64
    for b in range(3):
        ref = po.knn_naive(query[b].numpy(), xyz[b].numpy(), 16)
        d_ours = ((xyz[b][idx[b]] - query[b][:, None]) ** 2).sum(-1).double()
        d_ref = ((xyz[b].double()[ref] - query[b].double()[:, None]) ** 2).sum(-1)
        torch.testing.assert_close(d_ours, d_ref, rtol=0, atol=1e-6)    # same distances, ascending
        assert (d_ours.diff(dim=-1) >= -1e-6).all()
        same = sum(set(a) == set(r) for a, r in zip(idx[b].tolist(), ref.tolist()))
        assert same >= 31                                               # sets agree (barring ties)
    assert (idx[:, :, 0] == po.farthest_point_sample(xyz, 32)).all()     # centre is its own 1-NN


def test_grouping_matches_reference_vector():
    v = load_fixture("finetune_tiny_vector.safetensors")
    pts = v["input.points"]
    nb, center = po.group_points(pts, 16, 8)
    torch.testing.assert_close(center, v["out.center"], rtol=0, atol=0)
    idx = po.knn(center, pts, 8)
    torch.testing.assert_close(idx, v["out.knn_idx_sorted"], rtol=0, atol=0)
    for a, r in zip(idx.reshape(-1, 8).tolist(), v["out.knn_idx"].reshape(-1, 8).tolist()):
        assert set(a) == set(r)
    torch.testing.assert_close(nb, v["out.neighborhood_sorted"], rtol=0, atol=1e-6)
    assert (nb[:, :, 0] == 0).all()


def test_group_points_matches_naive():
    xyz = random_clouds(2, 300, seed=5)
    nb, center = po.group_points(xyz, 24, 12)
    assert nb.shape == (2, 24, 12, 3) and center.shape == (2, 24, 3)
    for b in range(2):
        nb_ref, c_ref = po.group_points_naive(xyz[b].numpy(), 24, 12)
        np.testing.assert_array_equal(center[b].numpy(), c_ref)
        np.testing.assert_allclose(np.sort((nb[b] ** 2).sum(-1).numpy(), -1),
                                   np.sort((nb_ref ** 2).sum(-1), -1), atol=1e-6)


# ----------------------------------------------------------------------------- Chamfer


def test_chamfer_matches_naive():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(10, 32, 3, generator=g)
    target = torch.randn(10, 24, 3, generator=g)
    ours = po.chamfer_l2(pred, target)
    assert ours.ndim == 0
    assert ours.item() == pytest.approx(po.chamfer_l2_naive(pred.numpy(), target.numpy()), rel=1e-5)
    # asymmetric sizes: mean(dist1) over K*S, mean(dist2) over K*S'
    d = ((pred[:, :, None] - target[:, None]) ** 2).sum(-1)
    assert ours.item() == pytest.approx((d.min(2).values.mean() + d.min(1).values.mean()).item(), rel=1e-6)


def test_chamfer_properties():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 16, 3, generator=g)
    assert po.chamfer_l2(a, a).item() == 0.0
    assert po.chamfer_l2(a, a[:, torch.randperm(16, generator=g)]).item() == 0.0   # order-free
    shifted = a + torch.tensor([0.5, 0.0, 0.0])
    assert po.chamfer_l2(a, shifted).item() <= 2 * 0.25 + 1e-6    # squared, not sqrt, no halving
    b = a.clone().requires_grad_(True)
    po.chamfer_l2(b, shifted).backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_batched_numpy_fps_equals_one_call():
    """fps_indices (stores, fine-tuning supersets) runs a few clouds at a time: same indices as one
    farthest_point_sample over the whole batch, normals (extra columns) ignored."""
    clouds = np.random.default_rng(0).normal(size=(5, 90, 6)).astype(np.float32)
    whole = po.farthest_point_sample(torch.from_numpy(clouds[..., :3].copy()), 20).numpy()
    np.testing.assert_array_equal(po.fps_indices(clouds, 20, batch=2), whole)
