"""Seeded, process-independent surface sampling of meshes into unit-sphere point clouds."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import trimesh

from pipeline.meshes import load_mesh

SAMPLER_NAME = "area-weighted uniform surface sampling (numpy PCG64, per-shape sha256 seed)"
NORMALIZATION = "centroid of samples at origin, max norm 1"


def shape_seed(base_seed: int, shape_id: str) -> int:
    """A 63-bit seed derived from (base_seed, shape_id), stable across processes and runs."""
    digest = hashlib.sha256(f"{int(base_seed)}:{shape_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def normalize_unit_sphere(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre points on their centroid and scale them so the max norm is 1.

    Returns (normalised float32 points, centroid float64 [3], scale) with
    ``normalised = (points - centroid) / scale``.
    """
    pts = np.asarray(points, dtype=np.float64)
    centroid = pts.mean(axis=0)
    centred = pts - centroid
    scale = float(np.sqrt((centred**2).sum(axis=1)).max())
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    return (centred / scale).astype(np.float32), centroid, scale


def sample_surface(mesh: trimesh.Trimesh, n_points: int = 8192, seed: int = 0) -> np.ndarray:
    """Area-weighted uniform samples on the surface, float32 [n, 3], unit-sphere normalised.

    Uses an explicit `numpy.random.Generator(PCG64(seed))`, so the result depends only
    on (mesh, n_points, seed), never on the process or global RNG state.
    """
    return sample_surface_faces(mesh, n_points, seed)[0]


def sample_surface_faces(mesh: trimesh.Trimesh, n_points: int = 8192,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`sample_surface` plus the index of the face each point lies on (int64 [n]), so that
    per-face attributes (part labels, normals) follow the points."""
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    triangles = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)]
    origins = triangles[:, 0]
    edges = triangles[:, 1:] - origins[:, None, :]
    areas = 0.5 * np.linalg.norm(np.cross(edges[:, 0], edges[:, 1]), axis=1)
    cumulative = np.cumsum(areas)
    if not cumulative[-1] > 0:
        raise ValueError("mesh has zero surface area")
    face = np.searchsorted(cumulative, rng.random(n_points) * cumulative[-1], side="right")
    face = np.minimum(face, len(areas) - 1)
    uv = rng.random((n_points, 2))
    flip = uv.sum(axis=1) > 1.0
    uv[flip] = 1.0 - uv[flip]
    points = origins[face] + (uv[:, :1] * edges[face, 0]) + (uv[:, 1:] * edges[face, 1])
    return normalize_unit_sphere(points)[0], face


def sample_shape(
    path: str | os.PathLike, n_points: int = 8192, base_seed: int = 0, shape_id: str | None = None
) -> np.ndarray:
    """Load `path` (raises MeshError) and sample it with `shape_seed(base_seed, shape_id)`.

    `shape_id` defaults to the path string; pass the dataset's shape id for stable seeds.
    """
    mesh = load_mesh(path)
    return sample_surface(mesh, n_points, shape_seed(base_seed, str(path) if shape_id is None else shape_id))
