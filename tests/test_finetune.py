"""Fine-tuning: heads, protocols (gradients, frozen BN), voting, init sources, exact resume, and a
tiny end-to-end run on the real ModelNet40 sample that writes every metrics file."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import shared_dir
from recon.downstream import cls_data as CD
from recon.downstream import finetune as FT
from recon.downstream import inference as INF
from recon.downstream import recipes as R
from recon.downstream import weights as W
from recon.network.model import ReConClassifier, ReConConfig, ReConPretrain
from recon.network.pointops import fps_indices
from recon.network.reference import ours_to_reference
from recon.runtime import trainstate
from recon.runtime.optim import param_groups

TINY = dict(trans_dim=48, depth=2, num_heads=3, decoder_depth=1, decoder_num_heads=3)
SMALL_RUN = dict(init="scratch", model=TINY, n_points=128, num_group=8, group_size=16, batch_size=8,
                 epochs=2, warmup_epochs=1, lr=1e-3, votes=2, eval_batch=32, device="cpu")



def tiny_cfg(**kw) -> ReConConfig:
    return ReConConfig.variant("tiny", **{**TINY, "num_group": 8, "group_size": 16, **kw})


def synthetic(n_per_class: int = 6, classes: int = 3, points: int = 160, seed: int = 0) -> CD.ClsData:
    """Classes = anisotropic blobs elongated along different axes (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    pts, labels = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            scale = np.full(3, 0.3)
            scale[c % 3] = 1.0
            pts.append(rng.normal(size=(points, 3)) * scale)
            labels.append(c)
    return CD.ClsData(np.asarray(pts, np.float32), np.asarray(labels), np.array([f"s{i}" for i in range(len(labels))]),
                      [f"c{c}" for c in range(classes)])


@pytest.mark.parametrize("head,layers", [("full", 9), ("mlp3", 9), ("linear", 1)])
def test_head_shapes(head, layers):
    model = ReConClassifier(tiny_cfg(), num_classes=7, head=head).eval()
    assert len(model.head) == layers and model.head[0].in_features == 4 * 48
    assert model(torch.randn(3, 128, 3)).shape == (3, 7)


@pytest.mark.parametrize("protocol", ["full", "mlp3", "linear"])
def test_gradients_and_frozen_bn_per_protocol(protocol):
    torch.manual_seed(0)
    p = R.FinetuneParams(protocol=protocol, **SMALL_RUN)
    model = W.build_classifier(p, num_classes=4).train()
    bn_before = model.encoder.patch_embed.bn1.running_mean.clone()
    head_bn = model.head[1].running_mean.clone() if protocol != "linear" else None
    nn.functional.cross_entropy(model(torch.randn(4, 128, 3)), torch.tensor([0, 1, 2, 3])).backward()
    has_grad = {n for n, q in model.named_parameters() if q.grad is not None and q.grad.abs().sum() > 0}
    everything = {n for n, _ in model.named_parameters()}
    trainable = {n for n in everything if n.startswith("head.") or n in ("encoder.cls_token", "encoder.cls_pos")}
    if protocol == "full":
        assert has_grad == everything
        assert not torch.equal(bn_before, model.encoder.patch_embed.bn1.running_mean)
    else:
        assert has_grad == trainable
        assert {n for n, q in model.named_parameters() if q.requires_grad} == trainable
        assert torch.equal(bn_before, model.encoder.patch_embed.bn1.running_mean)   # frozen statistics
        assert not model.encoder.training
        if head_bn is not None:
            assert not torch.equal(head_bn, model.head[1].running_mean)            # the head's BN trains
    assert model.head_kind == protocol
    groups = param_groups(model, 0.05, 1e-3, FT.BOOSTED, 10.0)
    boosted = {id(q) for g in groups if g["lr_scale"] == 10.0 for q in g["params"]}
    named = dict(model.named_parameters())
    assert boosted == {id(named[n]) for n in trainable}                            # head + [CLS] at 10x lr


class MeanLogits(nn.Module):
    """logits = [mean x, mean y, mean z] · W: depends on the augmentation of each pass."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x.mean(1) + x.std(1))


def test_voting_averages_logits_of_augmented_passes():
    torch.manual_seed(0)
    model = MeanLogits()
    superset = np.random.default_rng(0).normal(size=(5, 60, 3)).astype(np.float32)
    views = list(CD.vote_views(superset, 40, 3, "scale", seed=1))
    assert len(views) == 3 and views[0].shape == (5, 40, 3) and not np.allclose(views[0], views[1])
    expected = np.mean([INF.predict_logits(model, v) for v in views], axis=0)
    np.testing.assert_allclose(INF.vote_logits(model, superset, 40, 3, "scale", seed=1), expected, rtol=1e-6)
    single = INF.predict_logits(model, superset[:, :40])
    assert not np.allclose(single, expected)


def test_superset_sampling_and_augmentation():
    data = synthetic(2, 2, points=300)
    recipe = R.FinetuneParams(profile="modelnet40", n_points=128).recipe()
    sup = CD.prepare(data, recipe)
    assert CD.superset_size(1024, 8192) == 1200 and CD.superset_size(2048, 2048) == 2048
    assert sup.shape == (4, 150, 3)                                  # ceil(128 * 1.171875)
    normed = CD.normalize(data.points[0])
    first = CD.eval_clouds(data, 128)[0]
    np.testing.assert_allclose(sup[0, :128], first)                 # FPS prefix = FPS to n_points
    assert np.isclose(np.linalg.norm(normed, axis=1).max(), 1.0)
    rng = np.random.default_rng(0)
    moved = CD.augment(np.ones((10, 3), np.float32), "scale_translate", rng)
    assert np.all(moved > 2 / 3 - 0.2 - 1e-6) and np.all(moved < 1.5 + 0.2 + 1e-6)
    assert np.allclose(moved, moved[0])                              # one scale/translation per cloud


def save_tiny_pretrain(path: Path) -> ReConPretrain:
    torch.manual_seed(1)
    model = ReConPretrain(tiny_cfg(img_feat_dim=24, text_feat_dim=20))
    torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(model.cfg.__dict__, default=list)),
                "categories": ["a"]}, path)
    return model


@pytest.mark.parametrize("kind", ["ours", "epoch", "reference"])
def test_init_from_pretraining_checkpoints(tmp_path, kind):
    pre = save_tiny_pretrain(tmp_path / "model.pt")
    path = tmp_path / "model.pt"
    if kind == "epoch":
        opt = torch.optim.AdamW(pre.parameters())
        path = trainstate.save(tmp_path / "ckpts", 4, {
            "model": pre.state_dict(), "optimizer": opt.state_dict(), "epoch": 4, "rng": trainstate.rng_state(),
            "config": json.loads(json.dumps(dataclasses.asdict(pre.cfg)))})
    if kind == "reference":
        path = tmp_path / "ckpt.pth"
        torch.save({"base_model": {f"module.{k}": v for k, v in ours_to_reference(pre.state_dict()).items()},
                    "epoch": 3}, path)
    init = W.load_init(str(path))
    p = R.FinetuneParams(**{**SMALL_RUN, "init": str(path), "model": {}})
    model = W.build_classifier(p, 5, init)
    assert model.cfg.trans_dim == 48 and model.cfg.depth == 2 and model.cfg.drop_path_rate == 0.2
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, pre.encoder.state_dict()[name]), name


def test_voting_and_training_augmentation_follow_the_reference_per_dataset():
    """Reference runner: ModelNet trains with scale+translate and votes with scale; ScanObjectNN
    PB_T50_RS votes with rotation, OBJ_BG / OBJ_ONLY (and few-shot) vote without augmentation;
    everything but ModelNet trains with rotation."""
    votes = {name: R.PROFILES[name].vote_augment for name in R.PROFILES}
    assert votes == {"scanobjectnn": "rotate", "scanobjectnn-hardest": "rotate", "scanobjectnn-objbg": "none",
                     "scanobjectnn-objonly": "none", "modelnet40": "scale", "modelnet40-8k": "scale",
                     "fewshot": "none", "demo": "scale"}
    assert {R.PROFILES[n].augment for n in R.SCANOBJECTNN_VARIANTS} | {R.PROFILES["fewshot"].augment} == {"rotate"}
    assert R.PROFILES["modelnet40"].augment == "scale_translate"
    store = {"format": "scanobjectnn", "variant": "OBJ_BG"}
    R.FinetuneParams(profile="scanobjectnn-objbg").check_store(store)
    with pytest.raises(ValueError, match="use profile 'scanobjectnn-objbg'"):
        R.FinetuneParams(profile="scanobjectnn").check_store(store)
    R.FinetuneParams(profile="modelnet40").check_store({"format": "modelnet40"})


@pytest.mark.parametrize("schedule", [None, "epoch"])
def test_schedule_granularity_per_profile(monkeypatch, schedule):
    """Paper profiles step the learning rate per epoch, the demo per step; either can be chosen."""
    assert {n: p.schedule for n, p in R.PROFILES.items() if p.schedule != "epoch"} == {"demo": "step"}
    seen = []
    real_set_lr = FT.set_lr
    monkeypatch.setattr(FT, "set_lr", lambda opt, lr: (seen.append(lr), real_set_lr(opt, lr)))
    p = R.FinetuneParams(**{**SMALL_RUN, "epochs": 3, "votes": 0, "batch_size": 4, "schedule": schedule})
    result = FT.finetune(p, synthetic(4, 3), None, seed=0, log=lambda *_: None)
    per_epoch = result.history[0]["step"]
    assert per_epoch > 1 and len(seen) == 3 * per_epoch
    rates_in_epoch_1 = set(seen[per_epoch:2 * per_epoch])
    assert len(rates_in_epoch_1) == (1 if schedule == "epoch" else per_epoch)
    with pytest.raises(ValueError, match="unknown schedule"):
        R.FinetuneParams(schedule="batch").recipe()


def test_exact_resume_and_validation_selection(tmp_path):
    data = synthetic(4, 3)
    p = R.FinetuneParams(**{**SMALL_RUN, "epochs": 3, "votes": 0, "val_fraction": 0.25})
    straight = FT.finetune(p, data, None, seed=3, out=tmp_path / "a", log=lambda *_: None)
    assert straight.metrics["selection"] == "best validation accuracy" and straight.metrics["val_shapes"] == 3
    best = max(straight.history, key=lambda r: r["val_acc"])
    assert straight.metrics["selected_epoch"] == best["epoch"]
    steps_per_epoch = straight.history[0]["step"]
    FT.finetune(R.FinetuneParams(**{**p.__dict__, "max_steps": steps_per_epoch}), data, None, seed=3,
                out=tmp_path / "b", log=lambda *_: None)
    assert [c.name for c in (tmp_path / "b" / "checkpoints").iterdir()] == ["epoch-0000.pt"]
    resumed = FT.finetune(p, data, None, seed=3, out=tmp_path / "b", log=lambda *_: None)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / "b" / "history.csv").unlink()  # a rerun of the finished run rewrites its outputs
    again = FT.finetune(p, data, None, seed=3, out=tmp_path / "b", log=lambda *_: None)
    assert (tmp_path / "b" / "history.csv").read_text().count("\n") == 4
    assert again.metrics == resumed.metrics
    tr, val = CD.stratified_split(data.labels, 0.25, seed=3)
    assert np.bincount(data.labels[val]).tolist() == [1, 1, 1] and len(np.intersect1d(tr, val)) == 0


def test_end_to_end_on_real_modelnet40_sample(tmp_path, monkeypatch):
    root = shared_dir() / "data" / "modelnet40_sample"
    if not root.is_dir():
        pytest.skip(f"real ModelNet40 sample not present at {root}")
    from pipeline.convert import convert_modelnet
    from stages import finetune as stage

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    store = convert_modelnet(root, tmp_path / "mn40.zarr", n_points=192, log=lambda *_: None, fps=fps_indices).path
    save_tiny_pretrain(tmp_path / "model.pt")
    p = stage.params(dict(profile="modelnet40", store=str(store), init=str(tmp_path / "model.pt"),
                          **{**{k: v for k, v in SMALL_RUN.items() if k not in ("init", "model")},
                             "seeds": [0, 1], "batch_size": 16}))
    out = tmp_path / "finetune"
    summary = stage.run(p, out)
    assert summary["seeds"] == [0, 1] and len(summary["per_seed"]) == 2
    accs = [m["test_acc"] for m in summary["per_seed"]]
    assert summary["test_acc_mean"] == pytest.approx(np.mean(accs)) and summary["test_acc_std"] == pytest.approx(np.std(accs))
    published = tmp_path / "metrics" / "finetune"  # git-tracked results, next to the run folder
    assert json.loads((published / "details.json").read_text()) == summary
    assert json.loads((published / "metrics.json").read_text()) == {   # the headline dvc.yaml declares
        "ft_acc": summary["test_acc_mean"], "ft_acc_sd": summary["test_acc_std"],
        "ft_vote": summary["test_vote_acc_mean"], "ft_vote_sd": summary["test_vote_acc_std"]}
    seed0 = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert seed0["seed"] == 0 and seed0["selection"] == "last epoch" and seed0["epochs"] == 2
    assert seed0["test_shapes"] == 33 and seed0["votes"] == 2
    assert len(seed0["per_class_acc"]) == 33 and seed0["mean_class_acc"] == pytest.approx(seed0["test_acc"])
    with open(published / "confusion.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 33 and set(rows[0]) == {"actual", "predicted"}
    assert sum(r["actual"] == r["predicted"] for r in rows) == round(seed0["test_acc"] * 33 / 100)
    assert (out / "confusion.png").stat().st_size > 1000
    assert len((published / "history.csv").read_text().splitlines()) == 3
    assert not (out / "metrics.json").exists() and not (published / "model.pt").exists()
    model, ckpt = W.load_finetuned(out / "model.pt")
    assert len(ckpt["class_names"]) == 40 and model(torch.randn(2, 128, 3)).shape == (2, 40)
    # the recorded single-pass and voted accuracies are those of the saved (seed 0) model
    test = CD.load_classification(store, "test")
    again = INF.evaluate_classifier(model, test, p.recipe(), votes=2, seed=0, batch=32)
    assert (again["test_acc"], again["test_vote_acc"]) == (seed0["test_acc"], seed0["test_vote_acc"])
    assert seed0["test_vote_acc"] == pytest.approx(100 * np.mean(
        INF.vote_logits(model, CD.prepare(test, p.recipe()), p.recipe().n_points, 2, p.recipe().vote_augment,
                       seed=0, batch=32).argmax(1) == test.labels))


def test_learns_separable_classes():
    """Full fine-tuning from scratch separates three blob shapes; single pass and voting agree.

    Judged in eval mode: on the training shapes (has it fitted them?) and on 48 unseen ones
    (chance 33 %). The running train accuracy is taken under anisotropic scaling, dropout and
    drop-path and swings 77-100 % between epochs; its last value depended on the CPU's float
    summation order (89.58 % on one Xeon), so it is not asserted. Measured on a 2-vCPU Xeon, model
    seeds 0-3, 1 and 2 threads: train (eval) 100 %, test 100 %, voted 97.9-100 %."""
    train, test = synthetic(16, 3, seed=0), synthetic(16, 3, seed=1)
    p = R.FinetuneParams(**{**SMALL_RUN, "profile": "modelnet40", "epochs": 40, "warmup_epochs": 2, "lr": 5e-4,
                            "votes": 3})
    result = FT.finetune(p, train, test, seed=0, log=lambda *_: None)
    on_train = INF.evaluate_classifier(result.model, train, p.recipe(), votes=0, seed=0)
    assert on_train["test_acc"] >= 90
    assert result.metrics["test_acc"] >= 90 and result.metrics["test_vote_acc"] >= 90
    assert abs(result.metrics["test_acc"] - result.metrics["test_vote_acc"]) <= 5


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: trains, and both ranks end with the same parameters."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    data = synthetic(4, 3)
    np.savez(tmp_path / "data.npz", points=data.points, labels=data.labels)
    script = tmp_path / "ddp_finetune.py"
    script.write_text(
        "import sys, numpy as np, torch\n"
        "from recon.downstream import cls_data as CD, finetune as FT, recipes as R\n"
        "from recon.runtime.distributed import setup, teardown\n"
        "d = setup('cpu')\n"
        "z = np.load(sys.argv[1])\n"
        "data = CD.ClsData(z['points'], z['labels'], np.array([f's{i}' for i in range(len(z['labels']))]), ['a', 'b', 'c'])\n"
        f"p = R.FinetuneParams(**{{**{SMALL_RUN!r}, 'votes': 0}})\n"
        "r = FT.finetune(p, data, None, seed=0, d=d, log=print)\n"
        "import os, pathlib\n"  # one file per rank: two ranks' stdout can interleave mid-line
        "pathlib.Path(sys.argv[2], 'digest-' + os.environ['RANK']).write_text(repr(float(sum(v.double().sum() for v in r.model.parameters()))))\n"
        "teardown(d)\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29547", str(script), str(tmp_path / "data.npz"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(tmp_path / f"digest-{rank}").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]


def test_fps_order_memo_returns_the_same_clouds_and_a_private_copy(monkeypatch):
    """The FPS memo: a second call on equal clouds reuses the result (no new FPS), equals a fresh
    computation, and a caller writing into its array cannot corrupt the memo."""
    from recon.downstream import cls_data

    rng = np.random.default_rng(3)
    clouds = rng.normal(size=(5, 300, 3)).astype(np.float32)
    cls_data._FPS_MEMO.clear()
    first = cls_data.fps_order(clouds, 64)
    calls = []
    real = cls_data.fps_indices
    monkeypatch.setattr(cls_data, "fps_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = cls_data.fps_order(clouds.copy(), 64)
    assert calls == [] and np.array_equal(first, second)
    second[:] = 0
    assert np.array_equal(cls_data.fps_order(clouds, 64), first)
    other = cls_data.fps_order(clouds[:, ::-1].copy(), 64)   # other content: computed anew
    assert calls == [1] and not np.array_equal(other, first)
    cls_data._FPS_MEMO.clear()
    assert np.array_equal(cls_data.fps_order(clouds, 64), first)   # memo off the path: same answer
