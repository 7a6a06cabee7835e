"""Part-segmentation fine-tuning: the shared loop learns a synthetic part store, reports the last
epoch, sweeps seeds as mean ± std, and the `recon finetune --task partseg` stage writes its files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.partseg_store import PartSample, write_partseg_store
from recon.downstream import partseg_finetune as PF
from recon.downstream import recipes as R
from recon.downstream.partseg_data import SegData, load_partseg
from recon.runtime.optim import param_groups

PARTS = [[0, 1], [2, 3, 4]]          # category "updown": 2 parts by height; "leftright": 3 parts along x
TINY = dict(trans_dim=48, depth=2, num_heads=3, decoder_depth=1, decoder_num_heads=3)
SMALL_SEG = dict(propagation_dims=[64, 64], head_dims=[64, 32], label_dim=16, dropout=0.0)
RUN = dict(init="scratch", model=TINY, seg=SMALL_SEG, n_points=128, num_group=16, group_size=16, batch_size=4,
           epochs=18, warmup_epochs=1, lr=2e-3, eval_batch=32, device="cpu")


def part_of(xyz: np.ndarray, label: int) -> np.ndarray:
    """Global part ids: height decides for category 0, thirds of x for category 1."""
    if label == 0:
        return np.where(xyz[:, 1] > 0, 0, 1)
    return 2 + np.digitize(xyz[:, 0], [-0.2, 0.2])


def synthetic(n_per_category: int = 8, points: int = 128, seed: int = 0) -> SegData:
    rng = np.random.default_rng(seed)
    pts, parts, labels = [], [], []
    for label in (0, 1):
        for _ in range(n_per_category):
            xyz = rng.uniform(-0.6, 0.6, (points, 3)).astype(np.float32)
            pts.append(xyz), parts.append(part_of(xyz, label)), labels.append(label)
    return SegData(np.asarray(pts), np.asarray(parts, np.int64), np.asarray(labels, np.int64),
                   np.array([f"s{i}" for i in range(len(labels))]), ["updown", "leftright"], PARTS, 5)


def test_feature_blocks_spread_like_the_reference():
    assert PF.feature_blocks_for(12) == (3, 7, 11)
    assert PF.feature_blocks_for(6) == (1, 3, 5) and PF.feature_blocks_for(2) == (0, 1)


def test_only_the_new_layers_get_the_boosted_learning_rate():
    """Parameter names are matched as substrings: the boosted group must be exactly lr_boost_names."""
    p = R.PartSegParams(**RUN)
    model = PF.build_partseg(p, synthetic(2), None)
    names = PF.PartSegTask(p, synthetic(2), None, 0, None, torch.device("cpu")).boosted(model)
    groups = param_groups(model, 0.05, 1e-3, names, 10.0)
    boosted = {id(q) for g in groups if g["lr_scale"] == 10.0 for q in g["params"]}
    named = dict(model.named_parameters())
    assert boosted == {id(named[n]) for n in model.lr_boost_names()} and len(boosted) > 0
    assert not any(n.startswith("encoder.") for n in model.lr_boost_names())


def test_the_loop_learns_parts_and_reports_the_last_epoch(tmp_path):
    """Chance level: a prediction blind to position scores at most 1/3 IoU on the two-part
    category (q/(1+q) + (1-q)/(2-q) over two parts peaks at q = 1/2) and 1/5 on the three-part one
    (uniform guessing), so instance mIoU <= ~27%; the trained network must be far above."""
    train, test = synthetic(8, seed=0), synthetic(4, seed=1)
    p = R.PartSegParams(**RUN)
    result = PF.finetune_partseg(p, train, test, seed=0, out=tmp_path, log=lambda *_: None)
    losses = [r["loss"] for r in result.history]
    # epoch losses jump (0.23 -> 0.92 on one seed), so the last three are averaged
    assert np.mean(losses[-3:]) < 0.5 * losses[0]
    on_train, _, _ = PF.evaluate_partseg(result.model, train, 128)
    assert on_train["instance_miou"] > 70 and set(on_train["per_category"]) == {"updown", "leftright"}
    m = result.metrics
    assert m["selection"] == "last epoch" and m["selected_epoch"] == result.history[-1]["epoch"] == 17
    # the reported figure is the last epoch's model scored once, not the best epoch of the history
    assert m["test_instance_miou"] == pytest.approx(result.history[-1]["test_instance_miou"])
    assert m["test_class_miou"] == pytest.approx(result.history[-1]["test_class_miou"])
    assert m["test_shapes"] == 8 and m["test_instance_miou"] > 60
    assert set(m["per_category_miou"]) == {"updown", "leftright"}
    # the saved model.pt is that model: same predictions, same score
    model, ckpt = PF.load_partseg_model(tmp_path / "model.pt")
    again, _, _ = PF.evaluate_partseg(model, test, 128)
    assert again["instance_miou"] == pytest.approx(m["test_instance_miou"])
    assert ckpt["category_parts"] == PARTS and ckpt["epoch"] == 17
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {"loss", "train_acc", "test_instance_miou", "test_class_miou"} <= set(rows[0])
    assert (tmp_path / PF.PICTURE).stat().st_size > 5000


def test_partseg_profiles_refuse_classification_settings():
    with pytest.raises(ValueError, match="protocol full"):
        R.PartSegParams(protocol="linear").recipe()
    with pytest.raises(ValueError, match="unknown augmentation"):
        R.PartSegParams(augment="rotate").recipe()
    assert R.PartSegParams(profile="shapenetpart").recipe().n_points == 2048
    with pytest.raises(ValueError, match="not a part-segmentation profile"):
        PF.finetune_partseg(R.PartSegParams(profile="demo"), synthetic(2), None, 0)


def write_store(path, data: SegData, splits: list[str]) -> None:
    rows = np.concatenate([data.points, np.zeros_like(data.points), data.part[..., None]], -1)
    samples = [PartSample(str(sid), split, int(label), lambda r=r: rows[r])
               for r, (sid, split, label) in enumerate(zip(data.ids, splits, data.label))]
    write_partseg_store(path, samples, data.class_names, PARTS, data.points.shape[1], {"format": "test"},
                        splits=["train", "val", "test"], chunk_rows=8, log=lambda *_: None)


def test_cli_stage_sweeps_seeds_and_publishes(tmp_path, monkeypatch):
    """`recon finetune --task partseg` reads params.yaml `partseg`, trains on train + val, writes
    mean ± std over seeds to the git-tracked metrics and the first seed's files."""
    from cli import app

    data = synthetic(4, seed=0)
    splits = ["train", "train", "val", "test", "train", "train", "val", "test"]
    write_store(tmp_path / "parts.zarr", data, splits)
    assert len(load_partseg(tmp_path / "parts.zarr", ["train", "val"])) == 6
    params = {"partseg": {**RUN, "store": str(tmp_path / "parts.zarr"), "epochs": 2, "seeds": [0, 1]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["finetune", "--task", "partseg"])
    assert result.exit_code == 0, result.output
    out, published = tmp_path / "cache" / "partseg", tmp_path / "cache" / "metrics" / "partseg"
    summary = json.loads((published / "details.json").read_text())
    assert json.loads((published / "metrics.json").read_text()) == {   # the headline dvc.yaml declares
        "miou": summary["test_instance_miou_mean"], "miou_sd": summary["test_instance_miou_std"]}
    per_seed = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and [m["train_shapes"] for m in per_seed] == [6, 6]
    for key in ("test_instance_miou", "test_class_miou"):
        values = [m[key] for m in per_seed]
        assert summary[f"{key}_mean"] == pytest.approx(np.mean(values))
        assert summary[f"{key}_std"] == pytest.approx(np.std(values))
    assert "per_category_miou" not in summary["per_seed"][0] and summary["per_seed"][0]["test_shapes"] == 2
    assert (published / "history.csv").read_text() == (out / "seed-0" / "history.csv").read_text()
    assert (out / "model.pt").exists() and (out / PF.PICTURE).exists() and not (published / "model.pt").exists()
    # a classification profile under --task partseg is refused with a message, not a traceback
    params["partseg"]["profile"] = "demo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    refused = CliRunner().invoke(app, ["finetune", "--task", "partseg"])
    assert refused.exit_code == 1 and "is a classification recipe" in " ".join(refused.output.split())
