"""One Python process renders, then fine-tunes, then pretrains (as a notebook kernel would).

Before rendering moved to its own process this segfaulted: Mesa's llvmpipe loads libLLVM into
the rendering process, and the first torch optimizer imports torch._dynamo, which imports
triton and its own LLVM. The sequence runs in a fresh interpreter, so a crash shows as a
failed test with the child's exit status, not as a dead test session."""

from __future__ import annotations

import subprocess
import sys

import trimesh

from conftest import ROOT

SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import torch
from pipeline.render import RenderConfig, render_views
from conftest import write_synthetic_cache
from test_finetune import SMALL_RUN, synthetic
from test_pretrain import tiny_params
from recon.downstream import finetune as FT
from recon.downstream import recipes as R
from recon.pretraining.trainer import train

images = render_views(sys.argv[1], RenderConfig(resolution=64))
print("rendered", int((images < 250).any(-1).sum()), flush=True)
result = FT.finetune(R.FinetuneParams(**{**SMALL_RUN, "epochs": 1, "votes": 0}), synthetic(4, 3), None,
                     seed=0, log=lambda *_: None)
print("finetuned", len(result.history), flush=True)
metrics = train(tiny_params(epochs=1), write_synthetic_cache(Path(sys.argv[3]) / "cache"), Path(sys.argv[3]) / "run",
                log=lambda *_: None)
print("pretrained", len(metrics["history"]), flush=True)
"""


def test_render_then_finetune_then_pretrain_in_one_process(tmp_path):
    mesh = tmp_path / "box.ply"
    trimesh.creation.box([1.0, 0.6, 0.4]).export(mesh)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(mesh), str(ROOT / "tests"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert int(lines["rendered"]) > 200            # the box is in the picture
    assert lines["finetuned"] == "1" and lines["pretrained"] == "1"
