"""Initialisation as the reference code does it, module family by module family (its ``_init_weights``).

Each family is checked against the distribution the reference draws it from: the encoder side
trunc-normal(0.02), the decoder blocks xavier-uniform, the decoder's positional MLP and rebuild head
PyTorch's default (kaiming-uniform, bound 1/sqrt(fan_in)), the projections normal(0.02, 0.01). The
standard deviations of these families differ by 2x or more, so a family that drifts to another
initialisation fails here.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from recon.downstream import recipes as R
from recon.downstream import weights as W
from recon.network.model import ReConClassifier, ReConConfig, ReConPretrain


def linear_weights(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    return [(n, m.weight.detach(), None if m.bias is None else m.bias.detach())
            for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))]


def fan_in_out(w: torch.Tensor) -> tuple[int, int]:
    return w.shape[1] * (w[0, 0].numel()), w.shape[0] * (w[0, 0].numel())


def assert_trunc_normal(name: str, w: torch.Tensor, std: float = 0.02, mean: float = 0.0) -> None:
    assert abs(w.mean().item() - mean) < 4 * std / math.sqrt(w.numel()) + 1e-4, name
    assert w.std().item() == pytest.approx(std, rel=0.1 if w.numel() >= 300 else 0.35), name


def assert_uniform(name: str, w: torch.Tensor, bound: float) -> None:
    assert w.abs().max().item() <= bound + 1e-7, name
    if w.numel() >= 300:
        assert w.abs().max().item() > 0.95 * bound, name                # fills the interval
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name


@pytest.fixture(scope="module")
def pretrain() -> ReConPretrain:
    torch.manual_seed(0)
    return ReConPretrain(ReConConfig.variant("tiny", img_feat_dim=768, text_feat_dim=512,
                                             targets=("rec", "img", "text", "smc")))


def test_encoder_side_is_trunc_normal(pretrain):
    for name, w, b in linear_weights(pretrain.encoder):
        assert_trunc_normal(f"encoder.{name}", w)
        assert b is None or torch.count_nonzero(b) == 0, name
    for m in pretrain.encoder.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    for name in ("cls_token", "img_token", "text_token", "cls_pos", "img_pos", "text_pos"):
        assert_trunc_normal(name, getattr(pretrain.encoder, name))
    assert_trunc_normal("mask_token", pretrain.mask_token)


def test_decoder_blocks_are_xavier_uniform(pretrain):
    weights = linear_weights(pretrain.decoder)
    assert len(weights) == 4 * pretrain.cfg.decoder_depth                 # qkv, proj, fc1, fc2 per block
    for name, w, b in weights:
        fan_in, fan_out = fan_in_out(w)
        assert_uniform(f"decoder.{name}", w, math.sqrt(6.0 / (fan_in + fan_out)))
        assert b is None or torch.count_nonzero(b) == 0, name
    for m in pretrain.decoder.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_decoder_positions_and_rebuild_head_keep_pytorch_default(pretrain):
    for prefix, module in (("decoder_pos_embed", pretrain.decoder_pos_embed), ("rebuild_head", pretrain.rebuild_head)):
        for name, w, b in linear_weights(module):
            bound = 1.0 / math.sqrt(fan_in_out(w)[0])
            assert_uniform(f"{prefix}.{name}", w, bound)
            assert torch.count_nonzero(b) == b.numel() and b.abs().max() <= bound, name   # default biases too


def test_projections_are_normal_mean_002(pretrain):
    for proj in (pretrain.img_proj, pretrain.text_proj, pretrain.cls_proj):
        for name, w, b in linear_weights(proj):
            assert_trunc_normal(name, w, std=0.01, mean=0.02)
            assert torch.count_nonzero(b) == 0


def test_classifier_from_scratch_and_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = ReConConfig.variant("tiny")
    scratch = ReConClassifier(cfg, 40)
    assert torch.count_nonzero(scratch.encoder.cls_token) == 0              # the reference leaves [CLS] at zero
    for name in ("img_token", "text_token", "cls_pos", "img_pos", "text_pos"):
        assert_trunc_normal(name, getattr(scratch.encoder, name))
    for name, w, b in linear_weights(scratch):                              # head included
        assert_trunc_normal(name, w)
    # under a checkpoint the reference never runs _init_weights: its head keeps PyTorch's default
    pre = ReConPretrain(cfg.replace(img_feat_dim=16, text_feat_dim=8))
    torch.save({"model": pre.state_dict(), "config": json.loads(json.dumps(pre.cfg.__dict__, default=list))},
               tmp_path / "model.pt")
    p = R.FinetuneParams(init=str(tmp_path / "model.pt"), profile="modelnet40")
    model = W.build_classifier(p, 40, W.load_init(p.init))
    for name, w, b in linear_weights(model.head):
        assert_uniform(f"head.{name}", w, 1.0 / math.sqrt(fan_in_out(w)[0]))
    assert torch.equal(model.encoder.cls_token, pre.encoder.cls_token)


@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_initial_reconstruction_loss_is_in_the_reference_range(variant):
    """Side by side on the same batches the reference starts at 0.69 (base) / 0.79 (tiny); with
    trunc-normal everywhere ours started at 0.32 / 0.10 (the rebuild head's outputs were tiny)."""
    g = torch.Generator().manual_seed(0)
    points = torch.randn(8, 1024, 3, generator=g)
    points = points / points.norm(dim=-1, keepdim=True) * torch.rand(8, 1024, 1, generator=g) ** (1 / 3)
    losses = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = ReConPretrain(ReConConfig.variant(variant, img_feat_dim=16, text_feat_dim=8)).eval()
        with torch.no_grad():
            losses.append(model(points)["loss_rec"].item())
    # per seed the loss spreads 0.43-0.88 (seeds 0-11); the point is "not 0.10 / 0.32"
    assert 0.5 < np.mean(losses) < 1.0 and min(losses) > 0.35, losses
