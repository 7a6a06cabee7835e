"""Procedural demo dataset in the ShapeNetCore.v2 layout.

``generate_demo(out)`` writes ``out/<synset>/<model_id>/models/model_normalized.obj``
(+ ``model_normalized.mtl``) for every category of `DEMO_CATEGORIES`, and
``out/taxonomy.json`` in ShapeNet's format. Shapes are assembled from trimesh
primitives (boxes, cylinders, frusta, cones, spheres, capsules, tori) with random
proportions, part counts and styles, one ``usemtl`` per part with Kd colours drawn
from a palette shared by all categories, and a small random rotation. Like
ShapeNetCore.v2, models use +Y up, face -Z, are centred on their bounding-box centre
and scaled to a unit bounding-box diagonal. Output is a pure function of the seed:
the same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import trimesh
from trimesh.transformations import rotation_matrix

#: ShapeNetCore.v2 taxonomy names (the "name" field of its taxonomy.json).
SHAPENET_NAMES: dict[str, str] = {
    "03001627": "chair",
    "04379243": "table",
    "02828884": "bench",
    "04256520": "sofa,couch,lounge",
    "03636649": "lamp",
    "02876657": "bottle",
    "03797390": "mug",
    "02691156": "airplane,aeroplane,plane",
    "02958343": "car,auto,automobile,machine,motorcar",
    "02747177": "ashcan,trash can,garbage can,wastebin,ash bin,ash-bin,ashbin,dustbin,trash barrel,trash bin",
    "02871439": "bookshelf",
    "03211117": "display,video display",
}
#: synset id -> short category name (first lemma of the ShapeNet name).
DEMO_CATEGORIES: dict[str, str] = {k: v.split(",")[0] for k, v in SHAPENET_NAMES.items()}

# Colours shared across categories (wood, metal, fabric, plastic) so colour alone does
# not identify the class.
_PALETTE: dict[str, tuple[float, float, float]] = {
    "oak": (0.72, 0.53, 0.32),
    "walnut": (0.42, 0.27, 0.16),
    "birch": (0.86, 0.76, 0.58),
    "steel": (0.62, 0.64, 0.68),
    "black": (0.12, 0.12, 0.13),
    "white": (0.90, 0.90, 0.88),
    "red": (0.75, 0.16, 0.14),
    "blue": (0.18, 0.32, 0.68),
    "green": (0.22, 0.52, 0.30),
    "teal": (0.15, 0.55, 0.58),
    "grey": (0.45, 0.46, 0.48),
    "beige": (0.83, 0.77, 0.64),
    "yellow": (0.90, 0.75, 0.20),
    "brown": (0.50, 0.35, 0.25),
}
_COLOURS = list(_PALETTE)
_SECTIONS = 20


@dataclass
class _Builder:
    """Accumulates coloured parts; each `add` is one OBJ object with its own usemtl."""

    rng: np.random.Generator
    parts: list[tuple[str, trimesh.Trimesh, str]] = field(default_factory=list)
    materials: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def material(self, name: str, colours: list[str] | None = None) -> str:
        """Define material `name` with a jittered palette colour (drawn from `colours`)."""
        base = np.array(_PALETTE[str(self.rng.choice(colours or _COLOURS))])
        rgb = np.clip(base + self.rng.normal(0.0, 0.04, 3), 0.02, 0.98)
        self.materials[name] = tuple(float(c) for c in rgb)
        return name

    def add(self, part: str, mesh: trimesh.Trimesh, material: str) -> None:
        self.parts.append((f"{part}_{len(self.parts)}", mesh, material))

    def box(self, part: str, mat: str, extents, centre, angles=(0.0, 0.0, 0.0)) -> None:
        """Axis-aligned box rotated by Euler `angles` (radians, XYZ) about its centre."""
        m = trimesh.creation.box(extents=np.asarray(extents, dtype=float))
        m.apply_transform(_euler(angles))
        m.apply_translation(centre)
        self.add(part, m, mat)

    def rod(self, part: str, mat: str, p0, p1, radius: float, sections: int = 12) -> None:
        """Cylinder between two points."""
        m = trimesh.creation.cylinder(radius=radius, segment=[p0, p1], sections=sections)
        self.add(part, m, mat)

    def frustum(self, part: str, mat: str, r_bottom: float, r_top: float, y0: float, y1: float,
                centre_xz=(0.0, 0.0), sections: int = _SECTIONS) -> None:
        """Vertical truncated cone from height y0 to y1."""
        m = trimesh.creation.cylinder(radius=1.0, height=1.0, sections=sections)
        v = m.vertices.copy()
        top = v[:, 2] > 0
        v[:, :2] *= np.where(top, r_top, r_bottom)[:, None]
        v[:, 2] = np.where(top, y1, y0)
        m = trimesh.Trimesh(v[:, [0, 2, 1]], m.faces[:, ::-1], process=False)
        m.apply_translation([centre_xz[0], 0.0, centre_xz[1]])
        self.add(part, m, mat)

    def tube(self, part: str, mat: str, r_in: float, r_out: float, y0: float, y1: float,
             sections: int = _SECTIONS) -> None:
        """Vertical hollow cylinder (annulus) from y0 to y1."""
        m = trimesh.creation.annulus(r_min=r_in, r_max=r_out, height=y1 - y0, sections=sections)
        m.apply_transform(rotation_matrix(-np.pi / 2, [1, 0, 0]))
        m.apply_translation([0.0, (y0 + y1) / 2, 0.0])
        self.add(part, m, mat)

    def ellipsoid(self, part: str, mat: str, radii, centre, subdivisions: int = 2) -> None:
        m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
        m.apply_scale(np.asarray(radii, dtype=float))
        m.apply_translation(centre)
        self.add(part, m, mat)

    def capsule_z(self, part: str, mat: str, length: float, radius: float, centre) -> None:
        """Capsule along Z with total length `length`."""
        m = trimesh.creation.capsule(height=max(length - 2 * radius, 1e-3), radius=radius, count=[14, 10])
        m.apply_translation(np.asarray(centre, dtype=float))
        self.add(part, m, mat)


def _euler(angles) -> np.ndarray:
    ax, ay, az = angles
    return (rotation_matrix(az, [0, 0, 1]) @ rotation_matrix(ay, [0, 1, 0]) @ rotation_matrix(ax, [1, 0, 0]))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# ----------------------------------------------------------------------------- furniture


def _legs(b: _Builder, mat: str, w: float, d: float, top_y: float, style: str, thick: float,
          inset: float, splay: float = 0.0) -> None:
    """Four legs under a w x d top at height top_y (round or square)."""
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (w / 2 - inset), sz * (d / 2 - inset)
            foot = [x + sx * splay, 0.0, z + sz * splay]
            if style == "round":
                b.rod("leg", mat, foot, [x, top_y, z], thick / 2)
            else:
                b.box("leg", mat, [thick, top_y, thick], [x + sx * splay / 2, top_y / 2, z + sz * splay / 2],
                      (sz * np.arctan2(splay, top_y), 0.0, -sx * np.arctan2(splay, top_y)))


def _chair(b: _Builder) -> None:
    r = b.rng
    w, d, h, t = _u(r, 0.40, 0.60), _u(r, 0.38, 0.55), _u(r, 0.38, 0.50), _u(r, 0.03, 0.09)
    frame, seat = b.material("frame"), b.material("seat")
    b.box("seat", seat, [w, t, d], [0, h, 0])
    style = str(r.choice(["round", "square", "square", "pedestal", "panels"]))
    if style == "pedestal":
        b.rod("column", frame, [0, 0.08, 0], [0, h - t / 2, 0], _u(r, 0.025, 0.04))
        for k in range(int(r.integers(4, 6))):
            a = 2 * np.pi * k / 5 + _u(r, -0.1, 0.1)
            b.box("foot", frame, [0.3, 0.04, 0.05], [0.15 * np.cos(a), 0.05, 0.15 * np.sin(a)], (0, -a, 0))
    elif style == "panels":
        for sx in (-1, 1):
            b.box("side", frame, [0.03, h - t / 2, d * _u(r, 0.8, 1.0)], [sx * (w / 2 - 0.015), (h - t / 2) / 2, 0])
    else:
        _legs(b, frame, w, d, h - t / 2, style, _u(r, 0.025, 0.05), 0.04, _u(r, 0.0, 0.04))
        if r.random() < 0.4:
            for sx in (-1, 1):
                b.box("rail", frame, [0.02, 0.02, d - 0.08], [sx * (w / 2 - 0.04), _u(r, 0.1, 0.2), 0])
    bh, tilt = _u(r, 0.30, 0.62), _u(r, 0.02, 0.28)
    back_style = str(r.choice(["solid", "solid", "slats", "frame"]))
    bz, by = d / 2 - 0.02 + np.sin(tilt) * bh / 2, h + t / 2 + np.cos(tilt) * bh / 2
    if back_style == "solid":
        b.box("back", seat, [w * _u(r, 0.85, 1.0), bh, _u(r, 0.03, 0.08)], [0, by, bz], (tilt, 0, 0))
    else:
        for sx in (-1, 1):
            b.box("post", frame, [0.03, bh, 0.03], [sx * (w / 2 - 0.02), by, bz], (tilt, 0, 0))
        top_y = by + np.cos(tilt) * (bh / 2 - 0.04)
        b.box("toprail", frame, [w, 0.08, 0.03], [0, top_y, bz + np.sin(tilt) * (bh / 2 - 0.04)], (tilt, 0, 0))
        n = int(r.integers(2, 6)) if back_style == "slats" else 1
        for k in range(n):
            x = (k + 1) / (n + 1) * w - w / 2
            b.box("slat", seat if back_style == "frame" else frame,
                  [w * 0.8 if back_style == "frame" else 0.03, bh * 0.6, 0.02], [x if n > 1 else 0, by, bz], (tilt, 0, 0))
    if r.random() < 0.35:
        ah = _u(r, 0.18, 0.28)
        for sx in (-1, 1):
            b.box("arm", frame, [0.05, 0.04, d * 0.9], [sx * (w / 2 + 0.03), h + ah, 0])
            b.box("armpost", frame, [0.03, ah, 0.03], [sx * (w / 2 + 0.03), h + ah / 2, -d / 2 + 0.08])


def _table(b: _Builder) -> None:
    r = b.rng
    h, t = _u(r, 0.40, 0.78), _u(r, 0.02, 0.07)
    wood, legm = b.material("top", ["oak", "walnut", "birch", "white", "black", "grey"]), b.material("legs")
    round_top = r.random() < 0.3
    if round_top:
        rad = _u(r, 0.35, 0.65)
        b.frustum("top", wood, rad, rad, h - t, h, sections=32)
        w = d = rad * 1.3
    else:
        w, d = _u(r, 0.7, 1.9), _u(r, 0.45, 1.0)
        b.box("top", wood, [w, t, d], [0, h - t / 2, 0])
    style = str(r.choice(["round", "square", "pedestal", "trestle"]))
    if style == "pedestal":
        b.rod("column", legm, [0, 0.03, 0], [0, h - t, 0], _u(r, 0.04, 0.08), sections=16)
        if r.random() < 0.5:
            b.frustum("base", legm, _u(r, 0.2, 0.35), 0.08, 0.0, 0.05)
        else:
            for a in (0.0, np.pi / 2):
                b.box("foot", legm, [min(w, 0.8) * 0.8, 0.05, 0.06], [0, 0.025, 0], (0, a, 0))
    elif style == "trestle":
        for sx in (-1, 1):
            b.box("panel", legm, [0.04, h - t, d * _u(r, 0.6, 0.9)], [sx * (w / 2 - 0.1), (h - t) / 2, 0])
        if r.random() < 0.6:
            b.box("stretcher", legm, [w - 0.2, 0.05, 0.04], [0, _u(r, 0.1, 0.3), 0])
    else:
        lw, ld = (w * 0.62, d * 0.62) if round_top else (w, d)
        _legs(b, legm, lw, ld, h - t, style, _u(r, 0.03, 0.07), _u(r, 0.04, 0.12))
        if r.random() < 0.35:
            b.box("shelf", wood, [lw * 0.85, 0.02, ld * 0.85], [0, _u(r, 0.08, 0.2), 0])
        if r.random() < 0.4 and not round_top:
            b.box("apron", wood, [w * 0.9, 0.08, d * 0.9], [0, h - t - 0.04, 0])


def _bench(b: _Builder) -> None:
    r = b.rng
    w, d, h, t = _u(r, 0.9, 1.8), _u(r, 0.28, 0.48), _u(r, 0.36, 0.48), _u(r, 0.03, 0.07)
    wood, metal = b.material("seat", ["oak", "walnut", "birch", "brown", "green", "grey"]), b.material("frame")
    n_slats = int(r.choice([1, 1, 3, 4, 5]))
    for k in range(n_slats):
        sd = d / n_slats
        b.box("slat", wood, [w, t, sd * (0.8 if n_slats > 1 else 1.0)], [0, h - t / 2, -d / 2 + sd * (k + 0.5)])
    style = str(r.choice(["legs4", "legs6", "slabs", "aframe"]))
    if style == "slabs":
        for sx in (-1, 1):
            b.box("slab", metal, [0.05, h - t, d], [sx * (w / 2 - _u(r, 0.05, 0.2)), (h - t) / 2, 0])
    elif style == "aframe":
        for sx in (-1, 1):
            x = sx * (w / 2 - 0.12)
            for sz in (-1, 1):
                b.rod("leg", metal, [x, 0, sz * d * 0.55], [x, h - t, sz * d * 0.2], 0.02)
    else:
        xs = [-1, 1] if style == "legs4" else [-1, 0, 1]
        for fx in xs:
            for sz in (-1, 1):
                x = fx * (w / 2 - 0.06)
                b.box("leg", metal, [0.05, h - t, 0.05], [x, (h - t) / 2, sz * (d / 2 - 0.04)])
    if r.random() < 0.45:
        bh = _u(r, 0.2, 0.42)
        for k in range(int(r.integers(1, 4))):
            b.box("backslat", wood, [w, bh / 4, 0.03], [0, h + bh * (k + 0.6) / 3.2, d / 2 + 0.02], (0.2, 0, 0))
        for sx in (-1, 1):
            b.box("backpost", metal, [0.04, bh + 0.05, 0.04], [sx * (w / 2 - 0.06), h + bh / 2, d / 2 + 0.03], (0.2, 0, 0))


def _sofa(b: _Builder) -> None:
    r = b.rng
    w, d = _u(r, 1.2, 2.4), _u(r, 0.75, 1.0)
    base_h, seat_t = _u(r, 0.15, 0.35), _u(r, 0.1, 0.2)
    fabric, cushion = b.material("fabric", ["beige", "grey", "blue", "green", "red", "brown", "white", "black"]), b.material("cushion")
    leg_h = _u(r, 0.03, 0.14) if r.random() < 0.65 else 0.0
    b.box("base", fabric, [w, base_h, d], [0, leg_h + base_h / 2, 0])
    n = int(r.integers(1, 4))
    back_t = _u(r, 0.12, 0.25)
    seat_d = d - back_t
    for k in range(n):
        cw = w / n
        b.box("seatcushion", cushion, [cw * 0.97, seat_t, seat_d * 0.97],
              [-w / 2 + cw * (k + 0.5), leg_h + base_h + seat_t / 2, -back_t / 2])
    bh = _u(r, 0.3, 0.6)
    b.box("back", fabric, [w, bh + seat_t, back_t], [0, leg_h + base_h + (bh + seat_t) / 2, d / 2 - back_t / 2],
          (_u(r, 0.0, 0.15), 0, 0))
    if r.random() < 0.5:
        for k in range(n):
            cw = w / n
            b.box("backcushion", cushion, [cw * 0.9, bh * 0.8, 0.1],
                  [-w / 2 + cw * (k + 0.5), leg_h + base_h + seat_t + bh * 0.4, d / 2 - back_t - 0.04], (0.12, 0, 0))
    if r.random() < 0.85:
        ah, aw = _u(r, 0.12, 0.32), _u(r, 0.08, 0.22)
        for sx in (-1, 1):
            b.box("arm", fabric, [aw, base_h + ah, d], [sx * (w / 2 + aw / 2), leg_h + (base_h + ah) / 2, 0])
    else:
        aw = 0.0
    if r.random() < 0.2:  # chaise
        cl = _u(r, 0.5, 0.8)
        b.box("chaise", cushion, [w * 0.35, base_h + seat_t, cl], [w * 0.325, leg_h + (base_h + seat_t) / 2, -d / 2 - cl / 2])
    if leg_h > 0:
        legm = b.material("legs", ["walnut", "oak", "black", "steel"])
        _legs(b, legm, w + 2 * aw - 0.1, d - 0.1, leg_h, "round", 0.04, 0.0)


# ----------------------------------------------------------------------------- objects


def _lamp(b: _Builder) -> None:
    r = b.rng
    metal, shade = b.material("metal", ["steel", "black", "white", "yellow", "brown", "red"]), b.material("shade")
    height = _u(r, 0.35, 1.6)
    base_style = str(r.choice(["disc", "box", "cone"]))
    br = _u(r, 0.08, 0.2) * max(height, 0.6)
    if base_style == "disc":
        b.frustum("base", metal, br, br, 0.0, 0.03)
    elif base_style == "box":
        b.box("base", metal, [br * 1.6, 0.04, br * 1.6], [0, 0.02, 0])
    else:
        b.frustum("base", metal, br, br * 0.3, 0.0, br * 0.5)
    if r.random() < 0.35:  # desk lamp with an arm
        p0 = np.array([0.0, 0.03, 0.0])
        p1 = np.array([_u(r, -0.05, 0.05), height * 0.55, _u(r, 0.05, 0.15)])
        p2 = p1 + [_u(r, -0.05, 0.05), height * _u(r, 0.15, 0.35), -_u(r, 0.15, 0.35) * height]
        b.rod("arm", metal, p0, p1, 0.012)
        b.rod("arm", metal, p1, p2, 0.012)
        b.ellipsoid("joint", metal, [0.02] * 3, p1, subdivisions=1)
        sr = _u(r, 0.06, 0.12)
        m = trimesh.creation.cone(radius=sr, height=sr * 1.2, sections=_SECTIONS)
        m.apply_transform(rotation_matrix(-np.pi / 2 + _u(r, -0.5, 0.5), [1, 0, 0]))
        m.apply_translation(p2 - [0, sr * 1.1, 0])
        b.add("shade", m, shade)
        return
    top = height * _u(r, 0.7, 0.85)
    b.rod("pole", metal, [0, 0.03, 0], [0, top, 0], _u(r, 0.01, 0.03))
    style = str(r.choice(["drum", "cone", "globe"]))
    sr = _u(r, 0.12, 0.25) * max(height, 0.5)
    if style == "globe":
        b.ellipsoid("shade", shade, [sr * 0.7] * 3, [0, top + sr * 0.5, 0])
    else:
        r_top = sr * (_u(r, 0.85, 1.0) if style == "drum" else _u(r, 0.35, 0.65))
        b.frustum("shade", shade, sr, r_top, top - sr * 0.4, top + sr * _u(r, 0.6, 1.0))


def _bottle(b: _Builder) -> None:
    r = b.rng
    glass, cap = b.material("glass", ["green", "teal", "brown", "white", "blue", "red"]), b.material("cap")
    rad, bh = _u(r, 0.03, 0.06), _u(r, 0.12, 0.28)
    nr, nh, sh = rad * _u(r, 0.25, 0.5), _u(r, 0.03, 0.09), _u(r, 0.02, 0.08)
    if r.random() < 0.25:
        b.box("body", glass, [rad * 2, bh, rad * _u(r, 1.2, 2.0)], [0, bh / 2, 0])
    else:
        b.frustum("body", glass, rad * _u(r, 0.9, 1.0), rad, 0.0, bh)
    b.frustum("shoulder", glass, rad, nr, bh, bh + sh)
    b.frustum("neck", glass, nr, nr * _u(r, 0.9, 1.1), bh + sh, bh + sh + nh)
    b.frustum("cap", cap, nr * 1.15, nr * 1.15, bh + sh + nh, bh + sh + nh + _u(r, 0.01, 0.025))
    if r.random() < 0.5:
        lm = b.material("label")
        y0 = bh * _u(r, 0.2, 0.4)
        b.frustum("label", lm, rad * 1.03, rad * 1.03, y0, y0 + bh * _u(r, 0.2, 0.4))


def _mug(b: _Builder) -> None:
    r = b.rng
    body = b.material("ceramic", ["white", "red", "blue", "black", "yellow", "teal", "beige"])
    ro, h = _u(r, 0.035, 0.055), _u(r, 0.07, 0.12)
    wall = _u(r, 0.004, 0.009)
    b.tube("body", body, ro - wall, ro, 0.0, h)
    b.frustum("bottom", body, ro, ro, 0.0, wall * 1.5)
    handle = b.material("handle") if r.random() < 0.3 else body
    hr, hh = _u(r, 0.012, 0.025), h * _u(r, 0.5, 0.8)
    yc = h / 2 + _u(r, -0.01, 0.01)
    if r.random() < 0.7:  # round handle: rods along a half ellipse
        angles = np.linspace(-np.pi / 2, np.pi / 2, 7)
        pts = [np.array([ro - 0.003 + hr * 1.6 * np.cos(a), yc + hh / 2 * np.sin(a), 0.0]) for a in angles]
        for p0, p1 in zip(pts[:-1], pts[1:]):
            b.rod("handle", handle, p0, p1, wall * 0.9 + 0.003, sections=8)
    else:  # square handle
        out = ro + hr * 1.4
        b.box("handle", handle, [0.006, hh, 0.012], [out, yc, 0])
        for s in (-1, 1):
            b.box("handle", handle, [out - ro + 0.006, 0.008, 0.012], [(out + ro) / 2, yc + s * hh / 2, 0])


def _airplane(b: _Builder) -> None:
    r = b.rng
    hull, wingm = b.material("hull", ["white", "grey", "steel", "blue", "white"]), b.material("wings")
    length, rad = 1.0, _u(r, 0.035, 0.08)
    b.capsule_z("fuselage", hull, length, rad, [0, 0, 0])
    span, chord = _u(r, 0.7, 1.3), _u(r, 0.1, 0.25)
    sweep, wing_y = _u(r, 0.0, 0.7), _u(r, -0.6, 0.6) * rad
    wing_z = _u(r, -0.1, 0.1)
    taper = _u(r, 0.0, 0.6)
    for sx in (-1, 1):
        m = trimesh.creation.box(extents=[span / 2, 0.012, chord])
        m.apply_translation([sx * span / 4, 0.0, 0.0])
        v = m.vertices.copy()
        frac = np.abs(v[:, 0]) / (span / 2)
        v[:, 2] = v[:, 2] * (1 - taper * frac) + np.abs(v[:, 0]) * np.tan(sweep) * 0.5
        m.vertices = v + [0.0, wing_y, wing_z]
        b.add("wing", m, wingm)
    # tail: vertical fin + stabilisers
    fin_h, tail_z = _u(r, 0.08, 0.2), length / 2 - _u(r, 0.04, 0.1)
    fin = trimesh.creation.box(extents=[0.01, fin_h, _u(r, 0.08, 0.16)])
    fin.vertices[:, 2] += (fin.vertices[:, 1] + fin_h / 2) * _u(r, 0.3, 1.0)
    fin.apply_translation([0, rad + fin_h / 2 - 0.01, tail_z])
    b.add("fin", fin, wingm)
    stab_y = rad * 0.5 if r.random() < 0.7 else rad + fin_h - 0.01
    stab = _u(r, 0.18, 0.4)
    b.box("stabiliser", wingm, [stab, 0.01, _u(r, 0.05, 0.1)], [0, stab_y, tail_z + 0.01])
    n_eng = int(r.choice([0, 2, 2, 4]))
    engm = b.material("engine", ["grey", "steel", "black", "white"]) if n_eng else hull
    for k in range(n_eng):
        sx = -1 if k % 2 == 0 else 1
        x = sx * span * (0.18 if k < 2 else 0.34)
        z = wing_z - chord * 0.6 + abs(x) * np.tan(sweep) * 0.5
        er = _u(r, 0.02, 0.035) if k < 2 else 0.02
        b.rod("engine", engm, [x, wing_y - er * 1.3, z - 0.08], [x, wing_y - er * 1.3, z + 0.05], er)


def _car(b: _Builder) -> None:
    r = b.rng
    paint = b.material("paint", ["red", "blue", "white", "black", "grey", "yellow", "green", "steel"])
    glass, tyre = b.material("glass", ["black", "grey", "teal"]), b.material("tyre", ["black"])
    length, width = _u(r, 0.9, 1.3), _u(r, 0.38, 0.5)
    wr = _u(r, 0.07, 0.12)
    body_h, clearance = _u(r, 0.14, 0.24), wr * _u(r, 0.5, 0.9)
    b.box("body", paint, [width, body_h, length], [0, clearance + body_h / 2, 0])
    kind = str(r.choice(["sedan", "hatch", "suv", "pickup"]))
    cab_l = length * {"sedan": 0.45, "hatch": 0.55, "suv": 0.7, "pickup": 0.3}[kind] * _u(r, 0.9, 1.1)
    cab_z = {"sedan": 0.05, "hatch": 0.15, "suv": 0.1, "pickup": -0.05}[kind] * length
    cab_h = _u(r, 0.1, 0.2) * (1.3 if kind == "suv" else 1.0)
    top_y = clearance + body_h
    cab = trimesh.creation.box(extents=[width * 0.9, cab_h, cab_l])
    slope = _u(r, 0.1, 0.35) * cab_l
    v = cab.vertices
    v[:, 2] = np.where(v[:, 1] > 0, v[:, 2] * (1 - 2 * slope / cab_l) / 1.0, v[:, 2])
    cab.vertices = v
    cab.apply_translation([0, top_y + cab_h / 2, cab_z])
    b.add("cabin", cab, glass)
    b.box("roof", paint, [width * 0.85, 0.015, cab_l - 2 * slope], [0, top_y + cab_h + 0.007, cab_z])
    for sx in (-1, 1):
        for z in (-length * 0.33, length * 0.33):
            b.rod("wheel", tyre, [sx * (width / 2 - 0.03), wr, z], [sx * (width / 2 + 0.03), wr, z], wr, sections=16)
    if r.random() < 0.25:
        b.box("spoiler", paint, [width * 0.9, 0.015, 0.06], [0, top_y + 0.06, length / 2 - 0.05])


def _ashcan(b: _Builder) -> None:
    r = b.rng
    bin_m = b.material("bin", ["steel", "grey", "green", "black", "blue", "white"])
    lid = b.material("lid") if r.random() < 0.5 else bin_m
    h = _u(r, 0.3, 0.9)
    rad = _u(r, 0.14, 0.3) * max(h, 0.5)
    if r.random() < 0.55:
        b.tube("body", bin_m, rad * 0.93, rad, 0.0, h)
        b.frustum("bottom", bin_m, rad, rad, 0.0, 0.01)
        if r.random() < 0.6:
            b.frustum("lid", lid, rad * 1.04, rad * _u(r, 0.3, 1.0), h, h + _u(r, 0.02, 0.12))
        if r.random() < 0.3:
            b.box("pedal", lid, [0.1, 0.02, 0.08], [0, 0.03, -rad - 0.03])
    else:
        w, d = rad * 2, rad * _u(r, 1.4, 2.2)
        wall = 0.015
        b.box("bottom", bin_m, [w, wall, d], [0, wall / 2, 0])
        for sx in (-1, 1):
            b.box("wall", bin_m, [wall, h, d], [sx * (w / 2 - wall / 2), h / 2, 0])
        for sz in (-1, 1):
            b.box("wall", bin_m, [w, h, wall], [0, h / 2, sz * (d / 2 - wall / 2)])
        if r.random() < 0.6:
            b.box("lid", lid, [w * 1.04, 0.03, d * 1.04], [0, h + 0.015, 0], (-_u(r, 0.0, 0.4), 0, 0))
        if r.random() < 0.4:  # wheelie bin
            tyre = b.material("tyre", ["black"])
            for sx in (-1, 1):
                b.rod("wheel", tyre, [sx * w / 2, 0.06, d / 2], [sx * (w / 2 + 0.04), 0.06, d / 2], 0.06, 14)


def _bookshelf(b: _Builder) -> None:
    r = b.rng
    wood = b.material("wood", ["oak", "walnut", "birch", "white", "black", "brown"])
    w, h, d = _u(r, 0.5, 1.3), _u(r, 0.7, 2.0), _u(r, 0.22, 0.4)
    t = _u(r, 0.015, 0.035)
    for sx in (-1, 1):
        b.box("side", wood, [t, h, d], [sx * (w / 2 - t / 2), h / 2, 0])
    n = int(r.integers(2, 7))
    ys = np.linspace(t / 2, h - t / 2, n + 1)
    for y in ys:
        b.box("shelf", wood, [w - 2 * t, t, d], [0, float(y), 0])
    if r.random() < 0.7:
        b.box("back", wood, [w, h, 0.01], [0, h / 2, d / 2 - 0.005])
    if r.random() < 0.5:
        bookm = [b.material(f"books{k}", ["red", "blue", "green", "yellow", "white", "brown", "black"]) for k in range(3)]
        gap = ys[1] - ys[0]
        for y in ys[:-1][: int(r.integers(1, n + 1))]:
            x = -w / 2 + t
            while x < w / 2 - t - 0.05 and r.random() < 0.93:
                bw = _u(r, 0.02, 0.05)
                bh = gap * _u(r, 0.55, 0.85)
                b.box("book", bookm[int(r.integers(0, 3))], [bw, bh, d * 0.8], [x + bw / 2, y + t / 2 + bh / 2, -0.01])
                x += bw + 0.002


def _display(b: _Builder) -> None:
    r = b.rng
    case, screen = b.material("case", ["black", "grey", "white", "steel"]), b.material("screen", ["black", "blue", "teal"])
    w = _u(r, 0.35, 0.75)
    sh, thick = w * _u(r, 0.5, 0.8), _u(r, 0.02, 0.07)
    tilt = _u(r, -0.05, 0.25)
    neck_h = _u(r, 0.06, 0.22)
    cy = neck_h + sh / 2
    b.box("panel", case, [w, sh, thick], [0, cy, 0], (tilt, 0, 0))
    off = -thick / 2 - 0.002
    b.box("screen", screen, [w * 0.92, sh * 0.88, 0.004],
          [0, cy - np.sin(tilt) * off, off * np.cos(tilt)], (tilt, 0, 0))
    if r.random() < 0.3:  # CRT-style back
        b.box("backbox", case, [w * 0.7, sh * 0.7, w * _u(r, 0.3, 0.7)], [0, cy, thick / 2 + w * 0.2])
    style = str(r.choice(["box", "disc", "vleg"]))
    b.box("neck", case, [0.05, neck_h + sh * 0.3, 0.03], [0, (neck_h + sh * 0.3) / 2, thick / 2 + 0.02])
    if style == "box":
        b.box("foot", case, [w * _u(r, 0.3, 0.6), 0.02, _u(r, 0.12, 0.22)], [0, 0.01, 0.02])
    elif style == "disc":
        b.frustum("foot", case, _u(r, 0.08, 0.14), 0.05, 0.0, 0.02, centre_xz=(0.0, 0.02))
    else:
        for sx in (-1, 1):
            b.box("foot", case, [0.03, 0.02, _u(r, 0.15, 0.25)], [sx * 0.06, 0.01, 0.02], (0, sx * 0.4, 0))


_GENERATORS: dict[str, Callable[[_Builder], None]] = {
    "03001627": _chair,
    "04379243": _table,
    "02828884": _bench,
    "04256520": _sofa,
    "03636649": _lamp,
    "02876657": _bottle,
    "03797390": _mug,
    "02691156": _airplane,
    "02958343": _car,
    "02747177": _ashcan,
    "02871439": _bookshelf,
    "03211117": _display,
}


# ----------------------------------------------------------------------------- output


def model_id(seed: int, synset: str, index: int) -> str:
    """Deterministic 32-hex model id (ShapeNet-style) for shape `index` of `synset`."""
    return hashlib.sha256(f"recon-demo:{seed}:{synset}:{index}".encode()).hexdigest()[:32]


def build_shape(synset: str, seed: int, index: int) -> _Builder:
    """Assemble one shape (parts in ShapeNet v2 pose, centred, unit bbox diagonal)."""
    rng = np.random.default_rng([int(seed), int(synset), int(index)])
    b = _Builder(rng)
    _GENERATORS[synset](b)
    pose = _euler((_u(rng, -0.05, 0.05), _u(rng, -0.2, 0.2), _u(rng, -0.05, 0.05)))
    for _, mesh, _ in b.parts:
        mesh.apply_transform(pose)
    allv = np.concatenate([m.vertices for _, m, _ in b.parts])
    lo, hi = allv.min(axis=0), allv.max(axis=0)
    centre, diag = (lo + hi) / 2, float(np.linalg.norm(hi - lo))
    for _, mesh, _ in b.parts:
        mesh.vertices = (mesh.vertices - centre) / diag
    return b


def _obj_text(b: _Builder) -> str:
    lines = ["# recon procedural demo shape", "mtllib model_normalized.mtl"]
    offset = 1
    for name, mesh, mat in b.parts:
        lines += [f"o {name}", f"usemtl {mat}"]
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in np.asarray(mesh.vertices)]
        lines += [f"f {a + offset} {c + offset} {d + offset}" for a, c, d in np.asarray(mesh.faces)]
        offset += len(mesh.vertices)
    return "\n".join(lines) + "\n"


def _mtl_text(b: _Builder) -> str:
    lines = ["# recon procedural demo materials"]
    for name, (r, g, bl) in b.materials.items():
        lines += [
            f"newmtl {name}",
            "Ka 0.100000 0.100000 0.100000",
            f"Kd {r:.6f} {g:.6f} {bl:.6f}",
            "Ks 0.100000 0.100000 0.100000",
            "Ns 10.000000",
            "d 1.000000",
            "illum 2",
            "",
        ]
    return "\n".join(lines)


def _taxonomy(synsets: list[str], n: int) -> list[dict]:
    return [{"synsetId": s, "name": SHAPENET_NAMES[s], "children": [], "numInstances": n} for s in synsets]


def generate_demo(
    out: Path, shapes_per_category: int = 24, seed: int = 0, categories: list[str] | None = None
) -> list[Path]:
    """Write the demo set under `out` and return the sorted list of OBJ paths.

    `categories` are synset ids or short names from `DEMO_CATEGORIES` (default: all).
    """
    out = Path(out)
    by_name = {v: k for k, v in DEMO_CATEGORIES.items()}
    synsets = sorted({by_name.get(c, c) for c in (categories or DEMO_CATEGORIES)})
    unknown = [s for s in synsets if s not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown demo categories {unknown}; known: {sorted(DEMO_CATEGORIES.values())}")
    paths: list[Path] = []
    for synset in synsets:
        for i in range(shapes_per_category):
            b = build_shape(synset, seed, i)
            folder = out / synset / model_id(seed, synset, i) / "models"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model_normalized.mtl").write_text(_mtl_text(b), encoding="utf-8", newline="\n")
            (folder / "model_normalized.obj").write_text(_obj_text(b), encoding="utf-8", newline="\n")
            paths.append(folder / "model_normalized.obj")
    taxonomy = json.dumps(_taxonomy(synsets, shapes_per_category), indent=2) + "\n"
    (out / "taxonomy.json").write_text(taxonomy, encoding="utf-8", newline="\n")
    return sorted(paths)
