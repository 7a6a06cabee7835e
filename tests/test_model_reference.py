"""recon.network.model + recon.network.reference against the reference fixtures (outputs, losses, grads, keys)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import reference_dir
from recon.network.model import ReConClassifier, ReConConfig, ReConPretrain
from recon.network.reference import (
    init_classifier_from_pretrain,
    load_reference_checkpoint,
    load_reference_into,
    ours_to_reference,
    reference_name,
    reference_to_ours,
)

ATOL = 1e-5


def load_vector(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file
    d = reference_dir()
    return load_file(str(d / f"{name}.safetensors")), json.loads((d / f"{name}.json").read_text())


def state_of(vec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("state."):]: v for k, v in vec.items() if k.startswith("state.")}


def tiny_cfg(meta: dict, **kw) -> ReConConfig:
    c = meta["config"]
    return ReConConfig(trans_dim=c["trans_dim"], depth=c["depth"], num_heads=c["num_heads"],
                       decoder_depth=c.get("decoder_depth", 1),
                       decoder_num_heads=c.get("decoder_num_heads", c["num_heads"]),
                       num_group=c["num_group"], group_size=c["group_size"],
                       drop_path_rate=c["drop_path_rate"], **kw)


def assert_sets_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    """Rows [..., S, 3] equal as point sets (each point matched within atol, one-to-one)."""
    a, b = a.reshape(-1, a.shape[-2], 3), b.reshape(-1, b.shape[-2], 3)
    d = (a[:, :, None] - b[:, None]).abs().amax(-1)                     # [R,S,S] max-abs gaps
    close = d <= atol
    assert close.any(2).all() and close.any(1).all()
    assert (close.sum(2) == 1).all()                                    # one-to-one


@pytest.fixture(scope="module")
def pretrain():
    vec, meta = load_vector("pretrain_tiny_vector")
    model = ReConPretrain(tiny_cfg(meta)).eval()
    ours = reference_to_ours(state_of(vec), "pretrain")
    assert set(ours) == set(model.state_dict())                         # every param filled
    model.load_state_dict(ours, strict=True)
    return model, vec, meta


@pytest.fixture(scope="module")
def finetune():
    vec, meta = load_vector("finetune_tiny_vector")
    model = ReConClassifier(tiny_cfg(meta), num_classes=meta["config"]["cls_dim"], head="full").eval()
    ours = reference_to_ours(state_of(vec), "finetune")
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours, strict=True)
    return model, vec, meta


def run_pretrain(model, vec):
    return model(vec["input.points"], vec["input.img_teacher_feat"], vec["input.text_teacher_feat"],
                 mask=vec["input.mask"])


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_pretrain_outputs_match(pretrain, use_sdpa):
    model, vec, _ = pretrain
    for m in model.modules():
        if hasattr(m, "use_sdpa"):
            m.use_sdpa = use_sdpa
    with torch.no_grad():
        out = run_pretrain(model, vec)
    pairs = {"center": "center", "group_tokens": "group_tokens", "vis_pos": "vis_pos",
             "tokens": "enc_tokens_normed", "cls": "cls_query", "img": "img_query",
             "txt": "text_query", "dec_pos_vis": "dec_pos_vis", "dec_pos_mask": "dec_pos_mask",
             "decoder_out": "decoder_out", "rebuild_points": "rebuild_points",
             "img_proj": "img_proj", "text_proj": "text_proj", "loss_rec": "loss_rec",
             "loss_img": "loss_img", "loss_text": "loss_text", "loss": "loss_total"}
    for ours, ref in pairs.items():
        torch.testing.assert_close(out[ours], vec[f"out.{ref}"], rtol=0, atol=ATOL, msg=ours)
    for i, block in enumerate(out["block_outputs"]):
        torch.testing.assert_close(block, vec[f"out.enc_block_out.{i}"], rtol=0, atol=ATOL)
    assert len(out["block_outputs"]) == 2
    assert torch.equal(out["mask"], vec["input.mask"])
    assert_sets_close(out["neighborhood"], vec["out.neighborhood"])
    assert_sets_close(out["gt_points"], vec["out.gt_points"])
    covered = {k for k in vec if k.startswith("out.")} - {f"out.{r}" for r in pairs.values()}
    assert covered == {"out.neighborhood", "out.gt_points", "out.enc_block_out.0", "out.enc_block_out.1"}


def test_pretrain_losses_match_json(pretrain):
    model, vec, meta = pretrain
    with torch.no_grad():
        out = run_pretrain(model, vec)
    for ours, ref in (("loss_rec", "rec"), ("loss_img", "img"), ("loss_text", "text"), ("loss", "total")):
        assert out[ours].item() == pytest.approx(meta["losses"][ref], rel=1e-5, abs=1e-6)


def test_finetune_outputs_match(finetune):
    model, vec, _ = finetune
    with torch.no_grad():
        out = model.forward_tokens(vec["input.points"])
        logits = model(vec["input.points"])
    from recon.network.model import head_input
    from recon.network.pointops import farthest_point_sample, knn
    pts = vec["input.points"]
    torch.testing.assert_close(farthest_point_sample(pts, 16), vec["out.fps_idx"].long(), rtol=0, atol=0)
    torch.testing.assert_close(knn(out["center"], pts, 8), vec["out.knn_idx_sorted"], rtol=0, atol=0)
    torch.testing.assert_close(out["center"], vec["out.center"], rtol=0, atol=0)
    torch.testing.assert_close(out["neighborhood"], vec["out.neighborhood_sorted"], rtol=0, atol=ATOL)
    assert_sets_close(out["neighborhood"], vec["out.neighborhood"])
    for ours, ref in (("group_tokens", "group_tokens"), ("patch_pos", "patch_pos"),
                      ("tokens", "tokens_normed")):
        torch.testing.assert_close(out[ours], vec[f"out.{ref}"], rtol=0, atol=ATOL, msg=ours)
    for i, block in enumerate(out["block_outputs"]):
        torch.testing.assert_close(block, vec[f"out.block_out.{i}"], rtol=0, atol=ATOL)
    torch.testing.assert_close(head_input(out["tokens"]), vec["out.head_input"], rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, vec["out.logits"], rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("which", ["img_plus_text_loss", "reconstruction_loss", "total_loss"])
def test_gradient_norms_match(pretrain, which):
    model, vec, meta = pretrain
    norms = meta["grad_l2_norms"]
    expected = norms[which]
    model.zero_grad(set_to_none=True)
    out = run_pretrain(model, vec)
    loss = {"img": out["loss_img"] + out["loss_text"], "reconstruction": out["loss_rec"],
            "total": out["loss"]}[which.split("_")[0]]
    loss.backward()
    got = {reference_name(n): (p.grad.norm().item() if p.grad is not None else 0.0)
           for n, p in model.named_parameters()}
    assert set(got) == set(expected)
    for name, ref in expected.items():
        if ref == 0.0:
            assert got[name] == 0.0, name
        else:
            assert got[name] == pytest.approx(ref, rel=1e-4), name
    model.zero_grad(set_to_none=True)


def test_gradient_provenance_lists(pretrain):
    model, vec, meta = pretrain
    model.zero_grad(set_to_none=True)
    out = run_pretrain(model, vec)
    (out["loss_img"] + out["loss_text"]).backward()
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    ref_names = {reference_name(n) for n in nonzero}
    assert ref_names == set(meta["params_with_nonzero_grad_from_img_plus_text_loss"])
    model.zero_grad(set_to_none=True)
    run_pretrain(model, vec)["loss_rec"].backward()
    none = {n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    ref_names = {reference_name(n) for n in none}
    assert ref_names == set(meta["params_without_grad_from_reconstruction_loss"])
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- keys / checkpoints


def test_mapping_consumes_every_key_and_roundtrips(pretrain, finetune):
    for (model, vec, _), kind in ((pretrain, "pretrain"), (finetune, "finetune")):
        ref = state_of(vec)
        ours = reference_to_ours(ref, kind)
        assert len(ours) == len(ref) == len(model.state_dict())
        back = ours_to_reference(ours, kind)
        assert set(back) == set(ref)
        assert all(torch.equal(back[k], ref[k]) for k in ref)
        prefixed = reference_to_ours({f"module.{k}": v for k, v in ref.items()}, "auto")
        assert set(prefixed) == set(ours)


def test_unconsumed_keys_are_named():
    with pytest.raises(KeyError, match="MAE_encoder.bogus.weight"):
        reference_to_ours({"mask_token": torch.zeros(1, 1, 4), "MAE_encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="cls_head_finetune"):
        reference_to_ours({"cls_head_finetune.0.weight": torch.zeros(1)}, "pretrain")


def _base_models(num_classes: int = 40):
    with torch.device("meta"):
        cfg = ReConConfig.variant("base")
        return ReConPretrain(cfg), ReConClassifier(cfg, num_classes, head="full")


def test_base_key_lists_map_completely_with_shapes():
    d = reference_dir()
    pre_model, ft_model = _base_models()
    for fname, kind, model in (("keys_pretrain_base.json", "pretrain", pre_model),
                               ("keys_finetune_base.json", "finetune", ft_model)):
        entries = json.loads((d / fname).read_text())["state_dict"]
        ref = {k: torch.empty(shape, device="meta") for k, shape in entries}
        ours = reference_to_ours(ref, kind)
        ours_sd = model.state_dict()
        assert set(ours) == set(ours_sd), set(ours) ^ set(ours_sd)
        for k, v in ours.items():
            assert tuple(v.shape) == tuple(ours_sd[k].shape), k
    assert len(json.loads((d / "keys_pretrain_base.json").read_text())["state_dict"]) == 363


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_init_classifier_from_pretrain_matches_reference_lists():
    info = json.loads((reference_dir() / "keys_finetune_base.json").read_text())["init_from_pretrain"]
    pre, clf = _base_models()
    missing, ignored = init_classifier_from_pretrain(clf, pre.state_dict())
    exp_missing = [f"head.{k[len('cls_head_finetune.'):]}"
                   for k in info["missing_keys (kept at their fresh init)"]]
    exp_ignored = reference_to_ours(
        {k: torch.zeros(()) for k in info["unexpected_keys (ignored, pre-training only)"]}, "pretrain")
    assert sorted(missing) == sorted(exp_missing)
    assert sorted(ignored) == sorted(exp_ignored)
    loaded = set(pre.state_dict()) - set(ignored)
    assert len(loaded) == info["loaded_keys_count"] == len(set(clf.state_dict()) - set(missing)) - 2
    # the "- 2": the two head BN num_batches_tracked buffers are neither loaded nor reported


def test_init_classifier_copies_encoder_values():
    cfg = ReConConfig.variant("tiny", depth=1, decoder_depth=1)
    pre, clf = ReConPretrain(cfg), ReConClassifier(cfg, 10, head="linear")
    head_before = clf.head[0].weight.clone()
    init_classifier_from_pretrain(clf, {f"module.{k}": v for k, v in pre.state_dict().items()})
    clf_sd = clf.state_dict()
    for k, v in pre.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(clf_sd[k], v), k
    assert torch.equal(clf.head[0].weight, head_before)


def test_load_reference_checkpoint(tmp_path, finetune):
    model, vec, meta = finetune
    ref = state_of(vec)
    path = tmp_path / "ckpt.pth"
    torch.save({"base_model": {f"module.{k}": v for k, v in ref.items()}, "epoch": 3,
                "metrics": {"acc": 1.0}}, path)
    sd = load_reference_checkpoint(path)
    assert set(sd) == set(ref)
    fresh = ReConClassifier(tiny_cfg(meta), num_classes=meta["config"]["cls_dim"]).eval()
    load_reference_into(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(vec["input.points"]), vec["out.logits"], rtol=0, atol=ATOL)
