"""ONNX export: the export-friendly FPS equals farthest_point_sample, and onnxruntime logits match
torch to 1e-4 for other batch sizes and point counts than the traced example."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from recon.downstream.export import check_onnx, export_onnx, fps_exportable
from recon.downstream.recipes import FinetuneParams
from recon.downstream.weights import save_model
from recon.network.model import ReConClassifier, ReConConfig
from recon.network.pointops import farthest_point_sample


def trained_like(head: str = "full") -> ReConClassifier:
    """A tiny classifier with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    cfg = ReConConfig.variant("tiny", trans_dim=48, depth=2, num_heads=3, decoder_depth=1, decoder_num_heads=3,
                              num_group=8, group_size=16)
    model = ReConClassifier(cfg, 5, head=head).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 128, 3))
    return model.eval()


def test_fps_exportable_equals_farthest_point_sample():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.randn(4, 300, 3, generator=gen)
    xyz[0, 7] = 0.0                                        # a point at the origin is never picked
    xyz[1, :50] *= 0.01                                    # many near-origin points
    xyz[2, 100:] = xyz[2, :200].clone()                    # duplicates: ties break on the first maximum
    xyz[3] = torch.round(xyz[3] * 2) / 2                   # a lattice: many equal distances
    for npoint in (1, 16, 64):
        assert torch.equal(fps_exportable(xyz, npoint), farthest_point_sample(xyz, npoint))


@pytest.mark.parametrize("head", ["full", "linear"])
def test_onnx_logits_match_torch(tmp_path, head):
    model = trained_like(head)
    path = export_onnx(model, tmp_path / "m.onnx", n_points=128)
    rng = np.random.default_rng(1)
    for batch, n in ((2, 128), (3, 200), (1, 64)):
        diff = check_onnx(path, model, rng.normal(size=(batch, n, 3)).astype(np.float32))
        assert diff <= 1e-4


def test_export_stage_and_cli(tmp_path, monkeypatch):
    from cli import export

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    model = trained_like()
    p = FinetuneParams(n_points=128)
    save_model(tmp_path / "model.pt", model, [f"c{i}" for i in range(5)], p, p.recipe(), epoch=0)
    app = typer.Typer()
    app.command("export")(export)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "model.pt"),
                                      "--onnx", str(tmp_path / "out" / "c.onnx")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "metrics" / "out" / "check_details.json").read_text())
    assert report["n_points"] == 128 and report["classes"] == 5 and report["max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "metrics" / "out" / "check.json").read_text()) == {"onnx_ok": True}
