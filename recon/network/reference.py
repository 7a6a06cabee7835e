"""Name mapping between reference ReCon state dicts and ``recon.network.model`` modules.

Reference pretraining keys look like ``MAE_encoder.blocks.blocks.0.attn_contrast.kv.weight``,
``MAE_decoder.*``, ``increase_dim.0.*``, ``img_proj.*``, ``mask_token``; fine-tuning keys
drop ``MAE_encoder.`` and add ``cls_head_finetune.*``. Saved checkpoints may carry a
leading ``module.`` (DataParallel), which is stripped.

Also ReCon++'s initialisation of the encoder blocks from a timm ViT (:func:`init_from_vit`):
``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` onto both branches of our block i.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

Rule = tuple[str, str]   # (reference template, our template); {i}, {p} are placeholders

_PARAM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

ENCODER_RULES: list[Rule] = [
    *[(f"{q}_{s}", f"{q}_{s}") for q in ("cls", "img", "text") for s in ("token", "pos")],
    ("encoder.first_conv.0.{p}", "patch_embed.conv1.{p}"),
    ("encoder.first_conv.1.{p}", "patch_embed.bn1.{p}"),
    ("encoder.first_conv.3.{p}", "patch_embed.conv2.{p}"),
    ("encoder.second_conv.0.{p}", "patch_embed.conv3.{p}"),
    ("encoder.second_conv.1.{p}", "patch_embed.bn3.{p}"),
    ("encoder.second_conv.3.{p}", "patch_embed.conv4.{p}"),
    ("pos_embed.0.{p}", "pos_embed.fc1.{p}"),
    ("pos_embed.2.{p}", "pos_embed.fc2.{p}"),
    *[(f"blocks.blocks.{{i}}.{ref}{suffix}.{{p}}", f"blocks.{{i}}.{branch}_{ours}.{{p}}")
      for suffix, branch in (("", "patch"), ("_contrast", "query"))
      for ref, ours in (("norm1", "norm1"), ("norm2", "norm2"))],
    *[(f"blocks.blocks.{{i}}.{ref}.{{p}}", f"blocks.{{i}}.{ours}.{{p}}")
      for ref, ours in (("attn.qkv", "patch_attn.qkv"), ("attn.proj", "patch_attn.proj"),
                        ("mlp.fc1", "patch_mlp.fc1"), ("mlp.fc2", "patch_mlp.fc2"),
                        ("attn_contrast.q", "query_attn.q"), ("attn_contrast.kv", "query_attn.kv"),
                        ("attn_contrast.proj", "query_attn.proj"),
                        ("mlp_contrast.fc1", "query_mlp.fc1"), ("mlp_contrast.fc2", "query_mlp.fc2"))],
    ("norm.{p}", "norm.{p}"),
]

PRETRAIN_RULES: list[Rule] = [
    ("mask_token", "mask_token"),
    *[(f"MAE_encoder.{ref}", f"encoder.{ours}") for ref, ours in ENCODER_RULES],
    ("decoder_pos_embed.0.{p}", "decoder_pos_embed.fc1.{p}"),
    ("decoder_pos_embed.2.{p}", "decoder_pos_embed.fc2.{p}"),
    *[(f"MAE_decoder.blocks.{{i}}.{m}.{{p}}", f"decoder.blocks.{{i}}.{m}.{{p}}")
      for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    ("MAE_decoder.norm.{p}", "decoder.norm.{p}"),
    ("increase_dim.0.{p}", "rebuild_head.{p}"),          # Conv1d(k=1) -> Linear
    ("img_proj.{p}", "img_proj.{p}"),
    ("text_proj.{p}", "text_proj.{p}"),
    ("cls_proj.{i}.{p}", "cls_proj.{i}.{p}"),            # only with the SMC target
]

FINETUNE_RULES: list[Rule] = [
    *[(ref, f"encoder.{ours}") for ref, ours in ENCODER_RULES],
    ("cls_head_finetune.{i}.{p}", "head.{i}.{p}"),
]

# the reference part-segmentation model (segmentation/models/pt.py): encoder names as fine-tuning
PARTSEG_RULES: list[Rule] = [
    *[(ref, f"encoder.{ours}") for ref, ours in ENCODER_RULES],
    ("label_conv.{i}.{p}", "label_embed.{i}.{p}"),
    ("propagation_0.mlp_convs.{i}.{p}", "propagation.convs.{i}.{p}"),
    ("propagation_0.mlp_bns.{i}.{p}", "propagation.bns.{i}.{p}"),
    *[(f"{ref}{{i}}.{{p}}", f"head.{ours}{{i}}.{{p}}") for ref, ours in (("convs", "conv"), ("bns", "bn"))],
]

RULES = {"pretrain": PRETRAIN_RULES, "finetune": FINETUNE_RULES, "partseg": PARTSEG_RULES}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{i\}", r"(?P<i>\d+)")
    pattern = pattern.replace(r"\{p\}", "(?P<p>" + "|".join(_PARAM) + ")")
    return re.compile(pattern)


_COMPILED = {kind: [(_compile(a), b, _compile(b), a) for a, b in rules] for kind, rules in RULES.items()}


def _rename(key: str, kind: str, reverse: bool) -> str | None:
    for ref_re, ours_t, ours_re, ref_t in _COMPILED[kind]:
        m = (ours_re if reverse else ref_re).fullmatch(key)
        if m:
            return (ref_t if reverse else ours_t).format(**m.groupdict())
    return None


def reference_name(our_key: str, kind: str = "pretrain") -> str | None:
    """Reference name for one of our keys, or None if no rule matches."""
    return _rename(our_key, kind, reverse=True)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop a leading ``prefix`` from every key that has it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def detect_kind(state_dict: Mapping[str, Tensor]) -> str:
    """``pretrain`` if any key lives under MAE_encoder./MAE_decoder., ``partseg`` if any under
    propagation_0. (the segmentation model), else ``finetune``."""
    keys = strip_prefix(state_dict).keys()
    if any(k.startswith(("MAE_encoder.", "MAE_decoder.")) for k in keys):
        return "pretrain"
    return "partseg" if any(k.startswith("propagation_0.") for k in keys) else "finetune"


def _to_ours_tensor(our_key: str, v: Tensor) -> Tensor:
    return v.squeeze(-1) if our_key == "rebuild_head.weight" and v.ndim == 3 else v


def _to_ref_tensor(ref_key: str, v: Tensor) -> Tensor:
    return v.unsqueeze(-1) if ref_key == "increase_dim.0.weight" and v.ndim == 2 else v


def reference_to_ours(state_dict: Mapping[str, Tensor], kind: str = "pretrain") -> dict[str, Tensor]:
    """Rename a reference state dict (``module.`` optional) to our names.

    ``kind`` is ``pretrain``, ``finetune`` or ``auto``. Raises KeyError naming every
    reference key that no rule consumes.
    """
    state_dict = strip_prefix(state_dict)
    kind = detect_kind(state_dict) if kind == "auto" else kind
    out, unconsumed = {}, []
    for k, v in state_dict.items():
        ours = _rename(k, kind, reverse=False)
        if ours is None:
            unconsumed.append(k)
        else:
            out[ours] = _to_ours_tensor(ours, v)
    if unconsumed:
        raise KeyError(f"{len(unconsumed)} reference keys not consumed ({kind}): {unconsumed}")
    return out


def ours_to_reference(state_dict: Mapping[str, Tensor], kind: str = "pretrain") -> dict[str, Tensor]:
    """Inverse of :func:`reference_to_ours`; raises KeyError naming unmapped keys."""
    out, unmapped = {}, []
    for k, v in state_dict.items():
        ref = _rename(k, kind, reverse=True)
        if ref is None:
            unmapped.append(k)
        else:
            out[ref] = _to_ref_tensor(ref, v)
    if unmapped:
        raise KeyError(f"{len(unmapped)} keys have no reference name ({kind}): {unmapped}")
    return out


def load_reference_checkpoint(path: str | PathLike) -> dict[str, Tensor]:
    """Load a reference ``.pth`` and return its ``base_model`` state dict, ``module.`` stripped."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["base_model"] if isinstance(ckpt, Mapping) and "base_model" in ckpt else ckpt
    return strip_prefix(sd)


def load_reference_into(model: nn.Module, source: str | PathLike | Mapping[str, Tensor],
                        kind: str = "auto") -> nn.Module:
    """Map a reference checkpoint (path or state dict) and load it strictly into ``model``."""
    sd = load_reference_checkpoint(source) if not isinstance(source, Mapping) else source
    model.load_state_dict(reference_to_ours(sd, kind), strict=True)
    return model


def init_classifier_from_pretrain(classifier: nn.Module, pretrain_state_dict: Mapping[str, Tensor],
                                  prefix: str = "encoder.") -> tuple[list[str], list[str]]:
    """Load the encoder part of a pretraining state dict (our names) non-strictly.

    Like the reference: keys under ``encoder.`` load into the classifier's encoder, the head
    stays freshly initialised. Returns (missing classifier keys, ignored pretrain keys).
    BatchNorm ``num_batches_tracked`` buffers are never reported missing (PyTorch fills them).
    """
    sd = strip_prefix(pretrain_state_dict)
    loadable = {k: v for k, v in sd.items() if k.startswith(prefix)}
    result = classifier.load_state_dict(loadable, strict=False)
    ignored = [k for k in sd if not k.startswith(prefix)] + list(result.unexpected_keys)
    return list(result.missing_keys), ignored



HEADS_BY_WIDTH = {192: 3, 256: 4, 384: 6}


def config_from_state_dict(ours: Mapping[str, Tensor], num_heads: int | None = None) -> dict:
    """ReConConfig fields readable from the weights of an our-named state dict.

    Head counts are not stored in weights: the variant's count for its width (width / 64
    otherwise) unless given."""
    width = int(ours["encoder.cls_token"].shape[-1])
    heads = num_heads or HEADS_BY_WIDTH.get(width, max(1, width // 64))

    def count(prefix: str) -> int:
        return len({k.split(".")[2] for k in ours if k.startswith(prefix)})

    config = {"trans_dim": width, "num_heads": heads, "depth": count("encoder.blocks."),
              "decoder_num_heads": heads}
    if count("decoder.blocks."):
        config["decoder_depth"] = count("decoder.blocks.")
    if "encoder.img_token" in ours and ours["encoder.img_token"].shape[1] != 1:   # ReCon++: K image queries
        config["img_queries"] = int(ours["encoder.img_token"].shape[1])
    if "rebuild_head.weight" in ours:
        config["group_size"] = int(ours["rebuild_head.weight"].shape[0]) // 3
    for name, field in (("img_proj.weight", "img_feat_dim"), ("text_proj.weight", "text_feat_dim")):
        if name in ours:
            config[field] = int(ours[name].shape[0])
    return config


def convert_reference_checkpoint(src: str | PathLike, dst: str | PathLike,
                                 num_heads: int | None = None) -> dict:
    """A released reference ``.pth`` → our ``model.pt`` format ({'model', 'config', 'source'})."""
    reference = load_reference_checkpoint(src)
    kind = detect_kind(reference)
    if kind != "pretrain":
        raise ValueError(f"{src} holds a fine-tuned classifier; pass it to `recon finetune --init` "
                         "directly (only pretraining checkpoints convert to model.pt)")
    ours = reference_to_ours(reference, kind)
    config = config_from_state_dict(ours, num_heads)
    from recon.runtime.trainstate import save_atomic

    save_atomic(Path(dst), {"model": ours, "config": config, "source": str(src)})
    return config


# ----------------------------------------------------------------------------- timm ViT blocks

#: a timm ViT block's modules -> ours, patch branch and query branch. ReCon++ loads the ViT's blocks
#: into both (ReConV2/models/transformer.py, ``ReConBlocks.load_pretrained_timm_weights``); the query
#: branch's cross attention takes the first third of ``attn.qkv`` as ``q`` and the rest as ``kv``.
VIT_BLOCK: dict[str, tuple[str, ...]] = {
    "norm1": ("patch_norm1", "query_norm1"), "attn.proj": ("patch_attn.proj", "query_attn.proj"),
    "norm2": ("patch_norm2", "query_norm2"), "mlp.fc1": ("patch_mlp.fc1", "query_mlp.fc1"),
    "mlp.fc2": ("patch_mlp.fc2", "query_mlp.fc2")}


def load_vit_state(path: str | PathLike) -> dict[str, Tensor]:
    """A timm ViT's state dict from a local file: ``.safetensors`` (the hub's format), or a
    ``torch.save`` of ``model.state_dict()`` (possibly under ``model`` / ``state_dict``), loaded with
    ``weights_only=True``; a leading ``module.`` is stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_vit: {path} is not a file (a timm ViT state dict: .safetensors or torch.save)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return strip_prefix(load_file(str(path)))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    return strip_prefix(sd)


def vit_block_state(vit: Mapping[str, Tensor], cfg) -> dict[str, Tensor]:
    """Our ``encoder.blocks.*`` tensors (names of :class:`recon.network.model.ReConBlock`) from a timm
    ViT's ``blocks.*`` (its patch embedding, tokens, positions, final norm and head are not used).
    ``cfg`` is the encoder's ReConConfig. Raises ValueError naming what differs: depth, width, MLP
    width, qkv biases, or block parameters ours lack (LayerScale, qk-norm). Head counts are not in
    the weights: ``cfg.num_heads`` must be the ViT's (ViT-Ti 192/3 = our ``tiny``, ViT-S 384/6 = ``base``)."""
    if cfg.architecture != "recon":
        raise ValueError(f"init_vit maps onto ReCon's two-branch blocks, not architecture {cfg.architecture!r}")
    blocks = sorted({int(k.split(".")[1]) for k in vit if k.startswith("blocks.")})
    if not blocks:
        raise ValueError("init_vit: no 'blocks.<i>.' keys: not a timm VisionTransformer state dict")
    if blocks != list(range(cfg.depth)):
        raise ValueError(f"init_vit: the ViT has {len(blocks)} blocks, the encoder {cfg.depth} (set model.depth)")
    has_bias = "blocks.0.attn.qkv.bias" in vit
    if has_bias != cfg.qkv_bias:
        raise ValueError(f"init_vit: the ViT's attn.qkv {'has' if has_bias else 'has no'} bias, the encoder's "
                         f"{'has' if cfg.qkv_bias else 'has none'} (set model.qkv_bias: {str(has_bias).lower()})")
    needed = {f"{m}.{p}" for m in (*VIT_BLOCK, "attn.qkv") for p in ("weight", "bias")} - (
        set() if has_bias else {"attn.qkv.bias"})
    for i in blocks:
        present = {k[len(f"blocks.{i}."):] for k in vit if k.startswith(f"blocks.{i}.")}
        if present != needed:
            raise ValueError(f"init_vit: block {i} has parameters ours lack {sorted(present - needed)} "
                             f"and lacks {sorted(needed - present)} (LayerScale or qk-norm ViTs do not map)")
    width = int(vit["blocks.0.norm1.weight"].shape[0])
    if width != cfg.trans_dim:
        raise ValueError(f"init_vit: the ViT is {width} wide, the encoder {cfg.trans_dim} (ViT-Ti 192 = variant tiny, "
                         f"ViT-S 384 = base; or set model.trans_dim and num_heads)")
    hidden = int(vit["blocks.0.mlp.fc1.weight"].shape[0])
    if hidden != int(width * cfg.mlp_ratio):
        raise ValueError(f"init_vit: the ViT's MLP is {hidden} wide, the encoder's {int(width * cfg.mlp_ratio)} "
                         f"(set model.mlp_ratio: {hidden / width:g})")
    out: dict[str, Tensor] = {}
    for i in blocks:
        src, dst = f"blocks.{i}.", f"encoder.blocks.{i}."
        for module, ours in VIT_BLOCK.items():
            for p in ("weight", "bias"):
                out.update({f"{dst}{o}.{p}": vit[f"{src}{module}.{p}"] for o in ours})
        for p in ("weight", "bias") if has_bias else ("weight",):
            qkv = vit[f"{src}attn.qkv.{p}"]
            out.update({f"{dst}patch_attn.qkv.{p}": qkv, f"{dst}query_attn.q.{p}": qkv[:width],
                        f"{dst}query_attn.kv.{p}": qkv[width:]})
    return out


def init_from_vit(model: nn.Module, vit: Mapping[str, Tensor] | str | PathLike) -> list[str]:
    """Copy a timm ViT's blocks (a state dict or a file, :func:`load_vit_state`) into ``model``'s encoder
    blocks (a ReConPretrain or ReConClassifier: ``.cfg`` and ``.encoder``), both branches, as ReCon++
    does; everything else keeps its initialisation. Returns our parameter names that were set."""
    vit = load_vit_state(vit) if not isinstance(vit, Mapping) else strip_prefix(vit)
    state = vit_block_state(vit, model.cfg)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"init_vit: the ViT's tensors do not fit {bad[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return sorted(state)
