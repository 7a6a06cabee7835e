"""The ablation study (`recon study --quick`): every arm, equal budgets, figures that agree with a
recomputation, results reused on a rerun."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_pretrain import write_demo_like_cache

from pipeline.convert import convert_points
from recon.downstream.cls_data import load_classification
from recon.downstream.study import ARMS, frozen_probe
from recon.network.pointops import fps_indices


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from stages import study as stage

    root = tmp_path_factory.mktemp("study")
    cache = write_demo_like_cache(root / "cache", n_per_class=6, n_points=256)
    store = convert_points(cache, root / "demo.zarr", 256, log=lambda *_: None, fps=fps_indices).path
    (root / "params.yaml").write_text("pretrain:\n  split: train\n  target_norm: store\n  global_loss: cosine\n"
                                      "  schedule: step\n  device: cpu\n")
    import os
    os.environ["RECON_PARAMS"] = str(root / "params.yaml")
    try:
        p = stage.params({"out": str(root / "study"), "demo_store": str(store), "quick": True, "device": "cpu"})
        summary = stage.run(p, cache)
        logs: list[str] = []
        from recon.downstream.study import run_study
        again = run_study(stage.study_params(p, {"demo": str(store)}), cache, root / "study", log=logs.append)
    finally:
        del os.environ["RECON_PARAMS"]
    return root, store, summary, again, logs


def test_every_arm_with_equal_budgets(study):
    root, _, summary, _, _ = study
    arms = summary["arms"]
    assert list(arms) == ["random_init", "rec_only", "distill_only", "recon_raw", "recon_std"]
    budget = {k: v for k, v in arms["recon_std"]["params"].items()
              if k not in ("targets", "target_norm", "global_loss", "bn_recalibrate")}
    for arm, r in arms.items():
        assert {k: v for k, v in r["params"].items() if k in budget} == budget, arm   # same schedule and data
        for key, value in (ARMS[arm] or {}).items():
            assert r["params"][key] == value, (arm, key)
        assert len(r["history"]) == (0 if arm == "random_init" else 2)
    assert arms["recon_raw"]["params"]["target_norm"] == "none" and arms["recon_std"]["params"]["target_norm"] == "store"
    main, treatments, verdicts = ((root / "study" / "table.md").read_text().split("\n\n")[k].splitlines()
                                  for k in (0, 2, 4))
    assert len(main) == 2 + 5 and all("| demo | " in line for line in main[2:])
    assert len(treatments) == 2 + 5 * 3 and len(verdicts) == 2 + 4                # every arm x treatment; 4 verdicts
    assert (root / "study" / "probe_vs_epochs.png").stat().st_size > 5000


def test_figures_agree_with_a_recomputation(study):

    root, store, summary, _, _ = study
    train, test = load_classification(store, "train"), load_classification(store, "test")
    for arm, r in summary["arms"].items():
        s = r["stores"]["demo"]
        for key in ("knn", "svm", "svm_std"):
            assert round(s[key] * len(test) / 100, 6).is_integer(), (arm, key)   # a count of test shapes
        ft = s["finetune"]
        assert len(ft["values"]) == 2 and ft["mean"] == pytest.approx(np.mean(ft["values"]))
        assert ft["std"] == pytest.approx(np.std(ft["values"]))
        folds = s["fewshot"]["2way2shot"]["folds"]
        assert len(folds) == 2 and s["fewshot"]["2way2shot"]["mean"] == pytest.approx(np.mean(folds))
    # the random-init row is a fresh, seeded network of the arms' configuration (BatchNorm statistics as
    # initialised); recomputing it gives the same figures, a pretrained arm others
    from recon.downstream.study import StudyParams, encoder_for
    p = StudyParams(**{k: v for k, v in json.loads((root / "study" / "results.json").read_text()).items()
                       if k in ("finetune_seeds", "fewshot", "stores")},
                    pretrain=summary["arms"]["random_init"]["params"], device="cpu")
    model, history = encoder_for(p, "random_init", root / "cache", root / "unused")
    assert history == [] and not (root / "unused").exists()
    again = frozen_probe(model, train, test, 256, 5, 0, "cpu")
    assert {k: again[k] for k in ("knn", "svm", "svm_std")} == \
        {k: summary["arms"]["random_init"]["stores"]["demo"][k] for k in ("knn", "svm", "svm_std")}
    history = summary["arms"]["recon_std"]["history"]
    assert history[0]["probe_knn_random_init"] == history[1]["probe_knn_random_init"]


def test_every_arm_under_every_bn_treatment_and_the_verdict(study):
    """The frozen probes of every arm under each BatchNorm treatment (the arm's own figures: as saved),
    the random-init arm's reset = its saved (statistics as initialised), and each pretrained arm's
    verdict: its saved figure against the random-init arm's strongest treatment."""
    from recon.downstream.study import frozen_probes
    from recon.pretraining.probes import BN_TREATMENTS

    root, store, summary, _, _ = study
    for arm, r in summary["arms"].items():
        s = r["stores"]["demo"]
        assert list(s["bn_treatments"]) == list(BN_TREATMENTS), arm
        assert {k: s["bn_treatments"]["saved"][k] for k in ("knn", "svm", "svm_std")} == \
            {k: s[k] for k in ("knn", "svm", "svm_std")}
    baseline = summary["arms"]["random_init"]["stores"]["demo"]["bn_treatments"]
    assert baseline["reset"] == baseline["saved"]
    assert set(summary["verdict"]["demo"]) == set(summary["arms"]) - {"random_init"}
    for arm, verdicts in summary["verdict"]["demo"].items():
        for key, v in verdicts.items():
            assert v["pretrained"] == summary["arms"][arm]["stores"]["demo"][key]
            assert v["pretrained_treatment"] == "saved"
            assert v["random_init"] == max(b[key] for b in baseline.values())
            assert baseline[v["random_init_treatment"]][key] == v["random_init"]
    # recomputed: the random-init arm under every treatment (recalibrated on the store's seeded train clouds)
    from recon.downstream.study import StudyParams, encoder_for
    p = StudyParams(pretrain=summary["arms"]["random_init"]["params"], device="cpu")
    model, _ = encoder_for(p, "random_init", root / "cache", root / "unused")
    train, test = load_classification(store, "train"), load_classification(store, "test")
    again = frozen_probes(model, train, test, 256, 5, 0, "cpu", list(BN_TREATMENTS), p.bn_recalibrate)
    assert again == baseline


def test_a_rerun_reuses_finished_arms(study):
    _, _, summary, again, logs = study
    assert again == summary
    assert sum("reusing" in line for line in logs) == 5
