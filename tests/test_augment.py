"""Deterministic per-view augmentation, and how the embed stage uses it: variant 0 is the clean
render, variants 1.. its seeded augmentations."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.augment import (
    CUTOUT,
    CUTOUT_FILL,
    augment_view,
    crop_params,
    cutout,
    variant_seed,
)
from pipeline.store import ArraySpec, Shard, StoreWriter, open_store


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A structured (not flat) 224 x 224 RGB image."""
    y, x = np.mgrid[0:224, 0:224]
    img = np.stack([x, y, (x + y) // 2], axis=-1) % 256
    return img.astype(np.uint8)


def test_same_seed_identical(image: np.ndarray) -> None:
    for seed in (0, 1, 2**62 + 17):
        np.testing.assert_array_equal(augment_view(image, seed), augment_view(image, seed))


def test_independent_of_global_rng(image: np.ndarray) -> None:
    np.random.seed(1), torch.manual_seed(1), random.seed(1)
    a = augment_view(image, 42)
    np.random.seed(2), torch.manual_seed(2), random.seed(2)
    np.testing.assert_array_equal(a, augment_view(image, 42))


def test_global_rng_untouched(image: np.ndarray) -> None:
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    for variant in (1, 2, 3):
        augment_view(image, variant_seed(7, "02691156-abc", 0, variant))
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()


def test_variants_differ(image: np.ndarray) -> None:
    variant = lambda shape, view, a: augment_view(image, variant_seed(0, shape, view, a))   # as embed seeds them
    views = [image] + [variant("02691156-abc", 0, a) for a in range(1, 6)]
    flat = [v.tobytes() for v in views]
    assert len(set(flat)) == len(flat)
    other_view = variant("02691156-abc", 1, 1)
    other_shape = variant("02691156-abd", 0, 1)
    assert not np.array_equal(views[1], other_view)
    assert not np.array_equal(views[1], other_shape)


def test_output_size_and_dtype(image: np.ndarray) -> None:
    rect = np.ascontiguousarray(image[:150, :200])
    for size in (224, 64):
        out = augment_view(rect, 3, size=size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError):
        augment_view(image.astype(np.float32), 0)


def write_renders(path: Path, ids: list[str], views: int = 2, size: int = 40) -> np.ndarray:
    """A renders store of random views [N, V, size, size, 3] (what `recon render` writes)."""
    images = np.random.default_rng(0).integers(0, 256, (len(ids), views, size, size, 3), dtype=np.uint8)
    writer = StoreWriter.open(path, ids, {"images": ArraySpec((views, size, size, 3), "uint8", 2)},
                              {"resolution": size})
    for block in writer.pending_blocks():
        writer.write_rows(block, {"images": images[block]}, np.ones(block.size, dtype=bool))
    writer.finalise()
    return images


def test_embed_reads_variant_zero_as_the_untouched_render(tmp_path: Path) -> None:
    """The embed stage's reader (stages/embed.py ``ViewVariants``): the clean views are the stored
    renders as they are (the teacher resizes them itself), the augmented ones follow them
    variant-major within each view, each ``augment_view`` at its (seed, shape, view, variant) seed."""
    from stages.embed import ViewVariants

    ids = ["02691156-a", "02691156-b", "03001627-c"]
    images = write_renders(tmp_path / "renders.zarr", ids)
    item = ViewVariants(tmp_path / "renders.zarr", np.array(ids), variants=3, seed=5, size=32)[1]
    assert item["clean"].dtype == torch.uint8
    np.testing.assert_array_equal(item["clean"].numpy(), images[1])              # [V, 40, 40, 3], untouched
    augmented = item["augmented"].numpy()
    assert augmented.shape == (2 * 2, 32, 32, 3)
    for v in range(2):
        for a in (1, 2):
            np.testing.assert_array_equal(augmented[v * 2 + a - 1],
                                          augment_view(images[1, v], variant_seed(5, ids[1], v, a), 32))
    only_clean = ViewVariants(tmp_path / "renders.zarr", np.array(ids), variants=1, seed=5, size=32)[1]
    np.testing.assert_array_equal(only_clean["clean"].numpy(), images[1])
    assert only_clean["augmented"].shape == (0, 32, 32, 3)


class PixelTeacher:
    """A stand-in image teacher whose feature is the image's top-left 4 x 4 pixels (/255): it
    tells apart every image the embed stage hands it, at any size."""

    name, dim, precision = "pixels", 48, "auto"
    preprocessing = SimpleNamespace(size=32)

    def identity(self) -> dict:
        return {"name": self.name, "weights": None}

    def encode_images(self, images, batch_size: int = 64) -> torch.Tensor:
        images = torch.tensor(np.asarray(images))
        return images[:, :4, :4].reshape(len(images), -1).float() / 255


def test_embed_stores_the_clean_render_at_variant_zero(tmp_path: Path, monkeypatch) -> None:
    """The stored image features [N, V, A, D]: variant 0 is the teacher's feature of the render
    itself, variants 1.. those of its seeded augmentations, in every view."""
    import pipeline.teachers
    from stages.embed import EmbedParams, embed_images

    ids = ["02691156-a", "02691156-b", "03001627-c"]
    images = write_renders(tmp_path / "renders.zarr", ids)
    teacher = PixelTeacher()
    monkeypatch.setattr(pipeline.teachers, "load_teacher", lambda *args, **kwargs: teacher)
    p = EmbedParams(variants=3, seed=5, chunk_rows=2, batch_size=4, device="cpu")
    embed_images(p, Shard(), torch.device("cpu"), tmp_path / "renders.zarr", tmp_path / "image.zarr", ids)
    stored = open_store(tmp_path / "image.zarr")["features"][:].astype(np.float32)
    assert stored.shape == (3, 2, 3, 48)
    for row, shape_id in enumerate(ids):
        for v in range(2):
            expected = [images[row, v]] + [augment_view(images[row, v], variant_seed(5, shape_id, v, a), 32)
                                           for a in (1, 2)]                   # 40 x 40, then 32 x 32 twice
            for a, view in enumerate(expected):
                np.testing.assert_allclose(stored[row, v, a], teacher.encode_images(view[None]).numpy()[0],
                                           atol=1e-3, err_msg=f"{shape_id} view {v} variant {a}")


def test_variant_seed_stable() -> None:
    # hashlib-based: fixed across processes and PYTHONHASHSEED
    assert variant_seed(0, "02691156-1a04e3eab45ca15dd86060f189eb133", 0, 1) == 6948927206965674692
    assert variant_seed(1234, "x", 2, 3) == 7264489208323228472
    seeds = {variant_seed(b, s, v, a) for b in (0, 1) for s in ("a", "b") for v in (0, 1) for a in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


def test_cutout_is_16x16_grey(image: np.ndarray) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = np.asarray(cutout(Image.fromarray(image), rng))
    changed = np.any(out != image, axis=-1)
    ys, xs = np.nonzero(changed)
    assert ys.max() - ys.min() + 1 <= CUTOUT and xs.max() - xs.min() + 1 <= CUTOUT
    assert np.all(out[changed] == CUTOUT_FILL)


def test_crop_params_scale_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_params(256, 256, rng)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 256
        assert 0.6 <= h * w / 256**2 <= 1.0
