"""Results that fit a screen: each stage declares in dvc.yaml a small headline metrics file (a flat
dict of the numbers compared across experiments, chosen in one place per stage) and keeps every other
figure in an undeclared details file beside it. The committed demo results are the fixtures."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from recon.downstream.metrics import summarise_seeds
from stages import evaluate, export, finetune, pretrain
from stages.common import check_headline, details_path, write_metrics

METRICS = ROOT / "cache" / "metrics"
#: the most metric columns `dvc metrics show` / `dvc exp show` may print for the demo
BUDGET = 40
#: the longest column name: `dvc exp show` makes a column as wide as its name, and a sweep over a
#: pretraining parameter changes eight of them (tests/test_dvc.py draws that table);
#: the demo's are at most 12 characters, few-shot's random-init std (``fs_5w10s_sd_rand``) 16
NAME_LIMIT, DEMO_NAME_LIMIT = 16, 12

#: every metrics file dvc.yaml declares -> the stage's headline of its details
HEADLINES = {
    "cache/metrics/pretrain/metrics.json": pretrain.headline,
    "cache/metrics/finetune/metrics.json": lambda d: finetune.headline(d, "classification"),
    "cache/metrics/partseg/metrics.json": lambda d: finetune.headline(d, "partseg"),
    "cache/metrics/evaluate/metrics.json": evaluate.headline,
    "cache/metrics/export/check.json": export.headline,
    "cache/metrics/export/partseg_check.json": export.headline,
}


def details(path: str) -> dict:
    """The committed details beside a declared headline file."""
    return json.loads(details_path(ROOT / path).read_text())


def declared(kind: str) -> list[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [next(iter(e)) if isinstance(e, dict) else e for s in stages.values() for e in s.get(kind, [])]


def is_flat_numbers(headline: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in headline.items())


def test_pretrain_headline_is_the_heldout_ratios_and_probes_against_random_init():
    d = details("cache/metrics/pretrain/metrics.json")
    assert isinstance(d["probe"], dict) and len(d) > 30          # a realistic details dict: nested, long
    h = pretrain.headline(d)
    assert is_flat_numbers(h) and h == {
        "img_ratio": d["test_loss_img_ratio"], "text_ratio": d["test_loss_text_ratio"], "knn": d["probe_knn"],
        "knn_rand": d["probe_knn_random_init"], "knn_rand_sd": d["probe_knn_random_init_std"]}
    assert h["knn"] == d["probe"]["pretrained"]["knn"]
    # the random-init figure is the strongest BatchNorm treatment's
    assert h["knn_rand"] == d["probe"]["verdict"]["knn"]["random_init"]
    # a run without the monitor has no probe: its last training loss stands in
    assert pretrain.headline({k: v for k, v in d.items() if not k.startswith(("test_", "probe"))}) == {"loss": d["loss"]}


def test_finetune_headline_single_seed_and_seed_sweep():
    d = details("cache/metrics/finetune/metrics.json")
    assert "per_class_acc" in d
    h = finetune.headline(d, "classification")
    assert h == {"ft_acc": d["test_acc"], "ft_vote": d["test_vote_acc"]}
    # with a validation split the figure that may choose a run is in the headline too
    assert finetune.headline({**d, "val_acc": 91.0}, "classification") == {"ft_val": 91.0, **h}
    other = {**d, "seed": 1, "test_acc": d["test_acc"] - 10, "test_vote_acc": d["test_vote_acc"] - 5}
    sweep = summarise_seeds([d, other], "classification")
    h = finetune.headline(sweep, "classification")
    # a sweep's mean under the single run's name (the same column in `dvc exp show`), its std beside it
    assert is_flat_numbers(h) and h == {
        "ft_acc": pytest.approx(d["test_acc"] - 5), "ft_acc_sd": pytest.approx(5),
        "ft_vote": pytest.approx(d["test_vote_acc"] - 2.5), "ft_vote_sd": pytest.approx(2.5)}


def test_partseg_headline_is_the_instance_miou():
    d = details("cache/metrics/partseg/metrics.json")
    assert "per_category_miou" in d
    h = finetune.headline(d, "partseg")
    assert h == {"miou": d["test_instance_miou"]} and "test_class_miou" in d   # the class mIoU: details
    sweep = summarise_seeds([d, {**d, "seed": 1, "test_instance_miou": 40.0}], "partseg")
    assert finetune.headline(sweep, "partseg") == {
        "miou": pytest.approx((d["test_instance_miou"] + 40) / 2),
        "miou_sd": pytest.approx(abs(d["test_instance_miou"] - 40) / 2)}


def test_evaluate_headline_svm_and_zeroshot_pretrained_and_random_init():
    d = details("cache/metrics/evaluate/metrics.json")
    h = evaluate.headline(d)
    # the random-init figure of each probe is the strongest BatchNorm treatment (the verdict's)
    treatments = d["random_init"]["bn_treatments"]
    assert d["verdict"]["svm"]["random_init"] == max(t["svm"]["test_acc"] for t in treatments.values())
    assert is_flat_numbers(h) and h == {
        "svm": d["svm"]["test_acc"], "zs_top1": d["zeroshot"]["top1_acc"],
        "svm_rand": d["verdict"]["svm"]["random_init"], "zs_top1_rand": d["verdict"]["zeroshot_top1"]["random_init"]}
    alone = {k: v for k, v in d.items() if k not in ("random_init", "verdict")}   # no baseline, only svm
    assert evaluate.headline({**alone, "zeroshot": {}}) == {"svm": h["svm"]}
    few = copy.deepcopy(d)
    few["fewshot"] = {"5way10shot": {"mean": 80.0, "std": 4.0, "folds": [76.0, 84.0]}}
    assert evaluate.headline(few) == {**h, "fs_5w10s": 80.0, "fs_5w10s_sd": 4.0}


def test_export_headline_is_the_difference_and_ok_per_model():
    classifier = details("cache/metrics/export/check.json")
    assert export.headline(classifier) == {"onnx_ok": True} and classifier["max_abs_diff"] <= classifier["atol"]
    seg = details("cache/metrics/export/partseg_check.json")
    assert export.headline(seg) == {"seg_onnx_ok": True}
    assert export.headline({**classifier, "max_abs_diff": 1e-3, "atol": 1e-4})["onnx_ok"] is False
    assert export.headline({k: v for k, v in classifier.items() if k != "max_abs_diff"}) == {}   # --no-check


def test_dvc_yaml_declares_only_headlines_within_the_column_budget():
    metrics = declared("metrics")
    assert set(metrics) == set(HEADLINES), "a new metrics file needs its headline here"
    assert not [p for p in metrics + declared("plots") if Path(p).name.endswith("details.json")]
    # each details file is an uncached out of its stage (DVC removes it before a rerun, git keeps it)
    assert sorted(p for p in declared("outs") if Path(p).name.endswith("details.json")) == sorted(
        str(details_path(Path(m))) for m in metrics)
    columns = 0
    for path in metrics:
        committed = json.loads((ROOT / path).read_text())
        assert is_flat_numbers(committed), path
        assert committed == HEADLINES[path](details(path)), f"{path} is not the headline of its details"
        columns += len(committed)
    assert columns <= BUDGET
    # still within the budget when fine-tuning and part segmentation sweep seeds with a validation split
    ft = details("cache/metrics/finetune/metrics.json")
    ps = details("cache/metrics/partseg/metrics.json")
    sweeps = (len(finetune.headline(summarise_seeds([{**ft, "val_acc": 90.0}] * 2), "classification"))
              + len(finetune.headline(summarise_seeds([ps] * 2, "partseg"), "partseg")))
    assert columns - 4 + sweeps <= BUDGET
    few = copy.deepcopy(details("cache/metrics/evaluate/metrics.json"))   # with few-shot, baseline included
    few["fewshot"] = few["random_init"]["fewshot"] = {"5way10shot": {"mean": 80.0, "std": 4.0}}
    demo = [k for path in metrics for k in json.loads((ROOT / path).read_text())]
    names = [*demo, *evaluate.headline(few),
             *finetune.headline(summarise_seeds([{**ft, "val_acc": 90.0}] * 2), "classification")]
    assert "fs_5w10s_sd_rand" in names and "ft_acc_sd" in names
    assert max(map(len, demo)) <= DEMO_NAME_LIMIT and max(map(len, names)) <= NAME_LIMIT


def test_dvc_metrics_show_fits_the_budget():
    """What `dvc metrics show` prints for the committed demo results: at most BUDGET columns."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)[""]["data"]
    assert set(shown) == set(HEADLINES)
    files = [f["data"] for f in shown.values()]
    assert all(is_flat_numbers(f) for f in files)
    assert sum(len(f) for f in files) <= BUDGET and len({k for f in files for k in f}) == sum(len(f) for f in files)


def test_write_metrics_writes_details_and_headline(tmp_path):
    d = details("cache/metrics/evaluate/metrics.json")
    path = write_metrics(tmp_path / "evaluate" / "metrics.json", d, evaluate.headline(d))
    assert json.loads(path.read_text()) == evaluate.headline(d)
    assert json.loads((tmp_path / "evaluate" / "details.json").read_text()) == d
    assert sorted(p.name for p in path.parent.iterdir()) == ["details.json", "metrics.json"]   # no temporary left
    assert details_path(tmp_path / "check.json") == tmp_path / "check_details.json"
    with pytest.raises(ValueError, match="numbers only"):
        check_headline({"svm": {"test_acc": 1.0}})
    with pytest.raises(ValueError, match="numbers only"):
        write_metrics(tmp_path / "x" / "metrics.json", d, {"checkpoint": "model.pt"})
    assert not (tmp_path / "x").exists()
