"""`dvc repro` of a tiny demo in a temporary copy of the project: runs end to end and a second run
is a no-op. Then a two-experiment sweep (`dvc exp run --queue`): every row of `dvc exp show` carries
every metrics file, and `dvc metrics diff` / `dvc plots diff` compare the two experiments, and each
experiment's commit carries the details beside its headline metrics; an experiment on a pretraining
param reruns pretraining and what it targets, nothing upstream; a study preset runs as an experiment
of its own pipeline (stages/studies/dvc.yaml), which the root `dvc repro` never runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from stages import finetune as finetune_stage
from stages import pretrain as pretrain_stage
from stages import study as study_stage
from stages.common import details_path

pytestmark = pytest.mark.slow

TINY = {
    "demo": {"shapes_per_category": 3, "categories": ["chair", "mug"]},
    "render": {"resolution": 64, "workers": 1},
    "sample": {"points": 512, "workers": 1},
    "embed": {"batch_size": 8},
    "pretrain": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0, "n_points": 128, "bn_recalibrate": 8,
                 "monitor_shapes": 8,
                 "model": {"trans_dim": 48, "depth": 2, "decoder_depth": 1, "num_group": 8, "group_size": 16}},
    "convert": {"points": 256},
    "finetune": {"epochs": 2, "batch_size": 2, "n_points": 128, "num_group": 8, "group_size": 16, "votes": 2},
    "evaluate": {"n_points": 128},
    "demo_parts": {"points": 128},
    "partseg": {"epochs": 1, "batch_size": 2, "n_points": 128, "num_group": 8, "group_size": 16,
                "seg": {"propagation_dims": [32, 32], "head_dims": [32, 16], "label_dim": 8}},
}


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def _env(columns: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "RECON_CACHE": "cache", "RECON_PARAMS": "params.yaml"}
    if columns:   # the terminal width rich draws tables for
        env["COLUMNS"] = str(columns)
    return env


def _dvc(project: Path, *args: str, stdout_only: bool = False, columns: int | None = None) -> str:
    result = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=_env(columns),
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout if stdout_only else result.stdout + result.stderr


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout


def _declared(project: Path) -> tuple[list[str], list[str], list[str]]:
    """dvc.yaml's (metrics, plots, outs) paths: metrics, plots and uncached outs (``cache: false``,
    e.g. the details.json behind a headline metrics file) go to git; cached outs do not."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    found: dict[str, list[str]] = {"metrics": [], "plots": [], "outs": []}
    for stage in stages.values():
        for kind in found:
            for entry in stage.get(kind, []):
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                if kind != "outs":
                    assert options.get("cache") is False, f"{path}: metrics and plots belong in git"
                found["plots" if kind == "outs" and options.get("cache") is False else kind].append(path)
    return found["metrics"], found["plots"], found["outs"]


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w/.:-]+)'", output))   # another pipeline's: <its dvc.yaml>:<stage>


def _tiny_project(project: Path, index_root: str | None = None) -> Path:
    """A copy of the project in ``project`` with the TINY params (and ``index.root``), in a new git repo."""
    for name in _project_files():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        params.setdefault(section, {}).update(values)
    if index_root is not None:
        params["index"]["root"] = index_root
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _git(project, "config", "user.name", "recon tests")  # dvc exp commits need an identity
    _git(project, "config", "user.email", "tests@recon.invalid")
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return _tiny_project(tmp_path_factory.mktemp("dvc") / "project")


@pytest.fixture(scope="module", autouse=True)
def own_meshes(tmp_path_factory):
    """A plain `<category>/<mesh>` folder outside the project and a tiny project indexing it, whose
    `dvc repro` starts with this module and runs in the background beside the demo project's tests (the
    two projects share nothing; on two cores this saves a minute): (meshes, project, the run, its log)."""
    import trimesh

    base = tmp_path_factory.mktemp("own")
    meshes = base / "meshes"
    for category, make in (("Musical_Instrument", lambda k: trimesh.creation.box([1.0, 0.3 + 0.1 * k, 0.2])),
                           ("NonWheelChair", lambda k: trimesh.creation.icosphere(1, radius=0.5 + 0.1 * k))):
        (meshes / category).mkdir(parents=True)
        for k in range(4):
            make(k).export(meshes / category / f"m{k}.obj")
    project = _tiny_project(base / "project", index_root=str(meshes))
    log = base / "repro.log"
    with open(log, "w") as sink:   # a file, not a pipe: a full pipe would stall the run until it is read
        run = subprocess.Popen(["dvc", "repro"], cwd=project, stdout=sink, stderr=subprocess.STDOUT, text=True,
                               env=_env())
    yield meshes, project, run, log
    if run.poll() is None:
        run.kill()
        run.wait()


def test_metrics_and_plots_are_git_tracked_and_artifacts_are_not():
    """What `dvc metrics/plots diff` and `dvc exp show` compare must be in git (so commits and
    experiments carry it); what DVC caches must not be."""
    metrics, plots, outs = _declared(ROOT)
    assert metrics and plots
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0
    assert [p for p in metrics + plots if ignored(p)] == []
    assert [p for p in outs if not ignored(p)] == []
    assert all(p.startswith("cache/metrics/") for p in metrics + plots)
    assert not ignored("cache/README.md") and ignored("cache/metrics/pretrain/metrics.json.tmp")


def test_repro_then_noop(project):
    first = _dvc(project, "repro")
    assert _ran(first) == {"demo_data", "index", "render", "sample", "embed", "pretrain", "convert",
                           "finetune", "evaluate", "export", "demo_parts", "partseg", "export_partseg"}
    pretrain = json.loads((project / "cache" / "metrics" / "pretrain" / "details.json").read_text())
    for term in ("img", "text"):
        assert pretrain[f"test_loss_{term}_ratio"] == pytest.approx(
            pretrain[f"test_loss_{term}"] / pretrain[f"test_loss_{term}_baseline"])
    assert set(pretrain["probe"]["pretrained"]["knn_by_part"]) == {"cls", "img", "txt", "pooled", "img_proj",
                                                                   "text_proj"}
    assert pretrain["probe"]["pretrained"]["knn"] == pretrain["probe_knn"]
    assert pretrain["test_shapes_held_out"] is True and pretrain["target_norm"] == "store"
    partseg = json.loads((project / "cache" / "metrics" / "partseg" / "details.json").read_text())
    assert partseg["selection"] == "last epoch" and partseg["epochs"] == TINY["partseg"]["epochs"]
    assert partseg["train_shapes"] + partseg.get("test_shapes", 0) == 6   # every demo shape, train or test
    onnx = json.loads((project / "cache" / "metrics" / "export" / "partseg_check_details.json").read_text())
    assert onnx["task"] == "partseg" and onnx["max_abs_diff"] <= 1e-4
    evaluation = json.loads((project / "cache" / "metrics" / "evaluate" / "details.json").read_text())
    assert {"svm", "zeroshot", "random_init"} <= set(evaluation)
    headline = json.loads((project / "cache" / "metrics" / "pretrain" / "metrics.json").read_text())
    assert headline == pretrain_stage.headline(pretrain) and set(headline) == set(pretrain_stage.HEADLINE)
    second = _dvc(project, "repro")
    assert _ran(second) == set(), second
    metrics = _dvc(project, "metrics", "show")
    assert "img_ratio" in metrics and "cache/metrics/finetune/metrics.json" in metrics
    assert "loss_rec" not in metrics and "details" not in metrics      # the headlines only
    plots = _dvc(project, "plots", "show", "--json")
    assert "confusion" in plots and "probe_knn_random_init" in plots and "test_loss_text_ratio" in plots


def test_experiment_sweep_rows_carry_their_metrics(project):
    """The README's recipe on the tiny demo: commit a baseline, queue a two-value sweep, run it,
    and compare. Every row of `dvc exp show` (baseline and both experiments) has every metrics
    file, each experiment its own values; metrics/plots diff see the difference."""
    _dvc(project, "repro")  # a no-op after the test above; the whole demo when run alone
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "baseline")
    metrics_files, plot_files, _ = _declared(project)
    details_files = [str(details_path(Path(m))) for m in metrics_files]   # git-tracked, not declared
    assert set(_git(project, "ls-files", "cache/metrics").split()) == set(metrics_files + plot_files + details_files)

    _dvc(project, "exp", "run", "--queue", "-S", "finetune.epochs=1,3")
    ran = _dvc(project, "exp", "run", "--run-all")
    assert _ran(ran) == {"finetune", "export"}, ran  # everything upstream comes from the DVC cache

    rows = json.loads(_dvc(project, "exp", "show", "--json", stdout_only=True))
    baseline = next(r for r in rows if r["rev"] != "workspace")
    experiments = [e["revs"][0] for e in baseline["experiments"]]
    by_epochs = {e["data"]["params"]["params.yaml"]["data"]["finetune"]["epochs"]: e for e in experiments}
    assert sorted(by_epochs) == [1, 3]
    for row in (baseline, *experiments):
        found = row["data"]["metrics"]
        for name in metrics_files:
            assert "error" not in found.get(name, {"error": "missing"}), (row["name"], name, found.get(name))
            data = found[name]["data"]   # a flat headline of numbers (export's: whether ONNX agrees, a bool)
            assert data and all(isinstance(v, (int, float)) for v in data.values()), (row["name"], name, data)
    finetune = "cache/metrics/finetune/metrics.json"

    def details(row: dict) -> dict:  # what the row's commit carries beside its headline
        return json.loads(_git(project, "show", f"{row['rev']}:cache/metrics/finetune/details.json"))

    assert details(baseline)["epochs"] == TINY["finetune"]["epochs"]
    for epochs, row in by_epochs.items():  # each experiment's own numbers, not the baseline's
        assert details(row)["epochs"] == epochs
        assert row["data"]["metrics"][finetune]["data"] == finetune_stage.headline(details(row))
        pretrain = row["data"]["metrics"]["cache/metrics/pretrain/metrics.json"]["data"]
        assert pretrain == baseline["data"]["metrics"]["cache/metrics/pretrain/metrics.json"]["data"]

    one, three = by_epochs[1]["name"], by_epochs[3]["name"]
    diff = json.loads(_dvc(project, "metrics", "diff", one, three, "--all", "--json", stdout_only=True))
    assert set(diff[finetune]) == {"ft_acc", "ft_vote"}
    assert {v["diff"] for v in diff["cache/metrics/pretrain/metrics.json"].values()} == {0}  # pretraining did not change
    plots = json.loads(_dvc(project, "plots", "diff", one, three, "--json", stdout_only=True))
    points = [v for plot in plots["data"]["finetune_history"] for v in plot["content"]["data"]["values"]
              if v.get("field") == "loss"]
    assert Counter(v["rev"] for v in points) == {one: 1, three: 3}  # one history row per epoch


#: the headline figures downstream of pretraining: what a sweep over a pretraining parameter changes
CHANGED_BY_PRETRAINING = ("img_ratio", "text_ratio", "knn", "ft_acc", "ft_vote", "miou", "svm", "zs_top1")


def test_a_pretraining_experiment_fits_a_160_column_terminal(project):
    """`dvc exp show --only-changed` after an experiment on a pretraining parameter (up to fine-tuning: the
    other stages' figures are kept as columns anyway), beside the queued
    sweep above (so the State and Executor columns are there too; its own parameter column,
    finetune.epochs, is dropped: one parameter changes in a pretraining sweep), with every headline
    figure a pretraining change moves shown (`--keep`: the tiny project's coarse accuracies may not move).
    Drawn at its natural width, as DVC's pager (`less -S`) shows it, the experiment, its parameter
    and those figures fit in the first 160 columns; after them DVC lists the content hashes of the
    changed models (`--drop cache/` hides them)."""
    ran = _dvc(project, "exp", "run", "finetune", "-S", "pretrain.seed=1")   # the pretraining param's dependents
    assert _ran(ran) == {"pretrain", "finetune"}, ran                         # run; nothing upstream of it does
    keep = "|".join(rf"(.*:)?{name}$" for name in CHANGED_BY_PRETRAINING)
    show = ["exp", "show", "--only-changed", "--no-pager", "--keep", keep, "--drop", "finetune.epochs"]
    wide = _dvc(project, *show, stdout_only=True, columns=1000)
    lines = [line.rstrip() for line in wide.splitlines() if line.strip() and not set(line.strip()) <= set("─")]
    header = lines[0]
    names = header.split()
    assert {"Experiment", "State", "pretrain.seed", *CHANGED_BY_PRETRAINING} <= set(names), header
    hashes = [name for name in names if name.startswith("cache/")]   # the changed models' content hashes
    assert "cache/finetune/model.pt" in hashes, header
    readable = header.index(hashes[0])                                  # every column before them
    assert header.index("pretrain.seed") < readable and max(map(header.index, CHANGED_BY_PRETRAINING)) < readable
    assert len(header[:readable].rstrip()) <= 160, header
    dropped = _dvc(project, *show[:-1], "finetune.epochs|cache/", stdout_only=True, columns=1000)
    assert max(len(line.rstrip()) for line in dropped.splitlines()) <= 160, dropped
    print(f"\nexp show --only-changed: {len(header)} columns, {len(header[:readable].rstrip())} before the hashes")


def test_a_study_preset_runs_as_a_dvc_experiment(project):
    """`dvc exp run stages/studies/dvc.yaml -S study.preset=table6 -S study.quick=true` (the smoke version of
    docs/studies.md's command): the root pipeline never ran the study; the experiment runs the study stage
    alone (everything upstream is done) and its commit carries the preset's per-arm headline (the same
    numbers as the details beside it), its table with the paper's figures, and its plot; none of them is a
    metrics or plots entry, so the demo's `dvc metrics show` stays the demo's (tests/test_headline_metrics.py)."""
    assert not (project / "cache" / "study").exists()
    ran = _dvc(project, "exp", "run", "stages/studies/dvc.yaml", "-S", "study.preset=table6", "-S", "study.quick=true",
               "-S", "++study.pretrain.batch_size=2")   # the tiny demo pretrains on 4 shapes
    assert _ran(ran) == {"stages/studies/dvc.yaml:study"}, ran
    rows = json.loads(_dvc(project, "exp", "show", "--json", stdout_only=True))
    baseline = next(r for r in rows if r["rev"] != "workspace")
    row = next(e["revs"][0] for e in baseline["experiments"]
               if e["revs"][0]["data"]["params"]["params.yaml"]["data"]["study"]["preset"] == "table6")
    headline = json.loads(_git(project, "show", f"{row['rev']}:cache/metrics/study/metrics.json"))
    details = json.loads(_git(project, "show", f"{row['rev']}:cache/metrics/study/details.json"))
    assert headline == study_stage.headline(details, quick=True) and headline["quick"] == 1
    assert {key.split(".")[1] for key in headline if key != "quick"} == {"random_init", "stopgrad_on", "stopgrad_off"}
    assert {"demo.stopgrad_off.knn", "demo.stopgrad_off.svm_std", "demo.stopgrad_off.ft"} <= set(headline)
    table = _git(project, "show", f"{row['rev']}:cache/metrics/study/table.md")
    assert "stop-gradient off" in table and "81.60" in table      # our rows beside the paper's figures
    assert _git(project, "ls-tree", "--name-only", row["rev"], "cache/metrics/study/").split() == [
        "cache/metrics/study/details.json", "cache/metrics/study/metrics.json", "cache/metrics/study/plot.png",
        "cache/metrics/study/table.md"]

def test_your_own_mesh_folder_through_dvc(own_meshes):
    """`dvc repro` with index.root set to a plain `<category>/<mesh>` folder outside the project:
    the whole pipeline runs on it; the demo-only stages (generator, part labels, part segmentation
    and its export) leave marked placeholders instead of failing or generating anything; folder
    names reach the text teacher as words; a new mesh in the folder changes index, not demo_data."""
    import trimesh

    meshes, project, run, log = own_meshes
    run.wait(timeout=900)
    first = log.read_text()
    assert run.returncode == 0, first
    assert "Running stage 'finetune'" in first and "Running stage 'evaluate'" in first
    cache = project / "cache"
    assert [p.name for p in (cache / "demo_meshes").iterdir()] == ["NOT_USED.json"]   # nothing generated
    import polars as pl
    shapes = pl.read_parquet(cache / "shapes.parquet")
    assert shapes.height == 8 and set(shapes["category"]) == {"Musical_Instrument", "NonWheelChair"}
    from pipeline.store import open_store
    texts = [str(t) for t in open_store(cache / "teachers" / "text.zarr")["texts"][:]]
    assert texts == ["musical instrument", "non wheel chair"]
    finetuned = json.loads((cache / "metrics" / "finetune" / "details.json").read_text())
    assert finetuned["test_shapes"] >= 2 and isinstance(finetuned["test_acc"], float)
    for details in ("partseg/details.json", "export/partseg_check_details.json"):
        assert "not_used" in json.loads((cache / "metrics" / details).read_text()), details
    assert json.loads((cache / "metrics" / "partseg" / "metrics.json").read_text()) == {}
    assert (cache / "export" / "partseg.onnx").stat().st_size == 0
    assert (cache / "export" / "classifier.onnx").stat().st_size > 1000

    trimesh.creation.box([0.5, 0.5, 0.5]).export(meshes / "NonWheelChair" / "m9.obj")
    status = _dvc(project, "status")
    assert re.search(r"^index:", status, flags=re.M) and not re.search(r"^demo_data:", status, flags=re.M), status
