"""ReCon++ (docs/reconpp.md): K image queries matched to a shape's V cached views, the
reconstruction-only first stage, the encoder blocks from a timm ViT, and K through fine-tuning,
zero-shot, checkpoints and the ONNX export."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import write_synthetic_cache
from recon.downstream import weights as W
from recon.downstream.evaluate import load_pretrained
from recon.downstream.export import check_onnx, export_onnx
from recon.downstream.recipes import FinetuneParams
from recon.network import losses as L
from recon.network.model import ReConClassifier, ReConConfig, ReConPretrain, head_input, svm_input
from recon.network.reference import config_from_state_dict, init_from_vit
from recon.pretraining import trainer
from recon.pretraining.data import PretrainDataset, open_pretrain_stores
from recon.pretraining.trainer import PretrainParams, train
from recon.runtime import trainstate
from recon.runtime.optim import Schedule

TINY = dict(trans_dim=48, num_heads=3, decoder_num_heads=3, depth=2, decoder_depth=1, num_group=8, group_size=16)
DI, DT = 12, 8


def pretrain_model(k: int = 1, match: str = "hungarian", **kw) -> ReConPretrain:
    torch.manual_seed(0)
    return ReConPretrain(ReConConfig(**{**TINY, "img_feat_dim": DI, "text_feat_dim": DT, "img_queries": k,
                                        "img_match": match, **kw}))


def batch(b: int = 3, v: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 128, 3, generator=gen) * 2 - 1, torch.randn(b, v, DI, generator=gen),
            torch.randn(b, DT, generator=gen))


# ----------------------------------------------------------------------------- the matching


def brute_force(cost: torch.Tensor) -> tuple[float, set[tuple[int, int]]]:
    """Least total cost of a one-to-one matching of min(K, V) pairs in cost [K, V], over every choice."""
    k, v = cost.shape
    choices = ([tuple(zip(range(k), vs)) for vs in itertools.permutations(range(v), k)] if k <= v else
               [tuple(zip(qs, range(v))) for qs in itertools.permutations(range(k), v)])
    best = min(choices, key=lambda pairs: sum(float(cost[i, j]) for i, j in pairs))
    return sum(float(cost[i, j]) for i, j in best), set(best)


@pytest.mark.parametrize("k,v", [(4, 4), (3, 5), (5, 3), (1, 4), (2, 1)])
def test_hungarian_pairs_equal_a_brute_force_search(k, v):
    cost = torch.rand(6, k, v, generator=torch.Generator().manual_seed(10 * k + v), dtype=torch.float64)
    rows, cols = L.hungarian_pairs(cost)
    assert rows.shape == cols.shape == (6, min(k, v))
    for b in range(6):
        assert rows[b].tolist() == sorted(set(rows[b].tolist())) and len(set(cols[b].tolist())) == min(k, v)
        total, pairs = brute_force(cost[b])
        assert set(zip(rows[b].tolist(), cols[b].tolist())) == pairs
        assert float(cost[b, rows[b], cols[b]].sum()) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("kind", ["smooth_l1", "l2", "cosine"])
def test_matched_loss_is_the_mean_of_the_matched_pair_losses(kind):
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 3, 7, generator=gen) * 2, torch.randn(5, 4, 7, generator=gen) * 2
    cost = L.pair_losses(pred, target, kind)
    for b, i, j in ((0, 0, 0), (2, 1, 3), (4, 2, 1)):     # each entry is global_loss of that one pair
        assert float(cost[b, i, j]) == pytest.approx(float(L.global_loss(pred[b, i][None], target[b, j][None], kind)),
                                                      rel=1e-5)
    loss, (rows, cols) = L.matched_loss(pred, target, kind, "hungarian")
    b = torch.arange(5)[:, None]
    assert float(loss) == pytest.approx(float(cost[b, rows, cols].mean()), rel=1e-5)
    assert (cost[b, rows, cols].sum(1) <= cost[:, :, :3].diagonal(dim1=1, dim2=2).sum(1) + 1e-6).all()


def test_match_none_pairs_query_k_with_view_k_and_needs_as_many():
    pred, target = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    loss, (rows, cols) = L.matched_loss(pred, target, "l2", "none")
    assert rows.tolist() == cols.tolist() == [[0, 1, 2]] * 2
    assert float(loss) == pytest.approx(float(L.pair_losses(pred, target, "l2").diagonal(dim1=1, dim2=2).mean()))
    with pytest.raises(ValueError, match="K=3, V=4"):
        L.matched_loss(pred, torch.randn(2, 4, 7), "l2", "none")


def test_permuting_a_shapes_views_leaves_the_loss_unchanged():
    model = pretrain_model(k=4).eval()
    points, views, _ = batch(b=3, v=4)
    mask = model.random_mask(3, "cpu", generator=torch.Generator().manual_seed(2))
    perm = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    shuffled = views[torch.arange(3)[:, None], perm]
    a, b = model(points, views, mask=mask), model(points, shuffled, mask=mask)
    assert torch.equal(a["loss_img"], b["loss_img"])
    assert torch.equal(a["img_pairs"][0], b["img_pairs"][0])                     # the same queries...
    assert torch.equal(a["img_pairs"][1], torch.gather(perm, 1, b["img_pairs"][1]))  # ...meet the same views


@pytest.mark.parametrize("match", ["none", "hungarian"])
def test_one_query_reproduces_the_single_query_loss_and_gradients_exactly(match):
    """K = 1 with the view given as [B, 1, D] (the matching path) equals ReCon's [B, D] path bit for
    bit: losses and every gradient (train mode, the same drop-path draws)."""
    points, views, text = batch(b=4, v=1)
    mask = pretrain_model().random_mask(4, "cpu", generator=torch.Generator().manual_seed(3))
    runs = []
    for cfg_match, img in (("none", views[:, 0]), (match, views)):
        model = pretrain_model(k=1, match=cfg_match, drop_path_rate=0.1).train()
        torch.manual_seed(7)
        out = model(points, img, text, mask=mask)
        out["loss"].backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (single, g1), (matched, g2) = runs
    assert single["img_pairs"] is None and matched["img_pairs"] is not None
    for key in ("loss", "loss_img", "loss_rec", "loss_text", "img_proj"):
        assert torch.equal(single[key], matched[key]), key
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)


def test_gradients_reach_only_the_matched_queries():
    model = pretrain_model(k=4).eval()
    points, views, _ = batch(b=1, v=2)
    out = model(points, views, mask=model.random_mask(1, "cpu", generator=torch.Generator().manual_seed(0)))
    out["loss_img"].backward()
    matched = set(out["img_pairs"][0][0].tolist())
    assert len(matched) == 2
    for param in (model.encoder.img_token, model.encoder.img_pos):
        for k in range(4):
            assert (param.grad[0, k].abs().sum() > 0) == (k in matched), k


def test_queries_layout_features_and_zero_shot_with_k_queries():
    model = pretrain_model(k=3).eval()
    points, views, text = batch(b=2, v=3)
    out = model(points, views, text)
    assert out["tokens"].shape[1] == 5 + model.cfg.num_group - model.cfg.num_mask
    assert out["img_proj"].shape == (2, 3, DI) and out["img"].shape == (2, 3, 48) and out["text_proj"].shape == (2, DT)
    tokens = model.encode(points)                                           # [B, 5 + G, C]
    assert tokens.shape == (2, 5 + 8, 48)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:4].max(1).values, tokens[:, 4], tokens[:, 5:].max(1).values], -1)
    assert torch.equal(model.features(points), expected) and torch.equal(head_input(tokens, 3), expected)
    assert torch.equal(svm_input(tokens, 3)[:, :48], tokens[:, :5].max(1).values)
    img, txt = model.zero_shot_features(points)                            # the K projections' mean
    torch.testing.assert_close(img, model.project_queries(tokens)[0].mean(1))
    assert img.shape == (2, DI) and txt.shape == (2, DT)


@pytest.mark.parametrize("overrides,message", [
    (dict(img_queries=2, global_loss="infonce"), "per-pair loss"),
    (dict(img_match="hungarian", global_loss="infonce"), "per-pair loss"),
    (dict(img_queries=2, architecture="multitask"), "needs architecture recon"),
    (dict(img_queries=0), "img_queries must be >= 1"),
    (dict(img_match="greedy"), "unknown img_match")])
def test_configurations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ReConConfig(**TINY, **overrides)


# ----------------------------------------------------------------------------- data and trainer


def test_all_views_items_hold_every_view_in_a_drawn_variant(tmp_path):
    stores = open_pretrain_stores(write_synthetic_cache(tmp_path / "cache", views=3, variants=3))
    data = PretrainDataset(stores, n_points=64, seed=3, all_views=True)
    one = PretrainDataset(stores, n_points=64, seed=3)
    item = data[5]
    assert item["img"].shape == (3, 16) and one[5]["img"].shape == (16,)
    row = int(item["index"])
    for v in range(3):   # view v in one of the augmented variants 1..2 (never the clean 0)
        hits = [a for a in range(3) if np.array_equal(stores.image[row, v, a].astype(np.float32), item["img"][v].numpy())]
        assert hits and hits[0] in (1, 2)
    torch.testing.assert_close(data[5]["img"], item["img"], rtol=0, atol=0)      # seeded by (seed, epoch, index)
    torch.testing.assert_close(one[5]["points"], item["points"], rtol=0, atol=0)  # the same subset and rotation
    rows = data.batch([5, 2, 7])
    assert rows["img"].shape == (3, 3, 16) and torch.equal(rows["img"][0], item["img"])
    drawn = {tuple(data.draws(i, e)[3].tolist()) for i in range(12) for e in range(4)}
    assert len(drawn) > 1                                                       # the variants vary per view


def tiny(**overrides) -> PretrainParams:
    values = dict(variant="tiny", model=TINY, epochs=2, batch_size=4, n_points=128, warmup_epochs=1,
                  schedule="step", device="cpu", keep_last=10, monitor_shapes=0)
    values.update(overrides)
    return PretrainParams(**values)


def test_trainer_with_k_queries_saves_k_and_fine_tuning_zero_shot_load_it(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", views=3)
    p = tiny(model={**TINY, "img_queries": 3}, match="hungarian", epochs=1)
    result = train(p, cache, tmp_path / "run", log=lambda *_: None)
    assert result["history"][0]["loss_img"] > 0
    path = trainstate.latest(tmp_path / "run" / "checkpoints")
    state = trainstate.load(path)
    assert state["config"]["img_queries"] == 3 and state["config"]["img_match"] == "hungarian"
    assert config_from_state_dict(state["model"])["img_queries"] == 3        # also from the weights alone
    loaded = load_pretrained(path)
    x = torch.rand(2, 128, 3)
    torch.testing.assert_close(loaded.zero_shot_features(x), result["model"].eval().zero_shot_features(x))
    init = W.load_init(str(path))
    classifier = W.build_classifier(FinetuneParams(init=str(path), model={}, num_group=8, group_size=16), 3, init)
    assert classifier.cfg.img_queries == 3 and classifier.encoder.img_token.shape == (1, 3, 48)
    assert torch.equal(classifier.encoder.img_token, state["model"]["encoder.img_token"])
    assert classifier(x).shape == (2, 3)
    with pytest.raises(ValueError, match="4 image queries and the store 3 views"):
        train(tiny(model={**TINY, "img_queries": 4}), cache, tmp_path / "bad", log=lambda *_: None)


def test_onnx_export_with_k_image_queries(tmp_path):
    torch.manual_seed(0)
    model = ReConClassifier(ReConConfig(**TINY, img_queries=3), 5).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 128, 3))
    model.eval()
    path = export_onnx(model, tmp_path / "k3.onnx", n_points=128)
    rng = np.random.default_rng(1)
    for b, n in ((2, 128), (3, 200)):
        assert check_onnx(path, model, rng.normal(size=(b, n, 3)).astype(np.float32)) <= 1e-4


def staged_run(cache, out, **overrides):
    return train(tiny(rec_epochs=2, epochs=2, **overrides), cache, out, log=lambda *_: None)


def test_reconstruction_stage_then_full_objective_each_with_its_schedule(tmp_path, monkeypatch):
    cache = write_synthetic_cache(tmp_path / "cache")
    lrs, optimizers = [], []
    real_set_lr, real_adamw = trainer.set_lr, trainer.adamw
    monkeypatch.setattr(trainer, "set_lr", lambda opt, lr: (lrs.append(lr), real_set_lr(opt, lr)))
    monkeypatch.setattr(trainer, "adamw", lambda *a: optimizers.append(real_adamw(*a)) or optimizers[-1])
    result = staged_run(cache, tmp_path / "run")
    history = result["history"]
    assert [r["stage"] for r in history] == ["rec", "rec", "full", "full"]
    assert all(r["loss_img"] == 0 and r["loss_text"] == 0 and r["loss_rec"] > 0 for r in history[:2])
    assert all(r["loss_img"] > 0 and r["loss_text"] > 0 for r in history[2:])
    per_epoch = 3                                   # 12 shapes, batch 4
    stage = Schedule("step", 2, 1, per_epoch, 5e-4)  # each stage: 2 epochs, 1 warm-up epoch, from its own step 0
    assert lrs == pytest.approx([stage.lr(s) for s in range(2 * per_epoch)] * 2, rel=1e-12)
    assert len(optimizers) == 2                     # fresh AdamW moments at the boundary: 6 steps each
    assert {float(s["step"]) for opt in optimizers for s in opt.state.values()} == {6.0}
    names = {id(p): n for n, p in result["model"].named_parameters()}
    untouched = {names[id(p)] for g in optimizers[0].param_groups for p in g["params"] if p not in optimizers[0].state}
    assert untouched == {n for n in names.values() if any(f in n for f in trainer.QUERY_SIDE)}   # no step in stage 1
    torch.manual_seed(0)                            # the run's initial weights (seed 0)
    init = trainer.build_model(tiny(), 16, 8).state_dict()
    after_stage_1 = trainstate.load(tmp_path / "run" / "checkpoints" / "epoch-0001.pt")["model"]
    for name in untouched:                          # the distillation side enters stage 2 as initialised
        assert torch.equal(after_stage_1[name], init[name]), name
    assert not torch.equal(after_stage_1["encoder.blocks.0.patch_attn.qkv.weight"],
                           init["encoder.blocks.0.patch_attn.qkv.weight"])


@pytest.mark.parametrize("killed_after", [1, 2, 3], ids=["in-stage-1", "at-the-boundary", "in-stage-2"])
def test_a_killed_staged_run_resumes_in_its_stage_exactly(tmp_path, killed_after):
    cache = write_synthetic_cache(tmp_path / "cache")
    straight = staged_run(cache, tmp_path / "a")
    first = staged_run(cache, tmp_path / "b", max_steps=3 * killed_after)
    assert len(first["history"]) == killed_after
    resumed = staged_run(cache, tmp_path / "b")
    assert [r["stage"] for r in resumed["history"]] == ["rec", "rec", "full", "full"]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"]]
    assert [r["lr"] for r in resumed["history"]] == [r["lr"] for r in straight["history"]]
    for (name, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_reconstruction_stage_needs_the_reconstruction_target(tmp_path):
    with pytest.raises(ValueError, match="needs rec_epochs >= 0 and 'rec' in targets"):
        train(tiny(rec_epochs=1, targets=["img", "text"]), write_synthetic_cache(tmp_path / "c"), tmp_path / "r",
              log=lambda *_: None)


# ----------------------------------------------------------------------------- ViT initialisation


def timm_vit(path, embed_dim: int = 48, depth: int = 2, heads: int = 3, **kw):
    import timm

    torch.manual_seed(4)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=embed_dim, depth=depth,
                            num_heads=heads, num_classes=0, **kw)
    torch.save(vit.state_dict(), path)
    return vit.state_dict()


def test_init_from_a_timm_vit_copies_its_blocks_into_both_branches(tmp_path):
    vit = timm_vit(tmp_path / "vit.pt")
    model = pretrain_model(k=2, qkv_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = init_from_vit(model, tmp_path / "vit.pt")
    ours = model.state_dict()
    C = 48
    for i in range(2):
        src, dst = f"blocks.{i}.", f"encoder.blocks.{i}."
        for p in ("weight", "bias"):
            for theirs, mine in (("norm1", "patch_norm1"), ("norm1", "query_norm1"), ("norm2", "patch_norm2"),
                                 ("norm2", "query_norm2"), ("attn.qkv", "patch_attn.qkv"),
                                 ("attn.proj", "patch_attn.proj"), ("attn.proj", "query_attn.proj"),
                                 ("mlp.fc1", "patch_mlp.fc1"), ("mlp.fc1", "query_mlp.fc1"),
                                 ("mlp.fc2", "patch_mlp.fc2"), ("mlp.fc2", "query_mlp.fc2")):
                assert torch.equal(ours[f"{dst}{mine}.{p}"], vit[f"{src}{theirs}.{p}"]), (i, mine, p)
            assert torch.equal(ours[f"{dst}query_attn.q.{p}"], vit[f"{src}attn.qkv.{p}"][:C])
            assert torch.equal(ours[f"{dst}query_attn.kv.{p}"], vit[f"{src}attn.qkv.{p}"][C:])
    assert set(names) == {k for k in ours if k.startswith("encoder.blocks.")}   # every block parameter
    assert all(torch.equal(before[k], ours[k]) for k in ours if k not in names)   # nothing else moves


@pytest.mark.parametrize("vit_kw,model_kw,message", [
    (dict(depth=3), dict(qkv_bias=True), "the ViT has 3 blocks, the encoder 2"),
    (dict(embed_dim=96), dict(qkv_bias=True), "the ViT is 96 wide, the encoder 48"),
    (dict(), dict(qkv_bias=False), "set model.qkv_bias: true"),
    (dict(init_values=1e-5), dict(qkv_bias=True), "LayerScale"),
    (dict(mlp_ratio=2.0), dict(qkv_bias=True), "set model.mlp_ratio: 2")])
def test_a_vit_that_does_not_fit_is_a_clear_error(tmp_path, vit_kw, model_kw, message):
    timm_vit(tmp_path / "vit.pt", **vit_kw)
    with pytest.raises(ValueError, match=message):
        init_from_vit(pretrain_model(**model_kw), tmp_path / "vit.pt")


def test_the_trainer_starts_from_the_vit_and_records_the_file(tmp_path):
    vit = timm_vit(tmp_path / "vit.pt")
    cache = write_synthetic_cache(tmp_path / "cache")
    p = tiny(model={**TINY, "qkv_bias": True}, init_vit=str(tmp_path / "vit.pt"), epochs=1, max_steps=1,
             lr=1e-9, warmup_lr=1e-9, min_lr=1e-9)
    result = train(p, cache, tmp_path / "run", log=lambda *_: None)
    ours = result["model"].state_dict()
    torch.testing.assert_close(ours["encoder.blocks.1.query_attn.kv.weight"], vit["blocks.1.attn.qkv.weight"][48:],
                               rtol=0, atol=1e-7)
    run = trainstate.load(trainstate.latest(tmp_path / "run" / "checkpoints"))["run"]
    assert len(run["init_vit_sha256"]) == 64
