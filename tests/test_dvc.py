"""`dvc repro` of a tiny demo in a temporary copy of the project: runs end to end, a second run
is a no-op, and a render param change reruns render and its dependents, nothing upstream."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

TINY = {
    "demo": {"shapes_per_category": 3, "categories": ["chair", "mug"]},
    "render": {"resolution": 64, "workers": 1},
    "sample": {"points": 512, "workers": 1},
    "embed": {"batch_size": 8},
    "pretrain": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0, "n_points": 128,
                 "model": {"trans_dim": 48, "depth": 2, "decoder_depth": 1, "num_group": 8, "group_size": 16}},
    "convert": {"points": 256},
    "finetune": {"epochs": 2, "batch_size": 2, "n_points": 128, "num_group": 8, "group_size": 16, "votes": 2},
    "evaluate": {"n_points": 128},
}


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def _dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "RECON_CACHE": "cache", "RECON_PARAMS": "params.yaml"}
    result = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("dvc") / "project"
    for name in _project_files():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        params.setdefault(section, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    return project


def test_repro_then_noop_then_partial_rerun(project):
    first = _dvc(project, "repro")
    assert _ran(first) == {"demo_data", "index", "render", "sample", "embed", "pretrain", "convert",
                           "finetune", "evaluate", "export"}
    pretrain = json.loads((project / "cache" / "pretrain" / "metrics.json").read_text())
    for term in ("img", "text"):
        assert pretrain[f"test_loss_{term}_ratio"] == pytest.approx(
            pretrain[f"test_loss_{term}"] / pretrain[f"test_loss_{term}_baseline"])
    assert set(pretrain["probe"]["pretrained"]["knn_by_part"]) == {"cls", "img", "txt", "pooled"}
    assert pretrain["probe"]["pretrained"]["knn"] == pretrain["probe_knn"]
    assert pretrain["test_shapes_held_out"] is True and pretrain["target_norm"] == "store"
    evaluation = json.loads((project / "cache" / "evaluate" / "metrics.json").read_text())
    assert {"svm", "zeroshot", "random_init"} <= set(evaluation)
    second = _dvc(project, "repro")
    assert _ran(second) == set(), second
    metrics = _dvc(project, "metrics", "show")
    assert "loss_rec" in metrics and "cache/finetune/metrics.json" in metrics
    plots = _dvc(project, "plots", "show", "--json")
    assert "confusion" in plots and "probe_knn_random_init" in plots and "test_loss_text_ratio" in plots

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["render"]["resolution"] = 48
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc(project, "repro")
    assert _ran(third) == {"render", "embed", "pretrain", "finetune", "evaluate", "export"}, third
