"""Optimiser parameter groups: the lr multiplier of ``param_groups``, and which parameters the
pretraining trainer gives ``query_lr_scale`` (``QUERY_SIDE``), checked against the model's real
parameter names and against what its losses train."""

from __future__ import annotations

import pytest
import torch

from conftest import write_synthetic_cache
from recon.pretraining import trainer
from recon.pretraining.trainer import QUERY_SIDE, PretrainParams, train
from recon.runtime.optim import no_decay, param_groups

MODEL = {"trans_dim": 48, "num_heads": 3, "decoder_num_heads": 3, "depth": 2, "decoder_depth": 1,
         "num_group": 8, "group_size": 16, "proj_norm": "batch"}


def test_param_groups_scale_the_named_parameters_and_split_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 0.05, 1e-3, boosted=("2.",), boost=7.0)
    by_name = {n: p for n, p in model.named_parameters()}
    placed = {n: g for g in groups for n, p in by_name.items() if any(p is q for q in g["params"])}
    assert sorted(placed) == sorted(n for n, p in by_name.items() if p.requires_grad)   # each once, frozen left out
    assert sum(len(g["params"]) for g in groups) == len(placed)
    for name, group in placed.items():
        boosted = name.startswith("2.")
        assert (group["lr_scale"], group["lr"]) == ((7.0, 7e-3) if boosted else (1.0, 1e-3))
        assert group["weight_decay"] == (0.0 if no_decay(name, by_name[name]) else 0.05)


def trained_by(model: trainer.ReConPretrain, losses: tuple[str, ...]) -> set[str]:
    """Parameters that get a non-zero gradient from the sum of ``losses`` (eval mode: no drop path)."""
    model.eval().zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(4, 128, 3, generator=gen) * 2 - 1
    img = torch.randn(4, model.cfg.img_feat_dim, generator=gen)
    text = torch.randn(4, model.cfg.text_feat_dim, generator=gen)
    out = model(points, img, text, mask=model.random_mask(4, "cpu", generator=gen))
    sum(out[k] for k in losses).backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return names


def run_trainer(tmp_path, monkeypatch, query_lr_scale: float):
    """One optimiser step of the real trainer; returns (its model, its optimizer, the step's base lr)."""
    captured, lrs = {}, []
    real_adamw, real_set_lr = trainer.adamw, trainer.set_lr

    def recording_adamw(model, *args):
        captured["model"], captured["optimizer"] = model, real_adamw(model, *args)
        return captured["optimizer"]

    monkeypatch.setattr(trainer, "adamw", recording_adamw)
    monkeypatch.setattr(trainer, "set_lr", lambda optimizer, lr: (lrs.append(lr), real_set_lr(optimizer, lr)))
    p = PretrainParams(variant="tiny", model=MODEL, epochs=1, batch_size=4, n_points=128, warmup_epochs=0,
                       schedule="step", lr=2e-5, query_lr_scale=query_lr_scale, monitor_shapes=0,
                       max_steps=1, device="cpu")
    train(p, write_synthetic_cache(tmp_path / "cache"), tmp_path / f"run-{query_lr_scale}", log=lambda *_: None)
    return captured["model"], captured["optimizer"], lrs[-1]


def test_query_side_is_exactly_the_distillation_side(tmp_path, monkeypatch):
    """With stop-grad, the parameters the trainer puts at ``query_lr_scale`` × lr are exactly those
    only the distillation losses train (the IMG/TXT tokens and positions, every block's query branch:
    its norms, cross attention and MLP, the two projections) plus the [CLS] token and position (the
    query branch's third query, which no default loss trains); nothing the reconstruction loss
    trains (mini-PointNet, positional MLP, patch branch, the shared final LayerNorm, the decoder)."""
    model, optimizer, lr = run_trainer(tmp_path, monkeypatch, 25.0)
    names = {id(p): n for n, p in model.named_parameters()}
    for fragment in QUERY_SIDE:                 # a renamed module leaves a fragment matching nothing
        assert any(fragment in n for n in names.values()), f"QUERY_SIDE fragment {fragment!r} matches no parameter"
    for group in optimizer.param_groups:        # the step's rate, times 25 on the query side
        assert group["lr_scale"] in (1.0, 25.0) and group["lr"] == pytest.approx(lr * group["lr_scale"], rel=1e-12)
    scaled = {names[id(p)] for g in optimizer.param_groups if g["lr_scale"] == 25.0 for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)

    distillation, reconstruction = trained_by(model, ("loss_img", "loss_text")), trained_by(model, ("loss_rec",))
    assert "encoder.norm.weight" in distillation & reconstruction        # shared: stays at the base lr
    assert scaled == (distillation - reconstruction) | {"encoder.cls_token", "encoder.cls_pos"}
    assert not scaled & reconstruction
    per_block = {"query_norm1", "query_attn", "query_norm2", "query_mlp"}
    for i in range(MODEL["depth"]):
        assert {n.split(".")[3] for n in scaled if n.startswith(f"encoder.blocks.{i}.")} == per_block
    assert {n for n in scaled if not n.startswith("encoder.blocks.")} == {
        *[f"encoder.{q}_{s}" for q in ("cls", "img", "text") for s in ("token", "pos")],
        "img_proj.weight", "img_proj.bias", "text_proj.weight", "text_proj.bias"}


def test_query_lr_scale_one_keeps_one_rate(tmp_path, monkeypatch):
    _, optimizer, lr = run_trainer(tmp_path, monkeypatch, 1.0)
    assert {(g["lr_scale"], g["lr"]) for g in optimizer.param_groups} == {(1.0, lr)}


def test_query_side_covers_k_image_queries():
    """ReCon++'s K image queries are the same two parameters, [1, K, C] (QUERY_SIDE's ``encoder.img_``), and
    with K = 4 queries matched to 4 views the parameters only distillation trains are still all on the
    query side (proj_norm none here: a BatchNorm over the K rows would not change the names)."""
    from recon.network.model import ReConConfig, ReConPretrain

    one, many = (ReConPretrain(ReConConfig(**{**MODEL, "proj_norm": "none"}, img_queries=k, img_match="hungarian"))
                 for k in (1, 4))
    assert [n for n, _ in one.named_parameters()] == [n for n, _ in many.named_parameters()]
    assert many.encoder.img_token.shape == many.encoder.img_pos.shape == (1, 4, 48)
    many.eval()
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(4, 128, 3, generator=gen) * 2 - 1
    views, text = torch.randn(4, 4, many.cfg.img_feat_dim, generator=gen), torch.randn(4, many.cfg.text_feat_dim)
    trained = {}
    for losses in (("loss_img", "loss_text"), ("loss_rec",)):
        many.zero_grad(set_to_none=True)
        out = many(points, views, text, mask=many.random_mask(4, "cpu", generator=torch.Generator().manual_seed(1)))
        sum(out[k] for k in losses).backward()
        trained[losses[0]] = {n for n, p in many.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    distillation_only = trained["loss_img"] - trained["loss_rec"]
    assert {"encoder.img_token", "encoder.img_pos"} <= distillation_only
    assert all(any(f in n for f in QUERY_SIDE) for n in distillation_only)
