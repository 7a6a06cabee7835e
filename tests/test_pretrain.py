"""Pretraining: data path, parameter groups, schedule, exact resume, guards, DDP, pictures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_dir, write_synthetic_cache
from pipeline.store import StoreError
from recon.downstream.evaluate import load_pretrained
from recon.network.model import ReConConfig, ReConPretrain
from recon.pretraining.data import PretrainDataset, open_pretrain_stores
from recon.pretraining.trainer import NonFiniteLoss, PretrainParams, train
from recon.runtime import trainstate
from recon.runtime.optim import lr_at, lr_per_epoch, param_groups

TINY_MODEL = {"trans_dim": 48, "num_heads": 3, "decoder_num_heads": 3, "depth": 2, "decoder_depth": 1,
              "num_group": 8, "group_size": 16}


def tiny_params(**overrides) -> PretrainParams:
    values = dict(variant="tiny", model=TINY_MODEL, epochs=2, batch_size=4, n_points=128,
                  warmup_epochs=1, schedule="step", drop_path=0.1, device="cpu", keep_last=5)
    values.update(overrides)
    return PretrainParams(**values)


@pytest.fixture
def cache(tmp_path) -> Path:
    return write_synthetic_cache(tmp_path / "cache")


def test_dataset_items_are_deterministic_and_well_formed(cache):
    stores = open_pretrain_stores(cache)
    data = PretrainDataset(stores, n_points=128, seed=3)
    a, b = data[5], data[5]
    assert a["points"].shape == (128, 3) and a["img"].shape == (16,) and a["text"].shape == (8,)
    torch.testing.assert_close(a["points"], b["points"])
    assert abs(a["points"].norm(dim=1).max().item() - 1) < 1e-5
    data.set_epoch(1)
    assert not torch.equal(a["points"], data[5]["points"])  # a new subset/rotation each epoch
    label = int(a["label"])
    assert stores.categories[label] == stores.shapes["category"][int(a["index"])]


def test_mismatched_stores_are_refused(cache, tmp_path):
    import polars as pl
    shapes = pl.read_parquet(cache / "shapes.parquet")
    shapes.reverse().write_parquet(cache / "shapes.parquet")
    with pytest.raises(StoreError, match="misaligned"):
        open_pretrain_stores(cache)
    shapes.with_columns(pl.col("category").replace("ball", "sphere")).write_parquet(cache / "shapes.parquet")
    with pytest.raises(StoreError, match="no prompts for categories \\['sphere'\\]"):
        open_pretrain_stores(cache)


def test_parameter_groups_match_the_reference_rule():
    reference = json.loads((shared_dir() / "fixtures/reference/keys_pretrain_base.json").read_text()) \
        if shared_dir().exists() else None
    model = ReConPretrain(ReConConfig.variant("base"))
    groups = param_groups(model, 0.05, 5e-4)
    counts = {g["weight_decay"]: len(g["params"]) for g in groups}
    if reference is None:
        pytest.skip("reference fixtures absent")
    expected = {g["weight_decay"]: g["num_param_tensors"] for g in reference["optimizer_param_groups"]
                if g["num_param_tensors"]}
    assert counts == expected  # 219 without decay, 138 with


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 100, 10, 5e-4) == pytest.approx(1e-6)
    assert lr_at(10, 100, 10, 5e-4) == pytest.approx(5e-4)
    assert lr_at(55, 100, 10, 5e-4) == pytest.approx((5e-4 + 1e-6) / 2, rel=1e-6)
    assert lr_at(100, 100, 10, 5e-4) == pytest.approx(1e-6)


def test_epoch_schedule_is_timm_cosine_as_the_reference_runner_steps_it():
    """The reference builds timm's CosineLRScheduler(t_in_epochs=True) and calls step(epoch) at the
    end of every epoch: our per-epoch rate must be the rate each reference epoch trains at."""
    from timm.scheduler import CosineLRScheduler
    for epochs, warmup in ((300, 10), (8, 1), (5, 0)):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
        scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-6, cycle_mul=1, cycle_decay=0.1,
                                      warmup_lr_init=1e-6, warmup_t=warmup, cycle_limit=1, t_in_epochs=True)
        reference = []
        for epoch in range(epochs):
            reference.append(optimizer.param_groups[0]["lr"])
            scheduler.step(epoch)
        ours = [lr_per_epoch(e, epochs, warmup, 5e-4) for e in range(epochs)]
        assert ours == pytest.approx(reference, rel=1e-12, abs=0)
    assert lr_per_epoch(1, 300, 10, 5e-4) == 1e-6 and lr_per_epoch(2, 300, 10, 5e-4) > 1e-6


@pytest.mark.parametrize("schedule", ["epoch", "step"])
def test_trainer_steps_the_schedule_at_its_granularity(cache, tmp_path, monkeypatch, schedule):
    import recon.pretraining.trainer as trainer
    seen = []
    real_set_lr = trainer.set_lr
    monkeypatch.setattr(trainer, "set_lr", lambda opt, lr: (seen.append(lr), real_set_lr(opt, lr)))
    train(tiny_params(epochs=4, warmup_epochs=1, schedule=schedule), cache, tmp_path / schedule, log=lambda *_: None)
    per_epoch = 3                           # 12 shapes, batch 4
    assert len(seen) == 4 * per_epoch
    if schedule == "epoch":                 # one rate per epoch: the reference's
        expected = [lr_per_epoch(s // per_epoch, 4, 1, 5e-4) for s in range(len(seen))]
        assert len(set(seen[per_epoch:2 * per_epoch])) == 1
    else:                                   # a new rate every optimiser step
        expected = [lr_at(s, 4 * per_epoch, per_epoch, 5e-4) for s in range(len(seen))]
        assert len(set(seen)) == len(seen)
    assert seen == pytest.approx(expected, rel=1e-12)


def test_resume_after_interruption_is_exact(cache, tmp_path):
    straight = train(tiny_params(), cache, tmp_path / "a", log=lambda *_: None)
    first = train(tiny_params(max_steps=3), cache, tmp_path / "b", log=lambda *_: None)
    assert len(first["history"]) == 1  # "killed" after epoch 1 (3 steps per epoch)
    resumed = train(tiny_params(), cache, tmp_path / "b", log=lambda *_: None)
    for (name, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["loss"] for r in straight["history"]] == [r["loss"] for r in resumed["history"]]
    saved = trainstate.list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [p.name for p in saved] == ["epoch-0000.pt", "epoch-0001.pt"]
    assert (tmp_path / "b" / "history.csv").read_text().count("\n") == 3
    # rerun of the finished run after its outputs were removed (what dvc repro does): nothing to
    # train, same weights, and history.csv is written again
    (tmp_path / "b" / "history.csv").unlink()
    again = train(tiny_params(), cache, tmp_path / "b", log=lambda *_: None)
    assert again["history"] == resumed["history"]
    assert (tmp_path / "b" / "history.csv").read_text().count("\n") == 3
    torch.testing.assert_close(again["model"].state_dict(), resumed["model"].state_dict(), rtol=0, atol=0)


def test_gradient_accumulation_keeps_the_global_batch(cache, tmp_path):
    accum = train(tiny_params(epochs=1, micro_batch=2), cache, tmp_path / "acc", log=lambda *_: None)
    # pretraining uses every shape (12), global batch 4 → 3 optimiser steps of 2 micro-batches of 2
    assert accum["history"][0]["step"] == 3
    with pytest.raises(ValueError, match="not micro_batch 3"):
        train(tiny_params(epochs=1, micro_batch=3), cache, tmp_path / "bad", log=lambda *_: None)


def test_changed_params_start_afresh_and_keep_the_old_run(cache, tmp_path):
    train(tiny_params(epochs=1), cache, tmp_path / "r", log=lambda *_: None)
    messages = []
    train(tiny_params(epochs=1, lr=1e-4), cache, tmp_path / "r", log=messages.append)
    assert any("other params" in m for m in messages)
    assert (tmp_path / "r" / "checkpoints.previous" / "epoch-0000.pt").exists()


def test_changed_training_code_retrains_instead_of_resuming(cache, tmp_path, monkeypatch):
    import recon.pretraining.trainer as P
    train(tiny_params(epochs=1), cache, tmp_path / "r", log=lambda *_: None)
    messages = []
    same = train(tiny_params(epochs=1), cache, tmp_path / "r", log=messages.append)
    assert any("resuming" in m for m in messages) and len(same["history"]) == 1
    monkeypatch.setattr(P, "TRAINING_CODE", P.TRAINING_CODE[:-1])   # as if a module's source changed
    messages.clear()
    train(tiny_params(epochs=1), cache, tmp_path / "r", log=messages.append)
    assert any("other params, inputs or code" in m for m in messages)
    assert (tmp_path / "r" / "checkpoints.previous" / "epoch-0000.pt").exists()
    a, b = trainstate.code_fingerprint("recon.network.model"), trainstate.code_fingerprint("recon.network.losses")
    assert a != b and a == trainstate.code_fingerprint("recon.network.model")


def test_cuda_graph_settings_it_cannot_follow_are_refused_before_work():
    from recon.pretraining.trainer import check_cuda_graph
    from recon.runtime.distributed import Dist
    check_cuda_graph(tiny_params(), Dist())  # off: nothing to check
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_cuda_graph(tiny_params(cuda_graph=True), Dist())
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="one GPU"):
        check_cuda_graph(tiny_params(cuda_graph=True), Dist(rank=0, world=2, device=cuda))
    check_cuda_graph(tiny_params(cuda_graph=True), Dist(device=cuda))


def test_non_finite_loss_stops_with_step_and_rows(cache, tmp_path):
    import zarr
    image = zarr.open_array(cache / "teachers" / "image.zarr" / "features", mode="r+")
    values = image[:]
    values[:] = np.float16("inf")
    image[:] = values
    with pytest.raises(NonFiniteLoss, match=r"step 0; batch shape rows \["):
        train(tiny_params(epochs=1), cache, tmp_path / "nan", log=lambda *_: None)


def test_checkpoints_load_with_weights_only_and_roundtrip(cache, tmp_path):
    result = train(tiny_params(epochs=1), cache, tmp_path / "w", log=lambda *_: None)
    path = trainstate.latest(tmp_path / "w" / "checkpoints")
    model = load_pretrained(path)
    x = torch.rand(2, 128, 3)
    result["model"].eval()
    torch.testing.assert_close(model.features(x), result["model"].features(x))


def test_ddp_two_cpu_processes(cache, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text("import sys; from pathlib import Path; from recon.pretraining.trainer import PretrainParams, train; "
            f"p = PretrainParams(variant='tiny', model={TINY_MODEL!r}, epochs=1, batch_size=4, n_points=128, "
            "warmup_epochs=0, device='cpu'); "
            "r = train(p, Path(sys.argv[1]), Path(sys.argv[2]), log=print); "
            "import os; (Path(sys.argv[2]) / ('digest-' + os.environ['RANK'])).write_text("  # a file per rank: stdouts interleave
            "repr(float(sum(v.double().sum() for v in r['model'].parameters()))))")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", str(script), str(cache), str(tmp_path / "ddp")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(tmp_path / "ddp" / f"digest-{rank}").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]  # both ranks hold the same parameters (BN running stats are per rank)
    assert (tmp_path / "ddp" / "checkpoints" / "epoch-0000.pt").exists()


def test_any_rank_flag_reaches_every_rank(tmp_path):
    """Dist.any under torchrun (2 gloo processes): a non-finite loss on one rank stops all of them
    before an optimizer step, so no rank can checkpoint weights updated from NaN gradients."""
    script = tmp_path / "any.py"
    script.write_text("import sys; from pathlib import Path; from recon.runtime.distributed import setup, teardown; "
                      "d = setup('cpu'); "
                      "Path(sys.argv[1], f'any-{d.rank}').write_text(f'{d.any(d.rank == 1)} {d.any(False)}'); "
                      "teardown(d)")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29559", str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"any-{rank}").read_text() for rank in (0, 1)] == ["True False", "True False"]


def _drawn_reconstruction(monkeypatch, checkpoint: Path, out: Path, cache: Path, n_shapes: int,
                          reinit: bool = False) -> tuple[np.ndarray, list[dict]]:
    """`recon show reconstruction` on ``checkpoint`` (``reinit``: the same network re-initialised,
    seed 0): the decoded PNG [H, W, 3] and, per scatter call, its panel (row, column), title,
    colour and points (xyz, undoing the plot's x, z, y axis order)."""
    from mpl_toolkits.mplot3d.axes3d import Axes3D
    from PIL import Image

    from stages import show

    drawn, scatter = [], Axes3D.scatter

    def recording_scatter(ax, xs, ys, zs, *args, **kwargs):
        drawn.append((ax, np.stack([xs, zs, ys], axis=1).astype(np.float32), kwargs.get("c")))
        return scatter(ax, xs, ys, zs, *args, **kwargs)

    def reinitialised(path):
        model = load_pretrained(path)
        torch.manual_seed(0)
        model.reset_parameters()
        return model.eval()

    with monkeypatch.context() as patch:
        patch.setattr(Axes3D, "scatter", recording_scatter)
        if reinit:
            patch.setattr(show, "load_pretrained", reinitialised)
        show.reconstruction(checkpoint, out, n_shapes=n_shapes, cache=cache)
    panels = [{"row": ax.get_subplotspec().rowspan.start, "col": ax.get_subplotspec().colspan.start,
               "title": ax.get_title(), "colour": colour, "points": points} for ax, points, colour in drawn]
    return np.asarray(Image.open(out).convert("RGB")), panels


def test_show_reconstruction_draws_the_groups_and_the_reconstruction(cache, tmp_path, monkeypatch):
    """The picture: one row of three panels per test shape (input / visible groups / visible +
    reconstructed), the visible groups and the reconstructed masked groups where the seeded mask
    puts them, red only in the third column, and a reconstruction that 30 training steps bring
    much nearer to the true masked groups than the same network at random init."""
    from recon.network.pointops import group_points

    train(tiny_params(epochs=10, monitor_shapes=0), cache, tmp_path / "s", log=lambda *_: None)
    checkpoint = trainstate.latest(tmp_path / "s" / "checkpoints")
    model = load_pretrained(checkpoint)
    G, S, M = model.cfg.num_group, model.cfg.group_size, model.cfg.num_mask
    n_shapes = 2
    image, panels = _drawn_reconstruction(monkeypatch, checkpoint, tmp_path / "rec.png", cache, n_shapes)

    # the PNG: 9 x 3n inches at 110 dpi, the red (reconstructed) points only in the right-hand panels
    assert image.shape == (3 * n_shapes * 110, 9 * 110, 3)
    r, g, b = (image[..., k].astype(int) for k in range(3))
    red = (r > 150) & (g < 110) & (b < 110)
    third, half = image.shape[1] // 3, image.shape[0] // n_shapes
    assert red[:, :2 * third].sum() == 0
    assert all(red[i * half:(i + 1) * half, 2 * third:].sum() > 50 for i in range(n_shapes))

    # the data drawn: the first test shape of each category (ball, box), three panels each
    assert sorted({(p["row"], p["col"]) for p in panels}) == [(i, j) for i in range(n_shapes) for j in range(3)]
    clouds, errors = [], []
    mask = model.random_mask(n_shapes, "cpu", generator=torch.Generator().manual_seed(0))   # the picture's seed
    for i, category in enumerate(("ball", "box")):
        row = {(p["col"], p["colour"]): p for p in panels if p["row"] == i}
        assert set(row) == {(0, "tab:blue"), (1, "tab:blue"), (2, "tab:blue"), (2, "tab:red")}
        assert [row[k]["title"] for k in sorted(row)] == [f"{category}: input", f"{category}: visible groups",
                                                          *[f"{category}: visible + reconstructed"] * 2]
        cloud = row[0, "tab:blue"]["points"]
        clouds.append(cloud)
        neighborhood, center = group_points(torch.from_numpy(cloud)[None], G, S)
        groups = (neighborhood + center[:, :, None])[0]                         # [G, S, 3] absolute
        visible, masked = groups[~mask[i]], groups[mask[i]]
        np.testing.assert_allclose(row[1, "tab:blue"]["points"], visible.reshape(-1, 3).numpy(), atol=1e-6)
        np.testing.assert_array_equal(row[2, "tab:blue"]["points"], row[1, "tab:blue"]["points"])
        rebuilt = torch.from_numpy(row[2, "tab:red"]["points"]).reshape(M, S, 3)  # masked groups, ascending
        errors.append(chamfer_l2(rebuilt, masked))

    # the same picture from the same network at random init: its red groups are far off
    _, random_panels = _drawn_reconstruction(monkeypatch, checkpoint, tmp_path / "random.png", cache, n_shapes,
                                             reinit=True)
    random_errors = []
    for i, cloud in enumerate(clouds):
        neighborhood, center = group_points(torch.from_numpy(cloud)[None], G, S)
        masked = (neighborhood + center[:, :, None])[0][mask[i]]
        red = next(p for p in random_panels if p["row"] == i and p["colour"] == "tab:red")["points"]
        random_errors.append(chamfer_l2(torch.from_numpy(red).reshape(M, S, 3), masked))
    assert max(errors) < 0.5 * min(random_errors), (errors, random_errors)


def chamfer_l2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean Chamfer-L2 over paired groups [K, S, 3] (squared distances, both directions)."""
    d = ((pred[:, :, None] - target[:, None]) ** 2).sum(-1)
    return (d.min(2).values.mean() + d.min(1).values.mean()).item()


def test_convert_reference_checkpoint_roundtrip(tmp_path):
    from recon.network.reference import convert_reference_checkpoint, ours_to_reference
    model = ReConPretrain(ReConConfig.variant("tiny", depth=2, decoder_depth=1)).eval()
    reference = {"module." + k: v for k, v in ours_to_reference(model.state_dict(), "pretrain").items()}
    torch.save({"base_model": reference, "epoch": 3}, tmp_path / "ckpt-last.pth")
    config = convert_reference_checkpoint(tmp_path / "ckpt-last.pth", tmp_path / "model.pt")
    assert config["trans_dim"] == 192 and config["depth"] == 2 and config["decoder_depth"] == 1
    loaded = load_pretrained(tmp_path / "model.pt")
    x = torch.rand(2, 1024, 3)
    torch.testing.assert_close(loaded.features(x), model.features(x))


def smooth_l1_to_mean(train: np.ndarray, targets: np.ndarray) -> float:
    """Brute force: SmoothL1 of the train targets' mean against ``targets`` [K, D]."""
    pred = torch.from_numpy(np.broadcast_to(train.mean(0), targets.shape).copy())
    return torch.nn.functional.smooth_l1_loss(pred, torch.from_numpy(targets)).item()


def test_variant_sampling_draws_augmented_variants_only(tmp_path):
    """With A > 1 stored variants a step draws from the augmented ones (1..A-1), each of them;
    ``image_variants='all'`` adds the clean view; with A = 1 the clean view is all there is."""
    from recon.pretraining.data import variant_choices

    assert variant_choices(4) == range(1, 4) and variant_choices(4, "all") == range(4)
    assert variant_choices(1) == range(1) and variant_choices(1, "all") == range(1)
    with pytest.raises(ValueError, match="unknown image_variants"):
        variant_choices(4, "clean")
    stores = open_pretrain_stores(write_synthetic_cache(tmp_path / "c", variants=4))
    for mode, expected in (("augmented", {1, 2, 3}), ("all", {0, 1, 2, 3})):
        data = PretrainDataset(stores, n_points=64, image_variants=mode)
        drawn = set()
        for epoch in range(12):
            data.set_epoch(epoch)
            for i in range(len(data)):
                item = data[i]
                row = int(item["index"])
                stored = stores.image[row, 0].astype(np.float32)              # [A, D], one view
                match = [a for a in range(4) if np.array_equal(stored[a], item["img"].numpy())]
                assert len(match) == 1
                drawn.add(match[0])
        assert drawn == expected, mode


def test_target_statistics_round_trip(tmp_path):
    """``target_norm: store``: per-dimension mean/std over the train split (image: every view and
    the drawable variants; text: each train shape's category), streamed in chunks; normalising then
    de-normalising gives the targets back; the statistics travel with the checkpoints and zero-shot
    maps the projections back into the teachers' spaces; the state-dict keys stay the reference's."""
    from recon.pretraining.targets import compute_target_stats

    cache = write_synthetic_cache(tmp_path / "c", n_per_class=5, variants=3)
    stores = open_pretrain_stores(cache)
    train_rows = stores.rows[stores.shapes["split"].to_numpy()[stores.rows] == "train"]
    stats = compute_target_stats(stores.image, stores.text, stores.category_index, train_rows, slice(1, 3))
    image = stores.image[train_rows][:, :, 1:3].reshape(-1, stores.image_dim).astype(np.float64)
    text = stores.text[stores.category_index[train_rows]].reshape(-1, stores.text_dim).astype(np.float64)
    for got_mean, got_std, brute in ((stats.img_mean, stats.img_std, image), (stats.text_mean, stats.text_std, text)):
        np.testing.assert_allclose(got_mean, brute.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_std, brute.std(0), rtol=1e-5)
    chunked = compute_target_stats(stores.image, stores.text, stores.category_index, train_rows, slice(1, 3), chunk=2)
    np.testing.assert_allclose(chunked.img_std, stats.img_std, rtol=1e-6)
    x = torch.from_numpy(image[:7].astype(np.float32))
    normalized = stats.normalize("img", x)
    torch.testing.assert_close(stats.denormalize("img", normalized), x)
    whole = stats.normalize("img", torch.from_numpy(image.astype(np.float32)))
    torch.testing.assert_close(whole.mean(0), torch.zeros(stores.image_dim), atol=1e-4, rtol=0)
    torch.testing.assert_close(whole.std(0, unbiased=False), torch.ones(stores.image_dim), atol=1e-4, rtol=0)

    from stages import pretrain as stage
    result = stage.run(tiny_params(epochs=1, target_norm="store", split="train"), cache, tmp_path / "p")
    assert result["target_norm"] == "store" and result["test_shapes_held_out"]
    assert result["data"]["data_fraction"] == 1.0 and result["data"]["shapes"] == result["data"]["of"]   # all of them
    published = tmp_path / "metrics" / "p"             # every figure in details.json, the headline in metrics.json
    assert json.loads((published / "details.json").read_text()) == json.loads(json.dumps(result))
    assert json.loads((published / "metrics.json").read_text()) == stage.headline(result)
    for path in (tmp_path / "p" / "model.pt", trainstate.latest(tmp_path / "p" / "checkpoints")):
        loaded = load_pretrained(path)
        np.testing.assert_array_equal(loaded.target_stats.img_std, stats.img_std)
        np.testing.assert_array_equal(loaded.target_stats.text_mean, stats.text_mean)
        assert set(loaded.state_dict()) == set(ReConPretrain(loaded.cfg).state_dict())
        clouds = torch.rand(2, 128, 3)
        with torch.no_grad():
            tokens = loaded.encode(clouds)
            img, txt = loaded.zero_shot_features(clouds)
            torch.testing.assert_close(img, loaded.img_proj(tokens[:, 1]) * torch.from_numpy(stats.img_std)
                                       + torch.from_numpy(stats.img_mean))
            torch.testing.assert_close(txt, loaded.text_proj(tokens[:, 2]) * torch.from_numpy(stats.text_std)
                                       + torch.from_numpy(stats.text_mean))


def test_monitor_baselines_match_brute_force(tmp_path):
    """The mean-target baselines next to the monitored losses: the train split's mean target
    (over the drawable variants) against every target of the train / test shapes."""
    from recon.pretraining.monitor import PretrainMonitor

    stores = open_pretrain_stores(write_synthetic_cache(tmp_path / "c", n_per_class=5, variants=3))
    split = stores.shapes["split"].to_numpy()
    train_rows, test_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    torch.manual_seed(0)
    model = ReConPretrain(ReConConfig(**TINY_MODEL, img_feat_dim=stores.image_dim, text_feat_dim=stores.text_dim))
    image = {name: stores.image[rows][:, :, 1:3].reshape(-1, stores.image_dim).astype(np.float64)
             for name, rows in (("train", train_rows), ("test", test_rows))}
    text = {name: stores.text[stores.category_index[rows]].reshape(-1, stores.text_dim).astype(np.float64)
            for name, rows in (("train", train_rows), ("test", test_rows))}
    monitor = PretrainMonitor(stores, train_rows, test_rows, model, "smooth_l1", 64, range(1, 3), None)
    for name in ("train", "test"):
        assert monitor.baselines[f"{name}_loss_img_baseline"] == pytest.approx(
            smooth_l1_to_mean(image["train"], image[name]), rel=1e-6)
        assert monitor.baselines[f"{name}_loss_text_baseline"] == pytest.approx(
            smooth_l1_to_mean(text["train"], text[name]), rel=1e-6)
    l2 = PretrainMonitor(stores, train_rows, test_rows, model, "l2", 64, range(1, 3), None)
    assert l2.baselines["train_loss_img_baseline"] == pytest.approx(image["train"].var(0).mean(), rel=1e-6)
    cosine = PretrainMonitor(stores, train_rows, test_rows, model, "cosine", 64, range(1, 3), None)
    unit = image["train"] / np.linalg.norm(image["train"], axis=1, keepdims=True)
    direction = unit.mean(0) / np.linalg.norm(unit.mean(0))
    assert cosine.baselines["train_loss_img_baseline"] == pytest.approx(1 - (unit @ direction).mean(), rel=1e-6)
    assert PretrainMonitor(stores, train_rows, test_rows, model, "infonce", 64, range(1, 3), None).baselines == {}
    record = monitor.record(model)
    for key in ("knn", "svm", "svm_std"):                                # the model *is* its seed-0 init
        for treatment in ("reset", "recalibrated"):
            assert record[f"probe_{key}_{treatment}"] == record[f"probe_{key}_random_init_{treatment}"]
        assert record[f"probe_{key}_random_init_saved"] == record[f"probe_{key}"] == record[f"probe_{key}_reset"]
        assert record[f"probe_{key}_random_init"] == max(record[f"probe_{key}_random_init_{t}"]
                                                         for t in ("saved", "reset", "recalibrated"))
        assert record[f"probe_{key}_random_init_std"] == 0.0             # one baseline seed: no spread
    assert record["test_loss_img_ratio"] == pytest.approx(record["test_loss_img"] / record["test_loss_img_baseline"])


def test_random_init_probe_is_the_mean_and_spread_over_baseline_seeds(tmp_path):
    """The probe's random-init figure is the mean ± std over seeded twins, the first of them the
    trained model's own starting point; each twin is an independent network, probed under every
    BatchNorm treatment (saved = as initialised = reset; recalibrated on a seeded choice of the
    monitor's train clouds), and the headline's random-init figure is the strongest treatment's mean."""
    from recon.pretraining.monitor import PretrainMonitor
    from recon.pretraining.probes import BN_TREATMENTS, random_init_like, with_batchnorm

    stores = open_pretrain_stores(write_synthetic_cache(tmp_path / "c", n_per_class=5, variants=3))
    split = stores.shapes["split"].to_numpy()
    train_rows, test_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    torch.manual_seed(3)
    model = ReConPretrain(ReConConfig(**TINY_MODEL, img_feat_dim=stores.image_dim, text_feat_dim=stores.text_dim))
    with pytest.raises(ValueError, match="baseline_seeds"):
        PretrainMonitor(stores, train_rows, test_rows, model, "cosine", 64, range(1, 3), None, baseline_seeds=0)
    monitor = PretrainMonitor(stores, train_rows, test_rows, model, "cosine", 64, range(1, 3), None, seed=5,
                              baseline_seeds=3, bn_clouds=6)
    clouds = monitor.bn_clouds
    assert len(clouds) == 6 and all(any(torch.equal(c, torch.from_numpy(x)) for x in monitor.sets["train"].clouds)
                                    for c in clouds)
    twins = {t: [monitor.probe(monitor.encode(with_batchnorm(random_init_like(model, 5 + k), t, clouds)))
                 for k in range(3)] for t in BN_TREATMENTS}
    assert monitor.random_probes == twins
    assert len({json.dumps(t, sort_keys=True) for t in twins["saved"]}) > 1       # the seeds give different nets
    record = monitor.record(model)
    for key in ("knn", "svm", "svm_std"):
        means = {t: np.mean([r[key] for r in twins[t]]) for t in BN_TREATMENTS}
        for t in BN_TREATMENTS:
            assert record[f"probe_{key}_random_init_{t}"] == pytest.approx(means[t])
        best = max(BN_TREATMENTS, key=lambda t: means[t])
        assert record[f"probe_{key}_random_init"] == pytest.approx(means[best])
        assert record[f"probe_{key}_random_init_std"] == pytest.approx(np.std([r[key] for r in twins[best]]))
        for t in ("reset", "recalibrated"):                               # the model under the other treatments
            assert record[f"probe_{key}_{t}"] == monitor.probe(monitor.encode(with_batchnorm(model, t, clouds)))[key]
    final = monitor.final(model)
    assert {t: r["seeds"] for t, r in final["probe"]["bn_treatments"]["random_init"].items()} == {
        t: {"5": twins[t][0], "6": twins[t][1], "7": twins[t][2]} for t in BN_TREATMENTS}
    assert final["probe"]["random_init"]["knn"] == twins["saved"][0]["knn"]    # by-part detail: the first twin
    for key, v in final["probe"]["verdict"].items():
        assert v["pretrained"] == record[f"probe_{key}"] and v["random_init"] == record[f"probe_{key}_random_init"]
        assert v["margin"] == pytest.approx(v["pretrained"] - v["random_init"])
    # only the model as saved: no other treatment is computed or recorded
    saved_only = PretrainMonitor(stores, train_rows, test_rows, model, "cosine", 64, range(1, 3), None, seed=5,
                                 bn_treatments=["saved"])
    assert saved_only.bn_clouds is None and list(saved_only.random_probes) == ["saved"]
    assert not [k for k in saved_only.record(model) if k.endswith(("_reset", "_recalibrated"))]


def test_the_monitor_records_every_bn_treatment_per_epoch(cache, tmp_path):
    """Every monitored epoch has the model's probe under each BatchNorm treatment and the twins' per
    treatment, and recording them leaves training as it was (the treatments work on copies)."""
    keys = [f"probe_{key}{suffix}" for key in ("knn", "svm", "svm_std")
            for suffix in ("", "_reset", "_recalibrated", "_random_init", "_random_init_std",
                           "_random_init_saved", "_random_init_reset", "_random_init_recalibrated")]
    monitored = train(tiny_params(bn_recalibrate=4), cache, tmp_path / "a", log=lambda *_: None)
    for row in monitored["history"]:
        assert all(isinstance(row[k], float) for k in keys), sorted(set(keys) - set(row))
    quiet = train(tiny_params(bn_recalibrate=4, monitor_bn_treatments=["saved"]), cache, tmp_path / "b",
                  log=lambda *_: None)
    assert not [k for k in quiet["history"][-1] if k.endswith(("_reset", "_recalibrated"))]
    assert [r["loss"] for r in quiet["history"]] == [r["loss"] for r in monitored["history"]]
    torch.testing.assert_close(quiet["model"].state_dict(), monitored["model"].state_dict(), rtol=0, atol=0)


def write_demo_like_cache(cache: Path, n_per_class: int = 10, n_points: int = 256, image_dim: int = 64,
                          text_dim: int = 96, variants: int = 3, seed: int = 0, views: int = 1) -> Path:
    """A cache shaped like the demo's: four categories of clouds that stay distinct under rotation
    about Y (rod, disk, ball, shell), two test shapes per category; teacher stores like
    efficientnet + MiniLM: image features with large per-dimension offsets (up to 1.6), std ≈ 0.26,
    about half of it between categories; unit-norm text features sharing one dominant direction
    (per-dimension std ≈ 0.04), so that SmoothL1 on raw text targets has almost no signal. ``views`` > 1:
    that many rendered views per shape, each with its own view-specific part (the default draws are unchanged)."""
    import polars as pl

    from pipeline.store import ArraySpec, StoreWriter
    rng = np.random.default_rng(seed)
    categories = ["ball", "disk", "rod", "shell"]
    ids, cats, splits, clouds = [], [], [], []
    for c, name in enumerate(categories):
        for i in range(n_per_class):
            x = rng.normal(size=(n_points, 3))
            if name == "shell":
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            x *= {"ball": (1, 1, 1), "disk": (1, 0.15, 1), "rod": (0.15, 1, 0.15), "shell": (1, 1, 1)}[name]
            x *= rng.uniform(0.85, 1.15, size=3)
            ids.append(f"{name}-{i}")
            cats.append(name)
            splits.append("test" if i < 2 else "train")
            clouds.append((x / np.linalg.norm(x, axis=1).max()).astype(np.float32))
    cache.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    pl.DataFrame({"id": ids, "synset": [""] * n, "category": cats, "split": splits, "mesh_path": [""] * n,
                  "status": ["indexed"] * n}).write_parquet(cache / "shapes.parquet")
    label = np.array([categories.index(c) for c in cats])
    offset = rng.uniform(0, 1.6, image_dim)
    image = offset + 0.26 * (0.75 * rng.normal(size=(len(categories), image_dim))[label][:, None, None]
                             + 0.45 * rng.normal(size=(n, 1, 1, image_dim))
                             + 0.5 * rng.normal(size=(n, 1, variants, image_dim)))
    if views > 1:   # each view sees the shape differently: a per-view part on top of the shape's own
        image = image + 0.3 * rng.normal(size=(n, views, 1, image_dim))
    common = rng.normal(size=text_dim)
    text = (3 * common / np.linalg.norm(common) + 2 * rng.normal(size=(len(categories), 1, text_dim)) / np.sqrt(text_dim)
            + 0.1 * rng.normal(size=(len(categories), 6, text_dim)) / np.sqrt(text_dim))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    for path, rows, spec, data in (
            (cache / "points.zarr", ids, {"points": ArraySpec((n_points, 3), "float32", n)}, {"points": np.stack(clouds)}),
            (cache / "teachers" / "image.zarr", ids, {"features": ArraySpec((views, variants, image_dim), "float16", n)},
             {"features": image.astype(np.float16)}),
            (cache / "teachers" / "text.zarr", categories, {"features": ArraySpec((6, text_dim), "float16", 4)},
             {"features": text.astype(np.float16)})):
        writer = StoreWriter.open(path, rows, spec, {"synthetic": "demo-like"})
        writer.write_rows(np.arange(len(rows)), data, np.ones(len(rows), bool))
        writer.finalise()
    return cache


def test_image_distillation_learns_shape_specific_targets(tmp_path):
    """Through the dataset's pairing of clouds and targets, the IMG query learns more than the
    mean target: its loss falls well below the constant-predictor baseline (stop-grad on)."""
    stores = open_pretrain_stores(write_synthetic_cache(tmp_path / "c", n_per_class=8))
    targets = stores.image[stores.rows][:, :, 1].reshape(-1, stores.image_dim).astype(np.float64)
    baseline = smooth_l1_to_mean(targets, targets)
    dataset = PretrainDataset(stores, n_points=128)
    torch.manual_seed(0)
    model = ReConPretrain(ReConConfig(**{**TINY_MODEL, "drop_path_rate": 0.0}, img_feat_dim=stores.image_dim,
                                      text_feat_dim=stores.text_dim, targets=("rec", "img")))
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, 1e-3), lr=1e-3)
    losses = []
    # 240 steps: with the reference initialisation the reconstruction loss starts ~7x higher and
    # reshapes the patch tokens the queries read early on (150 steps reach 0.82x the baseline, 240 0.43x)
    for step in range(240):
        dataset.set_epoch(step)
        batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
        out = model(batch["points"], batch["img"])
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["loss_img"].item())
    print(f"loss_img first {losses[0]:.3f}, last-10 mean {np.mean(losses[-10:]):.3f}, baseline {baseline:.3f}")
    assert losses[0] > baseline                       # starts above the mean predictor
    assert np.mean(losses[-10:]) < 0.7 * baseline     # and ends well below it


def test_distillation_learns_in_a_demo_like_regime(tmp_path):
    """Unit-norm text targets with a dominant shared direction, image targets with large offsets,
    four categories, a short schedule (192 steps): with standardised targets, the cosine loss and
    precise BatchNorm statistics, both distillation losses on the *held-out* shapes end well below
    the loss of predicting the mean target (the demo's own failure: they sat at it)."""
    cache = write_demo_like_cache(tmp_path / "c")
    p = tiny_params(epochs=24, split="train", target_norm="store", global_loss="cosine", lr=1e-3,
                    monitor_every=24, bn_recalibrate=64, keep_last=1)
    last = train(p, cache, tmp_path / "p", log=lambda *_: None)["history"][-1]
    print({k: round(v, 3) for k, v in last.items() if k.endswith("ratio")})
    assert last["test_loss_img_ratio"] < 0.8 and last["test_loss_text_ratio"] < 0.6
    assert last["train_loss_img_ratio"] < 0.8 and last["train_loss_text_ratio"] < 0.6


def test_batchnorm_recalibration_is_the_average_over_the_clouds():
    """Precise BN: the running statistics become the mean and (unbiased) variance of each BatchNorm
    input over the given clouds; the weights and the global RNG are untouched."""
    from recon.network.model import recalibrate_batchnorm
    from recon.network.pointops import group_points

    torch.manual_seed(0)
    model = ReConPretrain(ReConConfig(**TINY_MODEL)).eval()
    clouds = torch.rand(6, 128, 3) - 0.5
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    embed = model.encoder.patch_embed
    neighborhood, _ = group_points(clouds, 8, 16)

    def eval_vs_train_mode() -> float:
        with torch.no_grad():
            eval_tokens = embed(neighborhood)
            embed.train()
            train_tokens = embed(neighborhood)
            embed.eval()
        return float((eval_tokens - train_tokens).norm() / train_tokens.norm())

    assert eval_vs_train_mode() > 0.5          # initial running statistics (0, 1): eval mode is another network
    rng = torch.get_rng_state()
    recalibrate_batchnorm(model, clouds, batch=6)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    x = embed._pointwise(embed.conv1, neighborhood.reshape(-1, 3))
    torch.testing.assert_close(embed.bn1.running_mean, x.mean(0))
    torch.testing.assert_close(embed.bn1.running_var, x.var(0, unbiased=True))
    assert not model.training and not embed.bn1.training and embed.bn1.momentum == 0.1
    assert eval_vs_train_mode() < 1e-2         # now the same up to the unbiased/biased variance factor


def test_projection_norms_are_recalibrated_on_fully_visible_queries(cache, tmp_path):
    """``proj_norm: batch``: precise BN sets the projection norms' statistics to the mean and variance
    of the IMG/TXT queries with every group visible (what evaluation feeds them, not the masked
    training input), after the patch embedding's; a checkpoint carries them, so a reloaded model
    gives the same zero-shot features."""
    from recon.network.model import recalibrate_batchnorm

    torch.manual_seed(0)
    model = ReConPretrain(ReConConfig(**TINY_MODEL, proj_norm="batch")).train()
    clouds = torch.rand(6, 128, 3) - 0.5
    recalibrate_batchnorm(model, clouds, batch=6)
    assert model.training and model.img_norm.training and model.img_norm.momentum == 0.1
    model.eval()
    with torch.no_grad():
        tokens = model.encode(clouds)
    for norm, row in ((model.img_norm, 1), (model.text_norm, 2)):
        torch.testing.assert_close(norm.running_mean, tokens[:, row].mean(0))
        torch.testing.assert_close(norm.running_var, tokens[:, row].var(0, unbiased=True))
    kept = model.img_norm.running_mean.clone()
    recalibrate_batchnorm(model, clouds[:3], batch=6, projections=False)   # the trainer's cheap per-epoch call
    assert torch.equal(model.img_norm.running_mean, kept)

    result = train(tiny_params(epochs=1, model={**TINY_MODEL, "proj_norm": "batch"}, bn_recalibrate=8),
                   cache, tmp_path / "w", log=lambda *_: None)
    trained = result["model"].eval()
    assert trained.img_norm.num_batches_tracked > 0
    reloaded = load_pretrained(trainstate.latest(tmp_path / "w" / "checkpoints"))
    x = torch.rand(2, 128, 3) - 0.5
    for a, b in zip(reloaded.zero_shot_features(x), trained.zero_shot_features(x)):
        torch.testing.assert_close(a, b)


def test_model_file_is_replaced_atomically(tmp_path, monkeypatch):
    """A save killed half-way (here: torch.save raising after writing some bytes) leaves the
    previous model.pt intact and readable."""
    path = trainstate.save_atomic(tmp_path / "model.pt", {"w": torch.ones(3)})

    def torn_save(obj, f):
        f.write(b"half a pickle")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        trainstate.save_atomic(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    torch.testing.assert_close(trainstate.load(path)["w"], torch.ones(3))
