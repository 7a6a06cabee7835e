"""Stop-gradient semantics of the ReCon block: which parameters each loss reaches."""
from __future__ import annotations

import pytest
import torch

from recon.network.model import ReConConfig, ReConPretrain

QUERY_PARAMS = ("encoder.img_token", "encoder.text_token", "encoder.img_pos", "encoder.text_pos")


def small_cfg(**kw) -> ReConConfig:
    base = dict(trans_dim=32, depth=2, num_heads=2, decoder_depth=1, decoder_num_heads=2,
                num_group=16, group_size=8, drop_path_rate=0.0, img_feat_dim=24, text_feat_dim=20)
    return ReConConfig(**{**base, **kw})


def grads_after(loss_keys: tuple[str, ...], stop_grad: bool) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    model = ReConPretrain(small_cfg(stop_grad=stop_grad)).train()
    pts = torch.randn(4, 128, 3)
    out = model(pts, torch.randn(4, 24), torch.randn(4, 20))
    sum(out[k] for k in loss_keys).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def is_patch_side(name: str) -> bool:
    """Patch branch, mini-PointNet, encoder pos_embed, decoder side and [CLS]."""
    return (".patch_" in name or name.startswith(("encoder.patch_embed.", "encoder.pos_embed.",
            "decoder.", "decoder_pos_embed.", "rebuild_head.", "mask_token", "encoder.cls_")))


def is_query_side(name: str) -> bool:
    return (".query_" in name or name in QUERY_PARAMS or name.startswith(("img_proj.", "text_proj.")))


@pytest.fixture(scope="module")
def global_grads_stop():
    return grads_after(("loss_img", "loss_text"), stop_grad=True)


def test_global_losses_do_not_reach_patch_side(global_grads_stop):
    patch = [n for n in global_grads_stop if is_patch_side(n)]
    assert len(patch) > 30
    leaked = [n for n in patch if nonzero(global_grads_stop[n])]
    assert leaked == []


def test_global_losses_reach_query_side(global_grads_stop):
    query = [n for n in global_grads_stop if is_query_side(n)]
    assert len(query) == 2 * 12 + 4 + 4          # 12 query-branch tensors per block
    dead = [n for n in query if not nonzero(global_grads_stop[n])]
    assert dead == []
    assert nonzero(global_grads_stop["encoder.norm.weight"])
    unclassified = [n for n in global_grads_stop
                    if not (is_patch_side(n) or is_query_side(n) or n.startswith("encoder.norm."))]
    assert unclassified == []                    # the two groups above cover every parameter


def test_without_stop_grad_global_losses_reach_patch_branch():
    grads = grads_after(("loss_img", "loss_text"), stop_grad=False)
    for name in ("encoder.blocks.0.patch_attn.qkv.weight", "encoder.blocks.0.patch_mlp.fc2.weight",
                 "encoder.blocks.1.patch_norm1.weight", "encoder.patch_embed.conv1.weight",
                 "encoder.pos_embed.fc1.weight"):
        assert nonzero(grads[name]), name
    # the last block's patch MLP/norm2 output feeds nothing the queries read
    assert not nonzero(grads["encoder.blocks.1.patch_mlp.fc2.weight"])
    # decoder side still untouched
    assert not any(nonzero(g) for n, g in grads.items() if n.startswith(("decoder.", "rebuild_head.")))


def test_reconstruction_loss_does_not_reach_query_side():
    grads = grads_after(("loss_rec",), stop_grad=True)
    assert not any(nonzero(g) for n, g in grads.items() if is_query_side(n))
    for name in ("encoder.blocks.1.patch_mlp.fc2.weight", "encoder.patch_embed.conv4.weight",
                 "decoder.blocks.0.attn.qkv.weight", "rebuild_head.weight", "mask_token",
                 "decoder_pos_embed.fc2.weight", "encoder.norm.weight"):
        assert nonzero(grads[name]), name


def test_stop_grad_leaves_forward_unchanged():
    torch.manual_seed(1)
    model = ReConPretrain(small_cfg()).eval()
    pts, mask = torch.randn(2, 128, 3), model.random_mask(2, "cpu")
    with torch.no_grad():
        a = model(pts, torch.randn(2, 24), torch.randn(2, 20), mask=mask)
        model.cfg = model.cfg.replace(stop_grad=False)
        b = model(pts, torch.randn(2, 24), torch.randn(2, 20), mask=mask)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["loss_rec"], b["loss_rec"])


def test_detach_changes_only_what_reaches_the_patch_side(global_grads_stop):
    """The detach is on the keys/values the queries read, nothing else: with and without it the
    query-side gradients of the distillation losses are the same numbers, while the patch side gets
    exactly zero with it and a non-zero gradient without it."""
    free = grads_after(("loss_img", "loss_text"), stop_grad=False)
    for name, grad in global_grads_stop.items():
        if is_query_side(name) or name.startswith("encoder.norm."):
            torch.testing.assert_close(grad, free[name], rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert grad is None or torch.count_nonzero(grad) == 0, name
    reached = [n for n in free if is_patch_side(n) and nonzero(free[n])]
    assert "encoder.patch_embed.conv1.weight" in reached and len(reached) > 20


# ----------------------------------------------------------------------------- the ablation arms


def grads_of(model: ReConPretrain, loss_keys: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    model.train()
    out = model(torch.randn(4, 128, 3), torch.randn(4, 24), torch.randn(4, 20))
    sum(out[k] for k in loss_keys).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arm, reaches", [("stopgrad_on", False), ("stopgrad_off", True)])
def test_stopgrad_arms_decide_whether_distillation_reaches_the_patch_side(arm, reaches):
    """The study's Table 6 arms, as the trainer builds them: with stop-gradient off the distillation
    losses train the patch side (embedding, patch branches); on, not one of its numbers moves."""
    from recon.downstream.study import StudyParams, arm_params
    from recon.pretraining.trainer import build_model

    model_cfg = {k: getattr(small_cfg(), k) for k in ("trans_dim", "depth", "num_heads", "decoder_depth",
                                                        "decoder_num_heads", "num_group", "group_size")}
    p = arm_params(StudyParams(pretrain={"model": model_cfg, "drop_path": 0.0}), arm)
    torch.manual_seed(0)
    grads = grads_of(build_model(p, 24, 20), ("loss_img", "loss_text"))
    for name in ("encoder.patch_embed.conv1.weight", "encoder.blocks.0.patch_attn.qkv.weight",
                 "encoder.pos_embed.fc1.weight"):
        assert nonzero(grads[name]) == reaches, name
    assert any(nonzero(g) for n, g in grads.items() if is_patch_side(n)) == reaches


def test_multitask_has_no_stop_gradient():
    """One plain Transformer: the distillation losses reach every block and the patch embedding, and
    the reconstruction loss reaches the query tokens (the patches attend to them)."""
    torch.manual_seed(0)
    model = ReConPretrain(small_cfg(architecture="multitask"))
    distill = grads_of(model, ("loss_img", "loss_text"))
    for name in ("encoder.patch_embed.conv1.weight", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.blocks.1.mlp.fc2.weight", "encoder.pos_embed.fc1.weight"):
        assert nonzero(distill[name]), name
    assert not nonzero(distill["rebuild_head.weight"])
    model.zero_grad()
    rec = grads_of(model, ("loss_rec",))
    for name in ("encoder.img_token", "encoder.text_pos", "mask_token", "rebuild_head.weight"):
        assert nonzero(rec[name]), name
    assert not any(n.startswith("decoder") for n in rec)                  # no encoder-decoder split


def test_two_tower_losses_stay_in_their_towers():
    """Two separate networks: the distillation losses train the contrastive tower and the queries only,
    the reconstruction loss the reconstruction tower and its decoder only."""
    torch.manual_seed(0)
    model = ReConPretrain(small_cfg(architecture="two_tower"))
    def contrast(name: str) -> bool:
        return name.startswith(("encoder.query_tower.", "encoder.cls_", "encoder.img_", "encoder.text_", "img_proj.",
                                "text_proj."))

    distill = grads_of(model, ("loss_img", "loss_text"))
    assert all(not nonzero(g) for n, g in distill.items() if not contrast(n))
    for name in ("encoder.query_tower.patch_embed.conv1.weight", "encoder.query_tower.blocks.0.attn.qkv.weight",
                 "encoder.img_token", "img_proj.weight"):
        assert nonzero(distill[name]), name
    model.zero_grad()
    rec = grads_of(model, ("loss_rec",))
    assert all(not nonzero(g) for n, g in rec.items() if contrast(n))
    for name in ("encoder.patch_embed.conv1.weight", "encoder.blocks.1.mlp.fc2.weight",
                 "decoder.blocks.0.attn.qkv.weight", "rebuild_head.weight", "mask_token"):
        assert nonzero(rec[name]), name
