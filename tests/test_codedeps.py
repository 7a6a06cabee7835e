"""One list of each stage's code (issue #24, item 3): dvc.yaml's code deps and the resume
fingerprints are both the import closure of a module (``recon.runtime.codedeps``), so a change to
any file a stage runs reruns it, and a checkpoint is resumed only by the code that wrote it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from recon.runtime import codedeps, trainstate


def write(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


TOY = {
    "cli.py": "import typer\napp = typer.Typer()\nsub = typer.Typer()\napp.add_typer(sub, name='grp')\n"
              "@app.command('go')\ndef go():\n    from stages import a as stage\n    stage.run()\n"
              "@sub.command()\ndef deep_one():\n    from stages import b\n",
    "stages/__init__.py": "",
    "stages/a.py": "import os\nfrom pipeline import util\n\ndef run():\n    from recon.x.y import f   # lazy\n    f()\n",
    "stages/b.py": "import pipeline.other\n",
    "recon/__init__.py": "",
    "recon/x/__init__.py": "",
    "recon/x/y.py": "from . import z\nfrom .z import g\nfrom recon.x import CONSTANT_NOT_A_MODULE\n",
    "recon/x/z.py": "import numpy\n",
    "recon/x/unused.py": "",
    "pipeline/__init__.py": "",
    "pipeline/util.py": "",
    "pipeline/other.py": "",
}


def test_closure_counts_lazy_relative_and_from_imports_and_packages_on_the_way(tmp_path):
    root = write(tmp_path, TOY)
    assert codedeps.closure("stages.a", root=root) == (
        "pipeline/__init__.py", "pipeline/util.py", "recon/__init__.py", "recon/x/__init__.py",
        "recon/x/y.py", "recon/x/z.py", "stages/__init__.py", "stages/a.py")
    assert codedeps.closure("recon.x.z", root=root) == ("recon/__init__.py", "recon/x/__init__.py", "recon/x/z.py")
    assert codedeps.closure("stages.b", root=root) == (
        "pipeline/__init__.py", "pipeline/other.py", "stages/__init__.py", "stages/b.py")
    with pytest.raises(KeyError, match="not a project module"):
        codedeps.closure("numpy", root=root)


def test_a_stage_cmd_runs_the_modules_its_cli_command_imports(tmp_path):
    root = write(tmp_path, TOY)
    assert codedeps.cmd_modules("recon go --flag 3 ${x.y}", root) == ("stages.a", "stages")
    assert codedeps.cmd_modules("recon grp deep-one", root) == ("stages.b", "stages")
    assert codedeps.cmd_modules("python -m stages.b", root) == ("stages.b",)
    assert codedeps.cmd_modules("cp a b", root) is None                 # no project code
    with pytest.raises(ValueError, match="no such command"):
        codedeps.cmd_modules("recon nope", root)
    assert "cli.py" not in codedeps.stage_code("recon go", root)


def test_the_real_stages_run_their_command_modules():
    stages = codedeps.read_stages((ROOT / "dvc.yaml").read_text().splitlines())
    entry = {name: codedeps.cmd_modules(s.cmd) for name, s in stages.items()}
    assert all(entry.values()), f"a stage whose cmd runs no project code: {entry}"
    assert "stages.convert" in entry["demo_parts"] and "stages.finetune" in entry["partseg"]
    assert "stages.export" in entry["export_partseg"] and "stages.pretrain" in entry["pretrain"]


@pytest.mark.parametrize("pipeline", codedeps.PIPELINES)
def test_dvc_yaml_code_deps_are_the_import_closures(pipeline):
    """Fails when a module was added or an import changed without refreshing a dvc.yaml (the demo's or
    the studies'), and prints the list to paste (or run ``python -m recon.runtime.codedeps --write``)."""
    stages = codedeps.read_stages((ROOT / pipeline).read_text().splitlines())
    wanted = codedeps.expected((ROOT / pipeline).read_text())
    assert stages
    drifted = []
    for name, stage in stages.items():
        if [d for d in stage.deps if codedeps.is_code(d)] != list(wanted[name]):
            deps = [d for d in stage.deps if not codedeps.is_code(d)] + list(wanted[name])
            drifted.append(f"  {name}:\n    deps:\n" + "".join(f"      - {d}\n" for d in deps))
    assert not drifted, (f"{pipeline}'s code deps differ from the import closures; run "
                         "`./tools/env.sh python -m recon.runtime.codedeps --write` or paste:\n" + "".join(drifted))


def test_resume_fingerprints_list_the_closure_of_their_entry_module_within_the_stage_deps():
    import recon.downstream.finetune as FT
    import recon.downstream.study as S
    import recon.pretraining.trainer as P
    from recon.downstream.partseg_finetune import PartSegTask

    deps = {name: set(s.deps) for name, s in codedeps.read_stages((ROOT / "dvc.yaml").read_text().splitlines()).items()}
    assert P.TRAINING_CODE == codedeps.closure("recon.pretraining.trainer")
    assert FT.TRAINING_CODE == codedeps.closure("recon.downstream.finetune")
    assert PartSegTask.code == codedeps.closure("recon.downstream.partseg_finetune")
    assert S.STUDY_CODE == codedeps.closure("recon.downstream.study")
    assert {"recon/network/model.py", "recon/pretraining/data.py", "recon/runtime/optim.py"} <= set(P.TRAINING_CODE)
    for stage, files in [("pretrain", P.TRAINING_CODE), ("finetune", FT.TRAINING_CODE),
                         ("partseg", FT.TRAINING_CODE + PartSegTask.code)]:
        assert set(files) - deps[stage] == set(), f"stage {stage}: its fingerprint hashes files it does not depend on"
    # the study's stage (its own pipeline, stages/studies/dvc.yaml) depends on every file its fingerprint hashes
    study = codedeps.read_stages((ROOT / "stages/studies/dvc.yaml").read_text().splitlines())["study"]
    assert set(S.STUDY_CODE) <= set(study.deps) and "cache/downstream/demo.zarr" in study.deps


def test_code_fingerprint_is_sorted_deduplicated_and_independent_of_the_clone_location(tmp_path, monkeypatch):
    from recon.pretraining.trainer import TRAINING_CODE

    here = trainstate.code_fingerprint(*TRAINING_CODE)
    assert here == trainstate.code_fingerprint(*reversed(TRAINING_CODE), TRAINING_CODE[0])
    assert trainstate.code_fingerprint("recon.network.model") == trainstate.code_fingerprint("recon/network/model.py")
    clone = tmp_path / "elsewhere"
    for name in TRAINING_CODE:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    monkeypatch.setattr(codedeps, "ROOT", clone)
    assert trainstate.code_fingerprint(*TRAINING_CODE) == here
    with open(clone / TRAINING_CODE[-1], "a") as f:
        f.write("\n# an edit\n")
    assert trainstate.code_fingerprint(*TRAINING_CODE) != here


def test_write_refreshes_only_the_code_entries_of_a_copy(tmp_path, capsys):
    original = (ROOT / "dvc.yaml").read_text()
    stale = original.replace("      - stages/pretrain.py\n", "")                      # a module left out
    anchor = "    cmd: recon pretrain\n    deps:\n      - cache/shapes.parquet\n"
    stale = stale.replace(anchor, anchor + "      # the trainer's inputs below\n"          # a comment, a gone module
                          "      - recon/old_module.py   # renamed since\n")
    stale = stale.replace("      - recon/network/model.py\n", "      - recon/network/model.py   # the student\n", 1)
    assert stale != original
    path = tmp_path / "dvc.yaml"
    path.write_text(stale)

    assert codedeps.main(["--check", "--dvc-yaml", str(path)]) == 1
    shown = capsys.readouterr().out
    assert "+      - stages/pretrain.py" in shown and "-      - recon/old_module.py   # renamed since" in shown
    assert path.read_text() == stale                                                   # --check writes nothing

    assert codedeps.main(["--write", "--dvc-yaml", str(path)]) == 0
    written = path.read_text()
    assert codedeps.main(["--check", "--dvc-yaml", str(path)]) == 0
    assert "recon/old_module.py" not in written and "# the trainer's inputs below" in written
    assert "      - recon/network/model.py   # the student\n" in written                 # an entry's comment kept
    # every line but the code entries (and the comment added above) is the original's, in order
    def rest(text):
        return [line for line in text.splitlines() if not codedeps.is_code(line.strip(" -").split("#")[0].strip())
                and "the trainer's inputs below" not in line]
    assert rest(written) == rest(original)
    assert written.replace("   # the student", "").replace("      # the trainer's inputs below\n", "") == original


def test_check_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "recon.runtime.codedeps", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
