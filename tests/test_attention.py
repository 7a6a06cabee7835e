"""Mean attention distance (`recon attention`): known distances on hand-built attention patterns,
attention capture that leaves the network's numbers untouched, and the command end to end on tiny
checkpoints side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluate import make_blob_store, tiny_checkpoint
from typer.testing import CliRunner

from recon.downstream import attention as A
from recon.network.model import ReConConfig, ReConPretrain, record_attention
from recon.network.pointops import group_points

D = 0.5   # exact in binary: the distances below are exact too
#: four centres on a line, D apart
LINE = torch.tensor([[[0.0, 0, 0], [D, 0, 0], [2 * D, 0, 0], [3 * D, 0, 0]]])
#: mean over all ordered pairs, self pairs included: sum_ij |i - j| D / 16 = 20 D / 16
UNIFORM = 20 * D / 16


def test_patch_distance_of_known_patterns():
    neighbour = torch.zeros(1, 1, 4, 4)
    for i, j in ((0, 1), (1, 2), (2, 1), (3, 2)):
        neighbour[0, 0, i, j] = 1.0
    assert A.patch_attention_distance(neighbour, LINE).item() == pytest.approx(D, abs=1e-12)
    uniform = torch.full((1, 1, 4, 4), 0.25)
    assert A.patch_attention_distance(uniform, LINE).item() == pytest.approx(UNIFORM, abs=1e-12)
    itself = torch.eye(4).reshape(1, 1, 4, 4)
    assert A.patch_attention_distance(itself, LINE).item() == 0.0
    # per head: a head looking two apart (0->2, 1->3, 2->0, 3->1) gives 2D beside the neighbour head
    two = torch.zeros(1, 1, 4, 4)
    for i, j in ((0, 2), (1, 3), (2, 0), (3, 1)):
        two[0, 0, i, j] = 1.0
    both = A.patch_attention_distance(torch.cat([neighbour, two], 1), LINE)
    assert both.shape == (1, 2) and both[0].tolist() == pytest.approx([D, 2 * D], abs=1e-12)


def test_query_distance_of_known_patterns():
    one = torch.tensor([[[[0.0, 0, 1, 0]]]])                      # one patch: no spread
    assert A.query_attention_spread(one, LINE).item() == 0.0
    pair = torch.tensor([[[[0.5, 0.5, 0, 0]]]])                   # two neighbours: half the pairs are D apart
    assert A.query_attention_spread(pair, LINE).item() == pytest.approx(D / 2, abs=1e-12)
    ends = torch.tensor([[[[0.5, 0, 0, 0.5]]]])
    assert A.query_attention_spread(ends, LINE).item() == pytest.approx(3 * D / 2, abs=1e-12)
    uniform = torch.full((1, 1, 3, 4), 0.25)                      # three queries: the patch tokens' uniform value
    assert A.query_attention_spread(uniform, LINE)[0, 0].tolist() == pytest.approx([UNIFORM] * 3, abs=1e-12)
    assert A.pairwise_distances(LINE).mean().item() == pytest.approx(UNIFORM, abs=1e-12)


def tiny_model(use_sdpa: bool = True) -> ReConPretrain:
    torch.manual_seed(0)
    cfg = ReConConfig.variant("tiny", trans_dim=48, depth=3, num_heads=3, decoder_depth=1, decoder_num_heads=3,
                              num_group=8, group_size=16, img_feat_dim=8, text_feat_dim=8, use_sdpa=use_sdpa)
    return ReConPretrain(cfg).eval()


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_capture_gives_probabilities_and_leaves_outputs_identical(use_sdpa):
    model = tiny_model(use_sdpa)
    points = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(1))
    cfg = model.cfg
    with torch.no_grad():
        before = model.encode(points)
        neighborhood, center = group_points(points, cfg.num_group, cfg.group_size)
        with record_attention(model.encoder) as records:
            enc = model.encoder(neighborhood, center, None)
        after = model.encode(points)
    assert torch.equal(enc["tokens"], before) and torch.equal(after, before)
    assert len(records) == cfg.depth
    for r in records:
        assert len(r["patch"]) == len(r["query"]) == 1
        patch, query = r["patch"][0], r["query"][0]
        assert patch.shape == (2, cfg.num_heads, cfg.num_group, cfg.num_group)
        assert query.shape == (2, cfg.num_heads, 3, cfg.num_group)
        for probs in (patch, query):
            assert (probs >= 0).all()
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), rtol=0, atol=1e-6)
    # the recorded weights are the ones applied: the first block's query rows recomputed by hand
    block = model.encoder.blocks[0]
    q_tok, q_pos = model.encoder.queries(2)
    x = block.query_norm1(q_tok + q_pos)
    p = block.patch_norm1(model.encoder.patch_embed(neighborhood) + model.encoder.pos_embed(center))
    q = block.query_attn.q(x).reshape(2, 3, 3, 16).transpose(1, 2)
    k = block.query_attn.kv(p).chunk(2, -1)[0].reshape(2, 8, 3, 16).transpose(1, 2)
    torch.testing.assert_close(records[0]["query"][0], ((q @ k.transpose(-2, -1)) / 4).softmax(-1))
    # off again outside the context: nothing recorded, no recorder left behind
    model.encode(points)
    assert all(len(r["patch"]) == 1 for r in records)
    assert all(b.patch_attn.record is None and b.query_attn.record is None for b in model.encoder.blocks)


def test_capture_leaves_gradients_and_the_training_forward_identical():
    model = tiny_model().train()
    points = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(2))
    mask = model.random_mask(2, "cpu", generator=torch.Generator().manual_seed(3))
    grads = []
    for capture in (False, True):
        torch.manual_seed(4)
        model.zero_grad()
        if capture:
            with record_attention(model.encoder) as records:
                out = model(points, mask=mask)
            assert records[0]["patch"][0].shape[-1] == model.cfg.num_group - model.cfg.num_mask
        else:
            out = model(points, mask=mask)
        out["loss"].backward()
        grads.append((out["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_attention_distances_per_block_and_head():
    model = tiny_model()
    clouds = np.random.default_rng(0).normal(size=(5, 64, 3)).astype(np.float32)
    r = A.attention_distances(model, clouds, batch=2)
    assert (r["blocks"], r["heads"], r["shapes"], r["num_group"]) == (3, 3, 5, 8)
    for key in ("patches", "queries"):
        assert len(r[key]["per_block"]) == 3 and np.shape(r[key]["per_head"]) == (3, 3)
        assert np.allclose(np.mean(r[key]["per_head"], 1), r[key]["per_block"])
    assert set(r["queries"]["per_query"]) == {"cls", "img", "text"}
    assert np.allclose(np.mean(list(r["queries"]["per_query"].values()), 0), r["queries"]["per_block"])
    # batching does not change the result; distances lie between 0 and the cloud's diameter
    whole = A.attention_distances(model, clouds, batch=5)
    assert np.allclose(whole["patches"]["per_head"], r["patches"]["per_head"], rtol=1e-6)
    assert np.allclose(whole["queries"]["per_head"], r["queries"]["per_head"], rtol=1e-6)
    values = np.array(r["patches"]["per_head"] + r["queries"]["per_head"])
    assert (values > 0).all() and (values < 2 * np.abs(clouds).max() * np.sqrt(3)).all() and r["uniform"] > 0


def test_command_end_to_end_two_checkpoints_side_by_side(tmp_path, monkeypatch):
    from cli import app

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    store = make_blob_store(tmp_path / "d.zarr", per_class=3)
    arm = tmp_path / "study" / "rec_only" / "pretrain" / "checkpoints"
    arm.mkdir(parents=True)
    tiny_checkpoint(arm / "epoch-0001.pt", seed=1)
    tiny_checkpoint(arm / "epoch-0003.pt", seed=3)
    tiny_checkpoint(tmp_path / "model.pt", seed=5)
    out = tmp_path / "att" / "cmp.json"
    result = CliRunner().invoke(app, ["attention", str(tmp_path / "study" / "rec_only"), f"mine={tmp_path / 'model.pt'}",
                                      "--store", str(store), "--shapes", "4", "--n-points", "32", "--out", str(out),
                                      "--baseline", "--set", "bn_recalibrate=4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["checkpoints"]) == ["rec_only", "mine", "random_init"]
    assert report["checkpoints"]["rec_only"]["checkpoint"].endswith("epoch-0003.pt")   # the folder's latest
    assert report["shapes"] == 4 and report["split"] == "test" and report["n_points"] == 32
    assert report["definition"] == {"patches": A.PATCH_DISTANCE, "queries": A.QUERY_DISTANCE}
    for r in report["checkpoints"].values():
        assert r["blocks"] == 2 and r["heads"] == 3
        for key in ("patches", "queries"):
            assert len(r[key]["per_block"]) == 2 and np.shape(r[key]["per_head"]) == (2, 3)
    assert report["checkpoints"]["random_init"]["bn_recalibrated_clouds"] == 4
    assert report["checkpoints"]["rec_only"]["patches"] != report["checkpoints"]["mine"]["patches"]
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same inputs give the same numbers; by default named after the folders, into cache/attention
    result = CliRunner().invoke(app, ["attention", str(arm / "epoch-0003.pt"), str(tmp_path / "model.pt"),
                                      "--store", str(store), "--shapes", "4", "--n-points", "32"])
    assert result.exit_code == 0, result.output
    default = tmp_path / "cache" / "attention" / f"rec_only+{tmp_path.name}.json"
    again = json.loads(default.read_text())["checkpoints"]
    assert again["rec_only"]["patches"] == report["checkpoints"]["rec_only"]["patches"]
    assert again[tmp_path.name]["queries"] == report["checkpoints"]["mine"]["queries"]
    assert default.with_suffix(".png").exists()


def test_checkpoint_names_and_errors(tmp_path):
    from stages import attention as stage
    from stages.common import StageError

    run = tmp_path / "study" / "recon_std" / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    tiny_checkpoint(run / "checkpoints" / "epoch-0002.pt")
    cache = tmp_path / "cache"
    (cache / "pretrain").mkdir(parents=True)
    tiny_checkpoint(cache / "pretrain" / "model.pt")
    found = stage.resolve([str(run / "checkpoints" / "epoch-0002.pt"), str(cache / "pretrain" / "model.pt")], cache)
    assert list(found) == ["recon_std", "pretrain"]
    assert list(stage.resolve([str(tmp_path / "study" / "recon_std"), f"x={cache / 'pretrain'}"], cache)) == \
        ["recon_std", "x"]
    tiny_checkpoint(run / "checkpoints" / "epoch-0005.pt")
    epochs = stage.resolve([str(run / "checkpoints" / "epoch-0002.pt"), str(tmp_path / "study" / "recon_std")], cache)
    assert epochs == {"recon_std/epoch-0002": run / "checkpoints" / "epoch-0002.pt",
                      "recon_std/epoch-0005": run / "checkpoints" / "epoch-0005.pt"}
    with pytest.raises(StageError, match="names repeat"):
        stage.resolve([str(run / "checkpoints" / "epoch-0002.pt")] * 2, cache)
    (tmp_path / "study" / "random_init").mkdir()
    with pytest.raises(StageError, match="no checkpoint"):
        stage.resolve([str(tmp_path / "study" / "random_init")], cache)
    with pytest.raises(FileNotFoundError):
        stage.resolve([str(tmp_path / "nothing.pt")], cache)
