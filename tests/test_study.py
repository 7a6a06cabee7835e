"""The ablation study (`recon study --quick`): every arm, equal budgets, figures that agree with a
recomputation, results reused on a rerun."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_pretrain import write_demo_like_cache

from pipeline.convert import convert_points
from recon.downstream.cls_data import load_classification
from recon.downstream.study import ARMS, frozen_probe
from recon.network.pointops import fps_indices


def study_folder(tmp_path_factory, name: str, views: int = 1):
    """A demo-like cache (6 shapes a class, 256 points, ``views`` rendered views), its classification
    store and a params.yaml with the demo's pretraining choices, in a new folder: (root, cache, store)."""
    root = tmp_path_factory.mktemp(name)
    cache = write_demo_like_cache(root / "cache", n_per_class=6, n_points=256, views=views)
    store = convert_points(cache, root / "demo.zarr", 256, log=lambda *_: None, fps=fps_indices).path
    (root / "params.yaml").write_text("pretrain:\n  split: train\n  target_norm: store\n  global_loss: cosine\n"
                                      "  schedule: step\n  device: cpu\n")
    return root, cache, store


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from stages import study as stage

    root, cache, store = study_folder(tmp_path_factory, "study")
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
    from recon.downstream.evaluate import FewshotSettings
    from recon.downstream.study import StudyParams, encoder_for
    p = StudyParams(pretrain=summary["arms"]["random_init"]["params"], device="cpu")
    model, _ = encoder_for(p, "random_init", root / "cache", root / "unused")
    train, test = load_classification(store, "train"), load_classification(store, "test")
    fewshot = json.loads((root / "study" / "results.json").read_text())["fewshot"]
    settings = FewshotSettings(**{**fewshot, "seed": fewshot.get("seed", 0)})
    again = frozen_probes(model, train, test, 256, 5, 0, "cpu", list(BN_TREATMENTS), p.bn_recalibrate, settings)
    assert again == baseline
    # the few-shot probe: the fine-tuned few-shot's episodes on frozen features, a figure with its verdict
    for treatment in baseline.values():
        assert treatment["fsp"] == np.mean([r["mean"] for r in treatment["fewshot_probe"].values()])
        assert list(treatment["fewshot_probe"]) == list(summary["arms"]["random_init"]["stores"]["demo"]["fewshot"])
    assert all(set(v) == {"knn", "svm", "svm_std", "fsp"} for v in summary["verdict"]["demo"].values())
    assert "| few-shot probe |" in (root / "study" / "table.md").read_text().splitlines()[0]


def test_a_rerun_reuses_finished_arms(study):
    _, _, summary, again, logs = study
    assert again == summary
    assert sum("reusing" in line for line in logs) == 5


# ----------------------------------------------------------------------------- presets


@pytest.fixture(scope="module")
def preset_study(study):
    """`recon study --preset table9 --quick` on the same cache (the Table 9 baselines end to end: pretraining,
    probes, fine-tuning, few-shot), then a rerun of two of its arms without the preset."""
    from recon.downstream.study import run_study
    from stages import study as stage

    root, store, _, _, _ = study
    import os
    os.environ["RECON_PARAMS"] = str(root / "params.yaml")
    try:
        p = stage.params({"out": str(root / "presets"), "demo_store": str(store), "quick": True, "device": "cpu"},
                         ["preset=table9"])
        summary = stage.run(p, root / "cache")
        text = (root / "presets" / "table9" / "table.md").read_text()
        logs: list[str] = []
        subset = stage.params({"out": str(root / "presets"), "demo_store": str(store), "quick": True, "device": "cpu",
                               "arms": ["multitask", "two_tower"]})
        again = run_study(stage.study_params(subset, {"demo": str(store)}), root / "cache", root / "presets" / "table9",
                          log=logs.append)
    finally:
        del os.environ["RECON_PARAMS"]
    return summary, text, again, logs


def test_a_preset_runs_its_tables_arms_beside_the_papers_figures(preset_study):
    from recon.downstream.study import LABELS, PAPER, PRESETS

    summary, text, _, _ = preset_study
    assert summary["preset"] == "table9" and list(summary["arms"]) == PRESETS["table9"]
    sections = text.split("\n\n")
    header, _, *rows = sections[0].splitlines()
    assert header.endswith("| paper (ScanObjectNN PB_T50_RS, GPU scale) | paper (ModelNet40, GPU scale) |")
    assert len(rows) == len(PRESETS["table9"])
    for arm, row in zip(PRESETS["table9"], rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:2] == ["demo", LABELS[arm]]
        assert cells[-2:] == PAPER["table9"]["arms"].get(arm, ["–", "–"]), arm     # the paper's own figures
    assert cells[-2:] == ["90.63", "94.1"] and rows[4].split("|")[-3:-1] == [" 82.53 ", " 91.6 "]   # ReCon; multi-task
    assert "not ours" in sections[1] and "Table 9" in sections[1]
    params = sections[-1].splitlines()[2:]
    for arm, line in zip(PRESETS["table9"], params):
        counts = summary["arms"][arm]["parameters"]
        assert line == (f"| {LABELS[arm]} | {counts['architecture']} | {counts['encoder']:,} | "
                        f"{counts['pretraining']:,} |")
    arch = {arm: r["parameters"]["architecture"] for arm, r in summary["arms"].items()}
    assert arch == {**dict.fromkeys(PRESETS["table9"], "recon"), "multitask": "multitask", "two_tower": "two_tower",
                    "smc_only": "multitask", "cmc_only": "multitask"}
    n = {arm: r["parameters"]["encoder"] for arm, r in summary["arms"].items()}
    assert n["multitask"] < n["targets_all"] < n["two_tower"]
    for arm in ("multitask", "two_tower"):
        s = summary["arms"][arm]["stores"]["demo"]
        assert len(s["finetune"]["values"]) == 2 and len(s["fewshot"]["2way2shot"]["folds"]) == 2


def test_an_arm_is_reused_whatever_list_or_preset_it_ran_in(preset_study):
    summary, _, again, logs = preset_study
    assert again["preset"] is None and list(again["arms"]) == ["multitask", "two_tower"]
    assert sum("reusing" in line for line in logs) == 2
    for arm in ("multitask", "two_tower"):
        assert again["arms"][arm] == summary["arms"][arm]


def test_the_paper_figures_are_the_papers(shared):
    """The copy in the code against PAPER_RESULTS.md (when the shared folder is there): each arm's row,
    found by its leading cells, holds the figures the preset prints."""
    import re

    from recon.downstream.study import PAPER, PRESETS

    path = shared / "PAPER_RESULTS.md"
    if not path.exists():
        pytest.skip(f"{path} not available")
    tables: dict[str, list[list[str]]] = {}
    for section in path.read_text().split("\n## ")[1:]:
        number = re.match(r"Table (\d+)", section)
        if number:
            cells = [[re.sub(r"^([\d.]+)\s*\(.*\)$", r"\1", c.replace("**", "").strip())   # "88.42 (= ...)" -> "88.42"
                      for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
            tables[f"table{number.group(1)}"] = cells
    check, cross = "✓", "–"
    rows = {  # arm -> the leading cells of its row in the paper's table
        "table4": {"targets_rec": [check, cross, cross, cross], "targets_rec_text": [check, check, cross, cross],
                   "targets_rec_img": [check, cross, check, cross], "targets_smc": [check, cross, cross, check],
                   "targets_all": [check, check, check, cross]},
        "table5": {"metric_smooth_l1": ["Smooth L1"], "metric_l2": ["L2 distance"],
                   "metric_cosine": ["cosine similarity"], "metric_infonce": ["InfoNCE"]},
        "table6": {"stopgrad_on": ["on"], "stopgrad_off": ["off"]},
        "table9": {"smc_only": ["SMC only (single-modal contrastive)", cross, cross],
                   "cmc_only": ["CMC only (cross-modal contrastive)", check, check],
                   "targets_rec": ["Point-MAE (reconstruction only)", cross, cross],
                   "multitask": ["vanilla multi-task learning", check, check],
                   "two_tower": ["two-tower network", check, check], "targets_smc": ["ReCon + SMC", cross, cross],
                   "targets_all": ["ReCon + CMC", check, check]},
        "table14": {"images_unpaired": ["no"], "images_paired": ["yes"]},
        "table16": {f"cmc_lr_{rate}": [rate] for rate in ("5e-5", "1e-4", "5e-4", "1e-3")},
    }
    assert set(PAPER) == set(PRESETS) == set(rows)
    for preset, figures in PAPER.items():
        assert set(figures["arms"]) == set(rows[preset]) == set(PRESETS[preset]) - {"random_init"}, preset
        for arm, lead in rows[preset].items():
            found = [r[len(lead):] for r in tables[preset] if r[:len(lead)] == lead]
            assert found == [figures["arms"][arm]], (preset, arm, found)


def test_a_preset_picks_its_arms_and_unknown_names_are_refused():
    from recon.downstream.study import PRESETS, StudyParams, study_arms

    assert study_arms(StudyParams(arms=["rec_only"], preset="table6")) == PRESETS["table6"]
    assert study_arms(StudyParams(arms=["rec_only", "two_tower"])) == ["rec_only", "two_tower"]
    with pytest.raises(ValueError, match="unknown preset 'table7'"):
        study_arms(StudyParams(preset="table7"))
    with pytest.raises(ValueError, match="unknown arm"):
        study_arms(StudyParams(arms=["three_tower"]))


# ----------------------------------------------------------------------------- data scaling (Fig. 1(a))


def test_the_data_subset_is_stratified_seeded_and_nested():
    """``data_fraction``'s rule: per category max(1, round(fraction · n)) shapes, a pure function of (ids,
    categories, fraction, seed) whatever the row order, nested across fractions, every shape at 1."""
    from recon.pretraining.data import fraction_positions

    sizes = {"chair": 100, "lamp": 37, "mug": 3}
    ids = [f"{c}-{i:03d}" for c, n in sizes.items() for i in range(n)]
    cats = [i.split("-")[0] for i in ids]

    def chosen(fraction, seed, order=None):
        order = np.arange(len(ids)) if order is None else order
        return {ids[order[k]] for k in fraction_positions([ids[k] for k in order], [cats[k] for k in order],
                                                          fraction, seed)}

    for fraction, expected in ((0.01, {"chair": 1, "lamp": 1, "mug": 1}), (0.1, {"chair": 10, "lamp": 4, "mug": 1}),
                               (0.25, {"chair": 25, "lamp": 9, "mug": 1}), (0.5, {"chair": 50, "lamp": 19, "mug": 2})):
        got = chosen(fraction, 0)
        assert {c: sum(i.startswith(c + "-") for i in got) for c in sizes} == expected, fraction   # ∝ fraction, ≥ 1
    assert chosen(1.0, 3) == set(ids)
    assert chosen(0.25, 0) == chosen(0.25, 0, np.random.default_rng(5).permutation(len(ids)))   # row order: no matter
    assert chosen(0.25, 0) != chosen(0.25, 1)                                                   # the seed: does
    for seed in (0, 1, 2):
        subsets = [chosen(f, seed) for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)]
        assert all(a <= b for a, b in zip(subsets, subsets[1:])), seed                       # nested
    positions = fraction_positions(ids, cats, 0.5, 0)
    assert list(positions) == sorted(positions) and len(set(positions)) == len(positions)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_an_invalid_fraction_is_a_clear_error(fraction, tmp_path):
    from recon.downstream.study import StudyParams, scaling_grid
    from recon.pretraining.data import fraction_positions
    from recon.pretraining.trainer import PretrainParams, train

    with pytest.raises(ValueError, match=r"data_fraction must be in \(0, 1\]"):
        fraction_positions(["a-0"], ["a"], fraction, 0)
    with pytest.raises(ValueError, match=r"data_fraction must be in \(0, 1\]"):
        scaling_grid(StudyParams(fractions=[0.5, fraction]))          # before any cell runs
    cache = write_demo_like_cache(tmp_path / "cache", n_per_class=3, n_points=64, image_dim=8, text_dim=8)
    with pytest.raises(ValueError, match=r"data_fraction must be in \(0, 1\]"):
        train(PretrainParams(data_fraction=fraction, device="cpu", split="train"), cache, tmp_path / "run",
              log=lambda *_: None)


def test_fraction_one_is_the_stores_untouched(tmp_path):
    from recon.pretraining.data import fraction_of_stores, open_pretrain_stores

    cache = write_demo_like_cache(tmp_path / "cache", n_per_class=5, n_points=64, image_dim=8, text_dim=8)
    stores = open_pretrain_stores(cache)
    same, data = fraction_of_stores(stores, 1.0, 0)
    assert same is stores
    assert data == {"data_fraction": 1.0, "data_seed": 0, "shapes": 20, "of": 20,
                    "per_category": dict.fromkeys(["ball", "disk", "rod", "shell"], 5)}
    half, data = fraction_of_stores(stores, 0.5, 7)
    assert data["shapes"] == len(half.rows) == 12 and set(data["per_category"].values()) == {3}   # round(2.5) = 3
    assert set(half.rows) <= set(stores.rows) and half.points is stores.points


def test_the_fig1a_preset_and_the_grid():
    from recon.downstream.study import ARMS, SCALING_PRESETS, StudyParams, scaling_grid, study_arms

    p = StudyParams(preset="fig1a", arms=["rec_only"], fractions=[0.3])
    assert study_arms(p) == ["random_init", "targets_rec", "cmc_only", "targets_all"]
    assert scaling_grid(p) == ([0.01, 0.05, 0.1, 0.25, 0.5, 1.0], [0, 1, 2])
    assert ARMS["cmc_only"]["architecture"] == "multitask" and "rec" not in ARMS["cmc_only"]["targets"]
    assert scaling_grid(StudyParams()) == ([], [0])                             # no scaling by default
    assert scaling_grid(StudyParams(fractions=[1, 0.1])) == ([0.1, 1.0], [0])
    with pytest.raises(ValueError, match="repeated"):
        scaling_grid(StudyParams(fractions=[0.1, 0.1]))
    with pytest.raises(ValueError, match="at least one"):
        scaling_grid(StudyParams(fractions=[0.1], fraction_seeds=[]))
    assert set(SCALING_PRESETS) == {"fig1a"}


def test_the_fig1a_note_is_the_papers(shared):
    """The paper's Figure 1 is plots without numbers (PAPER_RESULTS.md): the preset prints its reading."""
    from recon.downstream.study import PAPER_FIGURES

    path = shared / "PAPER_RESULTS.md"
    if not path.exists():
        pytest.skip(f"{path} not available")
    section = path.read_text().split("## Figure 1")[1].split("\n## ")[0]
    assert "no table" in section
    flat = " ".join(section.split())
    for phrase in ("representation over-fitting", "data filling", "ReCon is above all at every ratio"):
        assert phrase in flat and phrase in PAPER_FIGURES["fig1a"]["reading"]


@pytest.fixture(scope="module")
def scaling_study(tmp_path_factory):
    """`recon study --quick --set fractions=[0.5,1] --set fraction_seeds=[0,1]` with random init, ReCon and the
    contrastive-only plain Transformer on a demo-like cache of its own (4 categories × 4 train shapes), then the
    same study again."""
    from recon.downstream.study import run_study
    from stages import study as stage

    root, cache, store = study_folder(tmp_path_factory, "scaling")
    os.environ["RECON_PARAMS"] = str(root / "params.yaml")
    try:
        p = stage.params({"out": str(root / "scaling"), "demo_store": str(store), "quick": True, "device": "cpu",
                          "arms": ["random_init", "targets_all", "cmc_only"]},
                         ["fractions=[0.5, 1]", "fraction_seeds=[0, 1]"])
        summary = stage.run(p, cache)
        logs: list[str] = []
        again = run_study(stage.study_params(p, {"demo": str(store)}), cache, root / "scaling", log=logs.append)
    finally:
        del os.environ["RECON_PARAMS"]
    return root, summary, again, logs


def test_a_scaling_study_has_every_cell_with_the_rules_subsets(scaling_study):
    import polars as pl

    from recon.pretraining.data import fraction_positions

    root, summary, _, _ = scaling_study
    out = root / "scaling"
    cells = {(c["arm"], c["fraction"], c["seed"]): c for c in summary["cells"]}
    assert set(cells) == {("random_init", None, 0), ("random_init", None, 1)} | \
        {(arm, f, s) for arm in ("targets_all", "cmc_only") for f in (0.5, 1.0) for s in (0, 1)}
    shapes = pl.read_parquet(root / "cache" / "shapes.parquet").filter(pl.col("split") == "train")
    for (arm, fraction, seed), c in cells.items():
        assert set(c["stores"]["demo"]) == {"knn", "svm", "svm_std"}                    # probes only (no fine-tune)
        record = json.loads((out / arm / (f"fraction-{fraction:g}/" if fraction else "") / f"seed-{seed}" /
                             "result.json").read_text())
        assert record["params"]["seed"] == seed
        if arm == "random_init":
            assert "shapes" not in c and record["history"] == []
            continue
        kept = fraction_positions(shapes["id"].to_list(), shapes["category"].to_list(), fraction, seed)
        assert c["shapes"] == len(kept) == {0.5: 8, 1.0: 16}[fraction] and c["of"] == 16     # 4 categories × 4
        assert c["per_category"] == dict.fromkeys(["ball", "disk", "rod", "shell"], c["shapes"] // 4)
        assert record["params"]["data_fraction"] == fraction
        assert record["history"][-1]["step"] == 2 * c["shapes"] // 8                      # 2 epochs of batch 8
    assert summary["shapes"] == {"0.5": 8, "1": 16}
    assert (out / "targets_all" / "fraction-0.5" / "seed-1" / "pretrain" / "checkpoints").is_dir()   # a run per cell


def test_a_scaling_study_plots_mean_and_spread_per_arm(scaling_study):
    from recon.downstream.study import LABELS

    root, summary, _, _ = scaling_study
    png = (root / "scaling" / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert summary["plot"] == {f"demo/{m}": [LABELS["targets_all"], LABELS["cmc_only"], "random init (± std)"]
                               for m in ("knn", "svm", "svm_std")}                    # one line per arm + the band
    assert json.loads((root / "scaling" / "scaling.json").read_text()) == json.loads(json.dumps(summary))
    for metric in ("knn", "svm", "svm_std"):
        line = summary["series"]["demo"][metric]["targets_all"]
        assert line["fractions"] == [0.5, 1.0]
        for k, fraction in enumerate(line["fractions"]):
            values = [c["stores"]["demo"][metric] for c in summary["cells"]
                      if c["arm"] == "targets_all" and c["fraction"] == fraction]
            assert line["values"][k] == values and len(values) == 2
            assert line["mean"][k] == pytest.approx(np.mean(values)) and line["std"][k] == pytest.approx(np.std(values))
        base = summary["random_init"]["demo"][metric]
        assert base["values"] == [c["stores"]["demo"][metric] for c in summary["cells"] if c["arm"] == "random_init"]
    table = (root / "scaling" / "scaling.md").read_text().split("\n\n")[0].splitlines()
    assert table[0] == "| store | figure | arm | 50 % | 100 % |" and table[2] == "| | | pretraining shapes | 8 | 16 |"
    assert len(table) == 3 + 3 * 3                                                     # 3 probes × 3 arms
    # the headline (`dvc exp show`): each arm's mean over seeds per fraction, random init's over its seeds;
    # with an --out of its own, beside the table (the default out: cache/metrics/study)
    headline = json.loads((root / "scaling" / "metrics.json").read_text())
    assert headline["quick"] == 1 and len(headline) == 1 + 3 * (2 * 2 + 1)
    for metric in ("knn", "svm", "svm_std"):
        line = summary["series"]["demo"][metric]["cmc_only"]
        assert [headline[f"demo.cmc_only.p{p}.{metric}"] for p in (50, 100)] == line["mean"]
        assert headline[f"demo.random_init.{metric}"] == summary["random_init"]["demo"][metric]["mean"]
    assert not (root / "scaling" / "table.md").exists()                          # nothing else twice


def test_a_scaling_study_reuses_its_cells(scaling_study):
    _, summary, again, logs = scaling_study
    assert sum("reusing" in line for line in logs) == 10
    assert again == json.loads(json.dumps(summary))


# ----------------------------------------------------------------------------- ReCon++ arms


@pytest.fixture(scope="module")
def reconpp_study(tmp_path_factory):
    """`recon study --quick --arms targets_all,reconpp_matched,reconpp` on a demo-like cache with 3 views."""
    from stages import study as stage

    root, cache, store = study_folder(tmp_path_factory, "reconpp", views=3)
    os.environ["RECON_PARAMS"] = str(root / "params.yaml")
    try:
        p = stage.params({"out": str(root / "study"), "demo_store": str(store), "quick": True, "device": "cpu",
                          "arms": ["targets_all", "reconpp_matched", "reconpp"]})
        summary = stage.run(p, cache)
    finally:
        del os.environ["RECON_PARAMS"]
    return root, summary


def test_the_reconpp_arms_have_one_matched_query_per_view_and_the_same_budget(reconpp_study):
    """ReCon++ as arms: K = V = 3 image queries Hungarian-matched to the cached views; ``reconpp`` spends the
    same epochs as ReCon, the first half reconstructing only (its history says which stage each epoch was in)."""
    import torch

    root, summary = reconpp_study
    arms = summary["arms"]
    recon, matched, two_stage = (arms[a]["params"] for a in ("targets_all", "reconpp_matched", "reconpp"))
    for params in (matched, two_stage):
        assert params["match"] == "hungarian" and params["queries_per_view"] and params["model"] == recon["model"]
    assert recon["match"] == "none" and not recon["queries_per_view"] and "img_queries" not in recon["model"]
    assert (matched["rec_epochs"], matched["epochs"]) == (0, recon["epochs"]) == (0, 2)
    assert (two_stage["rec_epochs"], two_stage["epochs"]) == (1, 1)
    # three image queries instead of one: two more [C] query tokens and positions in the encoder
    width = recon["model"]["trans_dim"]
    for arm in ("reconpp_matched", "reconpp"):
        assert arms[arm]["parameters"]["encoder"] == arms["targets_all"]["parameters"]["encoder"] + 2 * 2 * width
        state = torch.load(root / "study" / arm / "pretrain" / "checkpoints" / "epoch-0001.pt", weights_only=True)
        assert state["config"]["img_queries"] == 3 and state["config"]["img_match"] == "hungarian"
    history = json.loads((root / "study" / "reconpp" / "result.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["rec", "full"]
    assert {h.get("stage", "full") for h in json.loads((root / "study" / "reconpp_matched" / "result.json")
                                                       .read_text())["history"]} == {"full"}
    assert "ReCon++: matched queries + reconstruction-first stage" in (root / "study" / "table.md").read_text()
