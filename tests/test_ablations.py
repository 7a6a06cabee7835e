"""The paper's ablations as options: each study arm's overrides, the distillation metric an arm
chooses, unpaired teacher images, and the Table 9 baselines (vanilla multi-task, two-tower) as
networks whose parameters match a count by hand and whose probes and fine-tuning read the right
features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import write_synthetic_cache
from recon.downstream.study import ARMS, PRESETS, StudyParams, arm_params
from recon.network import losses as L
from recon.network.model import ReConClassifier, ReConConfig, ReConPretrain, head_input, svm_input
from recon.pretraining.data import PretrainDataset, image_partners, open_pretrain_stores
from recon.pretraining.trainer import PretrainParams, build_model, pretrain_optimizer

TINY = {"trans_dim": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "decoder_num_heads": 2, "num_group": 16,
        "group_size": 8}
#: the study's shared pretraining in these tests: the demo's choices that an arm may change
BASE = {"variant": "tiny", "model": TINY, "targets": ["rec", "img", "text"], "global_loss": "cosine",
        "target_norm": "store", "stop_grad": True, "epochs": 2, "batch_size": 8, "device": "cpu"}
#: arm -> the PretrainParams fields it must set (every other field stays the shared pretraining's)
EXPECTED = {
    "targets_rec": {"targets": ["rec"]},
    "targets_rec_img": {"targets": ["rec", "img"]},
    "targets_rec_text": {"targets": ["rec", "text"]},
    "targets_all": {"targets": ["rec", "img", "text"]},
    "targets_smc": {"targets": ["rec", "smc"]},
    "metric_smooth_l1": {"global_loss": "smooth_l1"},
    "metric_l2": {"global_loss": "l2"},
    "metric_cosine": {"global_loss": "cosine"},
    "metric_infonce": {"global_loss": "infonce"},
    "stopgrad_on": {"stop_grad": True},
    "stopgrad_off": {"stop_grad": False},
    "images_paired": {"image_pairing": "paired"},
    "images_unpaired": {"image_pairing": "unpaired"},
    "multitask": {"architecture": "multitask", "stop_grad": False},
    "two_tower": {"architecture": "two_tower", "stop_grad": False},
    "smc_only": {"targets": ["smc"], "architecture": "multitask", "stop_grad": False},
    "cmc_only": {"targets": ["img", "text"], "architecture": "multitask", "stop_grad": False},
    **{f"cmc_lr_{rate}": {"targets": ["img", "text"], "architecture": "multitask", "stop_grad": False,
                          "lr": float(rate), "query_lr_scale": 1.0} for rate in ("5e-5", "1e-4", "5e-4", "1e-3")},
}


def study(**pretrain) -> StudyParams:
    return StudyParams(pretrain={**BASE, **pretrain}, device="cpu")


# ----------------------------------------------------------------------------- arms


@pytest.mark.parametrize("arm", EXPECTED)
def test_an_ablation_arm_changes_its_factor_and_nothing_else(arm):
    base = dataclasses.asdict(PretrainParams(**{**BASE, "seed": 0}))
    got = dataclasses.asdict(arm_params(study(), arm))
    changed = {k: v for k, v in got.items() if v != base[k]}
    assert changed == {k: v for k, v in EXPECTED[arm].items() if v != base[k]}, arm
    for key, value in EXPECTED[arm].items():
        assert got[key] == value
    # ReCon's three losses are pinned by every arm that varies another factor of full ReCon
    if "targets" not in EXPECTED[arm]:
        assert got["targets"] == ["rec", "img", "text"]
    # and the network built for it carries the factor
    cfg = build_model(arm_params(study(), arm), 24, 20).cfg
    assert (cfg.architecture, cfg.global_loss, cfg.stop_grad, list(cfg.targets)) == \
        (got["architecture"], got["global_loss"], got["stop_grad"], got["targets"])


def test_every_preset_arm_exists_and_the_old_arms_keep_their_overrides():
    assert set(EXPECTED) <= set(ARMS)
    assert all(set(arms) <= set(ARMS) and arms[0] == "random_init" for arms in PRESETS.values())
    assert ARMS["rec_only"] == {"targets": ["rec"]} and ARMS["distill_only"] == {"targets": ["img", "text"]}
    assert ARMS["recon_std"]["target_norm"] == "store" and ARMS["recon_raw"]["target_norm"] == "none"


def test_metric_arms_choose_the_distillation_loss():
    """The same network and pair (its own projection, a target offset by 2 in every feature) under each
    metric arm: SmoothL1 (beta 1) is |d| - 0.5 = 1.5, L2 is d² = 4, and the cosine and InfoNCE losses
    are those of recon.network.losses on the same pair."""
    points, text = torch.randn(4, 128, 3), torch.randn(4, 20)
    losses = {}
    for arm in ("metric_smooth_l1", "metric_l2", "metric_cosine", "metric_infonce"):
        torch.manual_seed(0)
        model = build_model(arm_params(study(), arm), 24, 20).eval()
        mask = model.random_mask(4, "cpu", torch.Generator().manual_seed(0))
        with torch.no_grad():
            proj = model(points, mask=mask)["img_proj"]
            losses[arm] = float(model(points, proj + 2.0, text, mask=mask)["loss_img"])
    assert losses["metric_smooth_l1"] == pytest.approx(1.5, rel=1e-5)
    assert losses["metric_l2"] == pytest.approx(4.0, rel=1e-5)
    assert losses["metric_cosine"] == pytest.approx(float(L.cosine_loss(proj, proj + 2.0)), rel=1e-4)
    assert losses["metric_infonce"] == pytest.approx(float(L.infonce_loss(proj, proj + 2.0, 0.1)), rel=1e-4)



def test_the_table16_arms_train_the_whole_network_at_their_rate():
    """Table 16 sets one learning rate for the whole cross-modal contrastive network: every parameter
    group of the optimizer starts at the arm's rate, where the shared pretraining's split rates (the patch
    side at lr, the distillation side at query_lr_scale × lr) would give two."""
    shared = study(lr=2e-5, query_lr_scale=25)
    assert PRESETS["table16"] == ["random_init", "cmc_lr_5e-5", "cmc_lr_1e-4", "cmc_lr_5e-4", "cmc_lr_1e-3"]
    for arm, rate in (("cmc_lr_5e-5", 5e-5), ("cmc_lr_1e-4", 1e-4), ("cmc_lr_5e-4", 5e-4), ("cmc_lr_1e-3", 1e-3)):
        p = arm_params(shared, arm)
        optimizer = pretrain_optimizer(build_model(p, 24, 20), p)
        assert {group["lr"] for group in optimizer.param_groups} == {rate}, arm
    p = arm_params(shared, "cmc_only")   # the demo's split rates, for contrast
    rates = {group["lr"] for group in pretrain_optimizer(build_model(p, 24, 20), p).param_groups}
    assert sorted(rates) == pytest.approx([2e-5, 5e-4])


# ----------------------------------------------------------------------------- unpaired images


@pytest.fixture
def stores(tmp_path):
    return open_pretrain_stores(write_synthetic_cache(tmp_path / "cache", n_per_class=5, variants=3))


def test_unpaired_images_come_from_another_shape_of_the_same_category(stores):
    unpaired = PretrainDataset(stores, n_points=64, seed=3, image_pairing="unpaired")
    paired = PretrainDataset(stores, n_points=64, seed=3)
    items = np.arange(len(unpaired))
    categories = stores.category_index[stores.rows]
    assert np.bincount(categories).min() >= 2
    for epoch in range(3):
        rows = unpaired.image_rows(items, epoch)
        assert (rows != stores.rows).all()                               # never the shape's own
        assert (stores.category_index[rows] == categories).all()        # always its category
        assert sorted(rows) == sorted(stores.rows)                      # every image once per epoch
        batch, own = unpaired.batch(items, epoch), paired.batch(items, epoch)
        expected = []
        for i, row in zip(items, rows):
            _, _, view, variant, _ = unpaired.draws(int(i), epoch)
            expected.append(stores.image[row, view, variant].astype(np.float32))
            assert not np.array_equal(expected[-1], stores.image[stores.rows[i], view, variant].astype(np.float32))
        torch.testing.assert_close(batch["img"], torch.from_numpy(np.stack(expected)), rtol=0, atol=0)
        for key in ("points", "label", "text", "index"):                 # the rest of the item is its own
            assert torch.equal(batch[key], own[key]), key
    assert (unpaired.image_rows(items, 0) != unpaired.image_rows(items, 1)).any()   # differs between epochs
    again = PretrainDataset(stores, n_points=64, seed=3, image_pairing="unpaired")
    assert np.array_equal(again.image_rows(items, 1), unpaired.image_rows(items, 1))  # same (seed, epoch)
    assert np.array_equal(again.image_rows(items[::-1], 1), unpaired.image_rows(items, 1)[::-1])   # per item
    other = PretrainDataset(stores, n_points=64, seed=4, image_pairing="unpaired")
    assert not np.array_equal(other.image_rows(items, 1), unpaired.image_rows(items, 1))


def test_image_partners_keep_a_lone_shape_and_refuse_unknown_pairings(stores):
    categories = np.array([0, 0, 1, 2, 2, 2])
    partners = image_partners(categories, seed=0, epoch=0)
    assert partners[2] == 2 and all(partners[i] != i for i in (0, 1, 3, 4, 5))
    assert (categories[partners] == categories).all() and sorted(partners) == list(range(6))
    with pytest.raises(ValueError, match="image_pairing"):
        PretrainDataset(stores, image_pairing="shuffled")


# ----------------------------------------------------------------------------- Table 9 networks


def pointnet(C: int) -> int:
    """Mini-PointNet: Conv1d 3→128, BN, Conv1d 128→256, Conv1d 512→512, BN, Conv1d 512→C."""
    return (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * C + C)


def positional(C: int) -> int:
    return (3 * 128 + 128) + (128 * C + C)


def block(C: int, ratio: float = 4.0) -> int:
    """Two LayerNorms, qkv (no bias), proj, MLP C→hidden→C: one plain block, or one branch of a ReCon block
    (cross attention's q + kv is the same size as qkv)."""
    h = int(C * ratio)
    return 4 * C + 3 * C * C + (C * C + C) + (C * h + h) + (h * C + C)


def by_hand(cfg: ReConConfig) -> tuple[int, int]:
    """(encoder, pretraining network) parameters of ``cfg``, counted from the config alone."""
    C, depth, tokens, norm = cfg.trans_dim, cfg.depth, 6 * cfg.trans_dim, 2 * cfg.trans_dim
    tower = pointnet(C) + positional(C) + depth * block(C) + norm
    encoder = {"recon": tower + depth * block(C) + tokens,          # every block has a patch and a query branch
               "multitask": tower + tokens,
               "two_tower": 2 * tower + tokens}[cfg.architecture]
    S = cfg.group_size
    heads = C + (C * 3 * S + 3 * S) + (C * cfg.img_feat_dim + cfg.img_feat_dim) \
        + (C * cfg.text_feat_dim + cfg.text_feat_dim)                 # mask token, rebuild head, projections
    decoder = 0 if cfg.architecture == "multitask" else positional(C) + cfg.decoder_depth * block(C) + 2 * C
    return encoder, encoder + heads + decoder


#: the demo's student (params.yaml pretrain: tiny, 6 blocks, 32 groups, projection norms) and its teachers' widths
DEMO = PretrainParams(variant="tiny", model={"proj_norm": "batch", "num_group": 32, "depth": 6, "embed_masked": False})


@pytest.mark.parametrize("architecture", ["recon", "multitask", "two_tower"])
def test_parameter_counts_match_a_count_by_hand(architecture):
    model = build_model(dataclasses.replace(DEMO, architecture=architecture), 1280, 384)
    encoder, total = by_hand(model.cfg)
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder
    assert sum(p.numel() for p in model.parameters()) == total
    names = list(model.state_dict())
    assert any(n.startswith("decoder.blocks.") for n in names) == (architecture != "multitask")


def test_the_baselines_sizes_against_recon():
    cfg = build_model(DEMO, 1280, 384).cfg
    C, depth = cfg.trans_dim, cfg.depth
    recon, multitask, two_tower = (by_hand(cfg.replace(architecture=a))[0] for a in ("recon", "multitask", "two_tower"))
    assert recon - multitask == depth * block(C)                      # ReCon's query branches
    assert two_tower == 2 * multitask - 6 * C                         # two full towers, one set of queries
    assert two_tower - recon == pointnet(C) + positional(C) + 2 * C   # ≈ ReCon's encoder, plus a second embedding


def tiny(architecture: str, **kw) -> ReConConfig:
    return ReConConfig(**TINY, img_feat_dim=24, text_feat_dim=20, drop_path_rate=0.0, architecture=architecture, **kw)


@pytest.mark.parametrize("architecture", ["recon", "multitask", "two_tower"])
def test_fine_tuning_starts_from_the_probed_features(architecture):
    """A classifier loaded from a pretrained network (what the study's fine-tunes do) computes exactly
    the probes' features, of width 4 × feature_dim (two-tower: both streams)."""
    torch.manual_seed(0)
    pretrain = ReConPretrain(tiny(architecture)).eval()
    clf = ReConClassifier(pretrain.cfg, num_classes=3, head="linear")
    result = clf.load_state_dict({k: v for k, v in pretrain.state_dict().items() if k.startswith("encoder.")},
                                 strict=False)
    assert [k for k in result.missing_keys if k.startswith("encoder.")] == [] and result.unexpected_keys == []
    clf.eval()
    points = torch.randn(3, 128, 3)
    with torch.no_grad():
        tokens = pretrain.encode(points)
        torch.testing.assert_close(clf.features(points), head_input(tokens))
        assert clf(points).shape == (3, 3)
    width = 64 if architecture == "two_tower" else 32
    assert tokens.shape == (3, 3 + 16, width) and clf.head[0].in_features == 4 * width
    assert svm_input(tokens).shape == (3, 2 * width)


def test_two_tower_features_concatenate_both_streams():
    torch.manual_seed(0)
    model = ReConPretrain(tiny("two_tower")).eval()
    from recon.network.pointops import group_points
    neighborhood, center = group_points(torch.randn(2, 128, 3), 16, 8)
    with torch.no_grad():
        enc = model.encoder(neighborhood, center)
        contrast = model.encoder.query_tower.encode_sequence(neighborhood, center, None, model.encoder.queries(2))
        reconstruction = model.encoder.encode_sequence(neighborhood, center, None, None)
    rec = reconstruction["tokens"]
    assert torch.equal(enc["tokens"][..., :32], contrast["tokens"])        # the contrastive tower with the queries
    assert torch.equal(enc["tokens"][:, 3:, 32:], rec)                      # the reconstruction tower's patches
    assert torch.equal(enc["tokens"][:, :3, 32:], rec.mean(1, keepdim=True).expand(-1, 3, -1))
    img, _ = model.project(enc["tokens"])                                   # distillation: the contrastive queries
    torch.testing.assert_close(img, model.img_proj(contrast["tokens"][:, 1]))


def test_multitask_reconstructs_from_its_own_mask_rows_and_sees_the_whole_cloud_without_reconstruction():
    torch.manual_seed(0)
    model = ReConPretrain(tiny("multitask")).eval()
    points = torch.randn(2, 128, 3)
    with torch.no_grad():
        out = model(points, torch.randn(2, 24), torch.randn(2, 20))
    M = model.cfg.num_mask
    assert out["tokens"].shape == (2, 3 + (16 - M) + M, 32)                # queries, visible patches, mask tokens
    torch.testing.assert_close(out["rebuild_points"], model.rebuild_head(out["tokens"][:, -M:]).reshape(2 * M, 8, 3))
    assert not hasattr(model, "decoder") and out["loss_rec"] > 0
    contrastive = ReConPretrain(tiny("multitask", targets=("img", "text"))).eval()
    with torch.no_grad():
        out = contrastive(points, torch.randn(2, 24), torch.randn(2, 20))
    assert not out["mask"].any() and out["tokens"].shape == (2, 3 + 16, 32)


def test_the_baselines_refuse_what_reads_recon_blocks():
    from recon.downstream.partseg_net import ReConPartSeg
    from recon.network.model import record_attention

    with pytest.raises(ValueError, match="architecture"):
        ReConPartSeg(tiny("multitask"))
    with pytest.raises(ValueError, match="ReCon encoder"):
        with record_attention(ReConPretrain(tiny("two_tower")).encoder):
            pass
    with pytest.raises(ValueError, match="architecture"):
        tiny("three_tower")
