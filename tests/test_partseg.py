"""The part-segmentation network: its parameter count against one derived by hand from the
reference's layer shapes, the base model's head widths, parameter figures and feature blocks against
the reference constructor's, its forward against the reference's computation written out literally,
its key names against the reference's, checkpoint loading, and the ONNX export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import reference_dir
from recon.downstream.export import check_partseg_onnx, export_partseg_onnx
from recon.downstream.partseg_net import PartSegConfig, ReConPartSeg, load_encoder, reference_encoder_config
from recon.network.model import ReConConfig, ReConPretrain
from recon.network.pointops import group_points
from recon.network.reference import detect_kind, ours_to_reference, reference_to_ours


def reference_param_count(C: int, depth: int = 12, fetched: int = 3, parts: int = 50,
                          categories: int = 16) -> int:
    """Trainable parameters of the reference ``get_model`` (segmentation/models/pt.py) with width C,
    counted layer by layer from its constructor (weights + biases; BN/LN weight + bias)."""
    conv = lambda i, o, bias=True: i * o + (o if bias else 0)   # Conv1d(k=1) / Linear
    norm = lambda c: 2 * c                                       # BatchNorm1d / LayerNorm
    # Encoder (mini-PointNet): first_conv = Conv1d(3,128) BN(128) ReLU Conv1d(128,256);
    # second_conv = Conv1d(512,512) BN(512) ReLU Conv1d(512,C)
    patch = conv(3, 128) + norm(128) + conv(128, 256) + conv(512, 512) + norm(512) + conv(512, C)
    pos = conv(3, 128) + conv(128, C)                            # pos_embed: Linear(3,128) GELU Linear(128,C)
    tokens = 6 * C                                               # cls/img/text token + pos, each [1,1,C]
    # Block: norm1, norm2, norm1_contrast, norm2_contrast; attn.qkv (no bias) + attn.proj;
    # mlp fc1 C->4C, fc2 4C->C; attn_contrast q, kv (no bias) + proj; mlp_contrast as mlp
    mlp = conv(C, 4 * C) + conv(4 * C, C)
    block = (4 * norm(C) + conv(C, 3 * C, bias=False) + conv(C, C) + mlp
             + conv(C, C, bias=False) + conv(C, 2 * C, bias=False) + conv(C, C) + mlp)
    final_norm = norm(C)
    # label_conv = Conv1d(16, 64, bias=False) BN(64) LeakyReLU
    label = conv(categories, 64, bias=False) + norm(64)
    # propagation_0 = PointNetFeaturePropagation(in_channel=1152 + 3, mlp=[4C, 1024]): xyz + 3C interpolated
    prop = conv(fetched * C + 3, 4 * C) + norm(4 * C) + conv(4 * C, 1024) + norm(1024)
    # convs1 = Conv1d(3776, 512): 1024 propagated + 2*3C (max, mean) + C (queries) + 64 (label)
    head_in = 1024 + 2 * fetched * C + C + 64
    head = conv(head_in, 512) + norm(512) + conv(512, 256) + norm(256) + conv(256, parts)
    return patch + pos + tokens + depth * block + final_norm + label + prop + head


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def base_model() -> ReConPartSeg:
    """The reference configuration (base, 128 groups of 32, 50 parts, 16 categories); not modified."""
    return ReConPartSeg(reference_encoder_config("base"))


def test_base_model_has_the_reference_head_and_feature_path():
    """The base model at the reference settings against the figures hard-coded in the reference
    constructor (C = 384): ``propagation_0`` reads 1152 + 3 channels, ``convs1`` 3776; the layers the
    segmentation model adds hold 1,152 + 3,354,624 + 2,079,538 parameters; the per-group features are
    the final-LayerNorm'd patch rows of blocks 4, 8 and 12; 2,048 points in, 50 part logits per point."""
    with torch.random.fork_rng():        # its own seeded model and input, in eval mode: the global RNG and
        torch.manual_seed(0)             # the module's fixture stay as they were
        model, C = ReConPartSeg(reference_encoder_config("base")).eval(), 384
        points, category = torch.rand(2, 2048, 3) * 2 - 1, torch.tensor([0, 15])
    assert (model.cfg.trans_dim, model.cfg.depth, model.cfg.num_group, model.cfg.group_size) == (C, 12, 128, 32)
    assert model.seg.feature_blocks == (3, 7, 11)
    label, (prop0, prop1), head = model.label_embed[0], model.propagation.convs, model.head
    assert (label.in_channels, label.out_channels, label.bias) == (16, 64, None)
    assert [(c.in_channels, c.out_channels) for c in (prop0, prop1)] == [(1152 + 3, 1536), (1536, 1024)]
    assert [(c.in_channels, c.out_channels) for c in (head.conv1, head.conv2, head.conv3)] == [
        (3776, 512), (512, 256), (256, 50)]
    # label_conv: Conv1d(16, 64, no bias) + BN(64); propagation_0: Conv1d(1155, 1536) + BN(1536) +
    # Conv1d(1536, 1024) + BN(1024); convs1 (3776 → 512) + bns1 + convs2 (→ 256) + bns2 + convs3 (→ 50)
    assert [trainable(m) for m in (model.label_embed, model.propagation, model.head)] == [1_152, 3_354_624, 2_079_538]
    assert trainable(model) - trainable(model.encoder) == 1_152 + 3_354_624 + 2_079_538

    seen = {}
    hooks = [model.propagation.register_forward_hook(lambda m, args, out: seen.update(groups=args[3], points=out)),
             model.head.register_forward_hook(lambda m, args, out: seen.update(shape=args[1]))]
    try:
        with torch.no_grad():
            logits = model(points, category)
            neighborhood, center = group_points(points, 128, 32)
            blocks = model.encoder(neighborhood, center, None)["block_outputs"]
    finally:
        for hook in hooks:
            hook.remove()
    assert logits.shape == (2, 2048, 50)
    expected = torch.cat([model.encoder.norm(blocks[i][:, 3:]) for i in (3, 7, 11)], dim=-1)   # [B, 128, 3C]
    assert seen["groups"].shape == (2, 128, 3 * C)
    torch.testing.assert_close(seen["groups"], expected)
    assert seen["points"].shape == (2, 2048, 1024)
    assert seen["shape"].shape == (2, 3776 - 1024)                     # max + mean (2 × 3C), queries C, label 64
    torch.testing.assert_close(seen["shape"][:, :3 * C], expected.max(dim=1).values)
    torch.testing.assert_close(seen["shape"][:, 3 * C:6 * C], expected.mean(dim=1))


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_parameter_count_equals_the_reference(variant, base_model):
    model = base_model if variant == "base" else ReConPartSeg(reference_encoder_config(variant))
    assert trainable(model) == reference_param_count(model.cfg.trans_dim)


def test_parameter_count_follows_the_settings():
    cfg = reference_encoder_config("tiny", trans_dim=96, depth=4, num_heads=3)
    model = ReConPartSeg(cfg, PartSegConfig(num_parts=7, num_categories=3, feature_blocks=(1, 3)))
    assert trainable(model) == reference_param_count(96, depth=4, fetched=2, parts=7, categories=3)


# ----------------------------------------------------------------------------- forward


def tiny_model(seed: int = 0) -> ReConPartSeg:
    """A tiny segmentation model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    cfg = reference_encoder_config("tiny", trans_dim=48, depth=3, num_heads=3, num_group=16, group_size=8)
    model = ReConPartSeg(cfg, PartSegConfig(num_parts=6, num_categories=3, feature_blocks=(0, 1, 2),
                                            propagation_dims=(64, 32), head_dims=(32, 16))).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 256, 3), torch.tensor([0, 1, 2, 1]))
    return model.eval()


def reference_form(model: ReConPartSeg, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    """The reference's forward written out as it computes it, channels first: the shape feature
    repeated at every point and concatenated, a full sort of distances for the 3 nearest centres,
    a gather of their features, kernel-1 convolutions over [B, C, N]."""
    B, N, _ = points.shape
    neighborhood, center = group_points(points, model.cfg.num_group, model.cfg.group_size)
    blocks = model.encoder(neighborhood, center, None)["block_outputs"]
    x = torch.cat([model.encoder.norm(blocks[i][:, 3:]).transpose(1, 2) for i in model.seg.feature_blocks], 1)
    queries = blocks[-1][:, :3].max(1).values
    one_hot = torch.eye(model.seg.num_categories)[category].view(B, -1, 1)
    shape = torch.cat([x.max(2).values.unsqueeze(-1).repeat(1, 1, N), x.mean(2).unsqueeze(-1).repeat(1, 1, N),
                       queries.unsqueeze(2).repeat(1, 1, N), model.label_embed(one_hot).repeat(1, 1, N)], 1)
    d = ((points[:, :, None, :] - center[:, None, :, :]) ** 2).sum(-1)
    d, idx = d.sort(dim=-1)
    d, idx = d[:, :, :3], idx[:, :, :3]
    w = (1.0 / (d + 1e-8)) / (1.0 / (d + 1e-8)).sum(-1, keepdim=True)
    near = x.transpose(1, 2)[torch.arange(B)[:, None, None], idx]                # [B,N,3,3C]
    h = torch.cat([points, (near * w[..., None]).sum(2)], -1).transpose(1, 2)
    for conv, bn in zip(model.propagation.convs, model.propagation.bns):
        h = F.relu(bn(conv(h)))
    head = model.head
    h = F.relu(head.bn1(head.conv1(torch.cat([h, shape], 1))))
    h = F.relu(head.bn2(head.conv2(h)))
    return head.conv3(h).transpose(1, 2)


def test_forward_equals_the_reference_computation():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(3, 200, 3, generator=gen)
    category = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ours, ref = model(points, category), reference_form(model, points, category)
        other = model(points, torch.tensor([0, 0, 1]))
    assert ours.shape == (3, 200, 6)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[0], other[0], atol=1e-4)      # the category reaches the logits
    torch.testing.assert_close(ours[1:], other[1:])


def test_every_parameter_gets_a_gradient():
    model = tiny_model().train()
    model(torch.randn(2, 128, 3), torch.tensor([0, 2])).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_initialisation_as_the_reference(base_model):
    model = base_model
    enc = model.encoder
    assert all(getattr(enc, f"{q}_token").abs().sum() == 0 for q in ("cls", "img", "text"))
    assert all(0.8 < getattr(enc, f"{q}_pos").std().item() < 1.2 for q in ("cls", "img", "text"))  # N(0, 1)
    for conv in (model.head.conv1, model.propagation.convs[0], enc.blocks[0].patch_attn.qkv):
        bound = 1 / math.sqrt(conv.weight[0].numel())             # PyTorch default: U(-1/sqrt(fan_in), ..)
        # the draw is float32: its largest value may be float32(bound), a hair above the float64 bound
        assert 0.95 * bound < conv.weight.abs().max().item() <= bound * (1 + 1e-6)


def test_lr_boost_names_are_the_reference_conv_parameters():
    model = tiny_model()
    assert set(model.lr_boost_names()) == {
        "label_embed.0.weight", "label_embed.1.weight", "label_embed.1.bias",
        *[f"propagation.convs.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")],
        *[f"head.conv{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]}


# ----------------------------------------------------------------------------- checkpoints


def reference_head_keys(C: int = 384) -> dict[str, list[int]]:
    """Names and shapes of the layers the reference segmentation model adds to the encoder."""
    bn = lambda name, c: {f"{name}.{p}": ([] if p == "num_batches_tracked" else [c])
                          for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    return {"label_conv.0.weight": [64, 16, 1], **bn("label_conv.1", 64),
            "propagation_0.mlp_convs.0.weight": [4 * C, 3 * C + 3, 1], "propagation_0.mlp_convs.0.bias": [4 * C],
            "propagation_0.mlp_convs.1.weight": [1024, 4 * C, 1], "propagation_0.mlp_convs.1.bias": [1024],
            **bn("propagation_0.mlp_bns.0", 4 * C), **bn("propagation_0.mlp_bns.1", 1024),
            "convs1.weight": [512, 3776, 1], "convs1.bias": [512], **bn("bns1", 512),
            "convs2.weight": [256, 512, 1], "convs2.bias": [256], **bn("bns2", 256),
            "convs3.weight": [50, 256, 1], "convs3.bias": [50]}


def test_state_dict_names_and_shapes_are_the_reference(base_model):
    fixture = json.loads((reference_dir() / "keys_finetune_base.json").read_text())["state_dict"]
    expected = {k: v for k, v in fixture if not k.startswith("cls_head_finetune.")}   # the encoder
    expected.update(reference_head_keys())
    ours = base_model.state_dict()
    ref = ours_to_reference(ours, "partseg")
    assert {k: list(v.shape) for k, v in ref.items()} == expected
    assert detect_kind(ref) == "partseg"
    back = reference_to_ours({f"module.{k}": v for k, v in ref.items()}, "auto")
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_encoder_loads_from_our_pretraining_checkpoint():
    torch.manual_seed(0)
    cfg = ReConConfig.variant("tiny", depth=2, decoder_depth=1, img_feat_dim=16, text_feat_dim=8)
    pretrain = ReConPretrain(cfg).state_dict()
    model = ReConPartSeg(cfg.replace(num_group=16, group_size=8), PartSegConfig(feature_blocks=(0, 1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing, ignored = load_encoder(model, pretrain)
    after = model.state_dict()
    assert all(torch.equal(after[k], pretrain[k]) for k in after if k.startswith("encoder."))
    assert {k.split(".")[0] for k in missing} == {"label_embed", "propagation", "head"}
    assert set(missing) == {k for k in after if not k.startswith("encoder.")      # PyTorch fills BN
                            and not k.endswith("num_batches_tracked")}           # counters itself
    assert all(torch.equal(after[k], before[k]) for k in missing)          # new layers keep their init
    assert set(ignored) == {k for k in pretrain if not k.startswith("encoder.")}
    assert {k.split(".")[0] for k in ignored} >= {"decoder", "mask_token", "img_proj", "text_proj"}


def test_encoder_loads_from_a_reference_pretraining_state_dict():
    entries = json.loads((reference_dir() / "keys_pretrain_base.json").read_text())["state_dict"]
    gen = torch.Generator().manual_seed(0)
    reference = {k: (torch.randint(0, 9, shape, generator=gen) if k.endswith("num_batches_tracked")
                     else torch.randn(shape, generator=gen)) for k, shape in entries}
    model = ReConPartSeg(reference_encoder_config("base"))
    missing, ignored = load_encoder(model, reference_to_ours(reference, "auto"))
    sd = model.state_dict()
    for ours, ref in (("encoder.blocks.5.query_attn.kv.weight", "MAE_encoder.blocks.blocks.5.attn_contrast.kv.weight"),
                      ("encoder.patch_embed.conv4.weight", "MAE_encoder.encoder.second_conv.3.weight"),
                      ("encoder.cls_token", "MAE_encoder.cls_token"), ("encoder.norm.bias", "MAE_encoder.norm.bias")):
        assert torch.equal(sd[ours], reference[ref])
    assert not any(k.startswith("encoder.") for k in missing)
    assert not any(k.startswith("encoder.") for k in ignored) and "rebuild_head.weight" in ignored


def test_a_checkpoint_without_encoder_weights_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="lacks encoder weights"):
        load_encoder(model, {"decoder.norm.weight": torch.ones(48)})


# ----------------------------------------------------------------------------- ONNX


def test_onnx_logits_match_torch(tmp_path):
    model = tiny_model()
    path = export_partseg_onnx(model, tmp_path / "seg.onnx", n_points=256)
    rng = np.random.default_rng(1)
    for batch, n in ((2, 256), (3, 300), (1, 128)):
        category = rng.integers(0, 3, batch)
        diff = check_partseg_onnx(path, model, rng.normal(size=(batch, n, 3)).astype(np.float32), category)
        assert diff <= 1e-4
    with pytest.raises(AssertionError, match="differ from torch"):
        model.head.conv3.bias.data += 1e-2                         # the check does catch a mismatch
        check_partseg_onnx(path, model, rng.normal(size=(1, 128, 3)), np.zeros(1))


def test_export_stage_tells_a_partseg_checkpoint_apart(tmp_path, monkeypatch):
    """`recon export` on a part-segmentation model.pt writes the segmentation graph (points +
    category in) and its parity report; a classifier checkpoint still goes the classifier's way."""
    from typer.testing import CliRunner

    from cli import app
    from recon.downstream.export import onnx_session
    from recon.downstream.partseg_data import SegData
    from recon.downstream.partseg_finetune import save_partseg_model
    from recon.downstream.recipes import Profile
    from stages.export import checkpoint_task

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    model = tiny_model()
    data = SegData(np.zeros((1, 8, 3), np.float32), np.zeros((1, 8), np.int64), np.zeros(1, np.int64),
                   np.array(["s0"]), ["a", "b", "c"], [[0, 1], [2, 3], [4, 5]], 6)
    recipe = Profile(192, 4, 16, 1e-3, 1, 0, 16, 0.0, "none", "none", False)
    save_partseg_model(tmp_path / "seg.pt", model, data, recipe, epoch=0)
    assert checkpoint_task(torch.load(tmp_path / "seg.pt", weights_only=True)) == "partseg"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "seg.pt"),
                                      "--onnx", str(tmp_path / "out" / "partseg.onnx")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "metrics" / "out" / "partseg_check_details.json").read_text())
    assert report["task"] == "partseg" and report["n_points"] == 192 and report["parts"] == 6
    assert report["categories"] == 3 and report["max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "metrics" / "out" / "partseg_check.json").read_text()) == {"seg_onnx_ok": True}
    session = onnx_session(tmp_path / "out" / "partseg.onnx")
    points = np.linspace(-1, 1, 300, dtype=np.float32).reshape(1, 100, 3)
    logits = session.run(None, {"points": points, "category": np.array([1])})[0]
    assert logits.shape == (1, 100, 6)
