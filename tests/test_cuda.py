"""The same model on a CUDA device: reference vectors, point ops equal to the CPU's, and a bf16
autocast training step that keeps the stop-gradient. Skipped where no GPU is present (CI);
`bench/gpu_check.sh` runs this file on a lent GPU machine."""
from __future__ import annotations

import pytest
import torch

from recon import pointops as po
from recon.model import ReConClassifier, ReConPretrain
from recon.checkpoint import reference_to_ours
from recon.optim import adamw
from test_gradients import is_patch_side, is_query_side, nonzero, small_cfg
from test_model_reference import ATOL, load_vector, state_of, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.float()).abs().max().item()


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_pretrain_reference_vector_on_cuda(use_sdpa):
    vec, meta = load_vector("pretrain_tiny_vector")
    model = ReConPretrain(tiny_cfg(meta)).eval()
    model.load_state_dict(reference_to_ours(state_of(vec), "pretrain"), strict=True)
    model.to(CUDA)
    for m in model.modules():
        if hasattr(m, "use_sdpa"):
            m.use_sdpa = use_sdpa
    with torch.no_grad():
        out = model(*(vec[f"input.{k}"].to(CUDA) for k in ("points", "img_teacher_feat", "text_teacher_feat")),
                    mask=vec["input.mask"].to(CUDA))
    errors = {ours: max_abs_err(out[ours], vec[f"out.{ref}"]) for ours, ref in
              (("center", "center"), ("tokens", "enc_tokens_normed"), ("cls", "cls_query"),
               ("img", "img_query"), ("txt", "text_query"), ("rebuild_points", "rebuild_points"),
               ("img_proj", "img_proj"), ("text_proj", "text_proj"), ("loss_rec", "loss_rec"),
               ("loss_img", "loss_img"), ("loss_text", "loss_text"), ("loss", "loss_total"))}
    print("max abs error on CUDA:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v <= ATOL for v in errors.values()), errors


def test_finetune_reference_vector_on_cuda():
    vec, meta = load_vector("finetune_tiny_vector")
    model = ReConClassifier(tiny_cfg(meta), num_classes=meta["config"]["cls_dim"], head="full").eval()
    model.load_state_dict(reference_to_ours(state_of(vec), "finetune"), strict=True)
    model.to(CUDA)
    with torch.no_grad():
        logits = model(vec["input.points"].to(CUDA))
    err = max_abs_err(logits, vec["out.logits"])
    print(f"finetune logits max abs error on CUDA: {err:.1e}")
    assert err <= ATOL


def test_point_ops_on_cuda_equal_the_cpu():
    torch.manual_seed(0)
    pts = torch.rand(8, 1024, 3) * 2 - 1
    idx_cpu = po.farthest_point_sample(pts, 64)
    idx_gpu = po.farthest_point_sample(pts.to(CUDA), 64)
    assert torch.equal(idx_gpu.cpu(), idx_cpu)
    centers = po.gather_points(pts, idx_cpu)
    assert torch.equal(po.knn(centers.to(CUDA), pts.to(CUDA), 32).cpu(), po.knn(centers, pts, 32))
    a, b = torch.rand(16, 32, 3), torch.rand(16, 32, 3)
    torch.testing.assert_close(po.chamfer_l2(a.to(CUDA), b.to(CUDA)).cpu(), po.chamfer_l2(a, b),
                               rtol=1e-5, atol=1e-6)


def test_bf16_training_step_keeps_the_stop_gradient():
    torch.manual_seed(0)
    model = ReConPretrain(small_cfg()).to(CUDA).train()
    optimizer = adamw(model, 0.05, 1e-3)
    pts, img, txt = torch.randn(4, 128, 3, device=CUDA), torch.randn(4, 24, device=CUDA), torch.randn(4, 20, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(pts, img, txt)
    (out["loss_img"] + out["loss_text"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert not [n for n, g in grads.items() if is_patch_side(n) and nonzero(g)]
    assert [n for n, g in grads.items() if is_query_side(n) and nonzero(g)]
    optimizer.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):  # whole loss, fused AdamW: finite and moving
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pts, img, txt)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_whole_training_step_captures_as_one_cuda_graph():
    """bench_pretrain --cuda-graph: the step (forward with its random mask, backward, capturable
    fused AdamW) replays from one CUDA graph and still learns a fixed batch."""
    from bench.bench_pretrain import GraphedStep
    from recon.optim import param_groups
    torch.manual_seed(0)
    model = ReConPretrain(small_cfg()).to(CUDA).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, 1e-3), lr=1e-3, fused=True, capturable=True)
    step = GraphedStep(model, optimizer, bf16=True)
    pts, img, txt = torch.randn(8, 128, 3, device=CUDA), torch.randn(8, 24, device=CUDA), torch.randn(8, 20, device=CUDA)
    losses = [step(pts, img, txt).item() for _ in range(30)]
    assert step.graph is not None and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
