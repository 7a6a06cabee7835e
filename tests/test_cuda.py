"""The same model on a CUDA device: reference vectors, point ops equal to the CPU's, a bf16
autocast training step that keeps the stop-gradient, and forward + backward replayed as a CUDA
graph (recon.runtime.cudagraph, `recon pretrain --cuda-graph [--compile]`) training as eager steps do.
Skipped where no GPU is present (CI); `bench/gpu_check.sh` runs this file on a lent GPU machine."""
from __future__ import annotations

import copy

import pytest
import torch
from test_gradients import is_patch_side, is_query_side, nonzero, small_cfg
from test_model_reference import ATOL, load_vector, state_of, tiny_cfg

from recon.network import pointops as po
from recon.network.model import ReConClassifier, ReConPretrain
from recon.network.reference import reference_to_ours
from recon.runtime.cudagraph import GraphedForwardBackward
from recon.runtime.optim import adamw

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


def fixed_mask(model: ReConPretrain, batch: int) -> torch.Tensor:
    """Make `model` mask the same groups every call (a capturable stand-in for its random mask)."""
    G, M = model.cfg.num_group, model.cfg.num_mask
    mask = torch.stack([torch.randperm(G)[:M] for _ in range(batch)])
    mask = torch.zeros(batch, G, dtype=torch.bool).scatter_(1, mask, True).to(CUDA)
    model.random_mask = lambda *args, **kwargs: mask
    return mask


def loss_fn(model: ReConPretrain, accum: int = 1, bf16: bool = False):
    def forward(pts, img, txt):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = model(pts, img, txt)["loss"] / accum
        return loss, loss.detach()
    return forward


def batches(n: int, batch: int = 4) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.randn(batch, 128, 3, device=CUDA), torch.randn(batch, 24, device=CUDA),
             torch.randn(batch, 20, device=CUDA)) for _ in range(n)]


def test_graphed_forward_backward_equals_eager_with_accumulation():
    """recon.runtime.cudagraph: each replay gives the eager loss, adds the eager gradients to fixed buffers
    (2 micro-batches per step), leaves unreached parameters' grads None, and the fused AdamW steps
    taken from them move weights and batch-norm statistics exactly as eager training does."""
    torch.manual_seed(0)
    eager = ReConPretrain(small_cfg()).to(CUDA).train()
    twin = copy.deepcopy(eager)
    mask = fixed_mask(eager, 4)
    twin.random_mask = lambda *args, **kwargs: mask
    opt_eager, opt_twin = adamw(eager, 0.05, 1e-3), adamw(twin, 0.05, 1e-3)
    graphed = GraphedForwardBackward(loss_fn(twin, accum=2), twin)
    data = batches(6)
    for step in range(3):
        for micro in range(2):
            inputs = data[2 * step + micro]
            loss, _ = loss_fn(eager, accum=2)(*inputs)
            loss.backward()
            torch.testing.assert_close(graphed(*inputs), loss.detach(), rtol=1e-5, atol=1e-7)
        for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        opt_eager.step()
        opt_eager.zero_grad(set_to_none=True)
        opt_twin.step()
        opt_twin.zero_grad(set_to_none=False)
    assert graphed.graph is not None
    torch.testing.assert_close(twin.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="keep batches full"):
        graphed(*batches(1, batch=3)[0])


def test_graph_replays_draw_the_random_masks_eager_draws():
    """Capture consumes no random numbers: from the same CUDA seed, replays see the masks (and
    losses) of eager steps, and each step draws a new mask."""
    torch.manual_seed(0)
    model = ReConPretrain(small_cfg()).to(CUDA).train()
    inputs = batches(1)[0]
    torch.cuda.manual_seed(1)
    eager = [loss_fn(model)(*inputs)[0].item() for _ in range(3)]
    torch.cuda.manual_seed(1)
    graphed = GraphedForwardBackward(loss_fn(model), model)
    replayed = [graphed(*inputs).item() for _ in range(3)]
    assert len(set(eager)) == 3
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=1e-5, atol=1e-7)


def test_pretrain_with_cuda_graph_follows_eager_training_and_resumes(tmp_path):
    """`recon pretrain --cuda-graph` (bf16, gradient accumulation): same losses as the eager trainer,
    and a run killed after 3 steps resumes to the same end."""
    pytest.importorskip("polars")
    pytest.importorskip("zarr")
    from test_pretrain import tiny_params

    from conftest import write_synthetic_cache
    from recon.pretraining.trainer import train

    cache = write_synthetic_cache(tmp_path / "cache")
    quiet = dict(log=lambda *_: None)
    eager = train(tiny_params(device="cuda", micro_batch=2), cache, tmp_path / "eager", **quiet)
    graphed = train(tiny_params(device="cuda", micro_batch=2, cuda_graph=True), cache, tmp_path / "graph", **quiet)
    train(tiny_params(device="cuda", micro_batch=2, cuda_graph=True, max_steps=3), cache, tmp_path / "resumed", **quiet)
    resumed = train(tiny_params(device="cuda", micro_batch=2, cuda_graph=True), cache, tmp_path / "resumed", **quiet)
    for run in (graphed, resumed):
        assert [r["step"] for r in run["history"]] == [r["step"] for r in eager["history"]] == [3, 6]
        for key in ("loss", "loss_rec", "loss_img", "loss_text"):
            torch.testing.assert_close(torch.tensor([r[key] for r in run["history"]]),
                                       torch.tensor([r[key] for r in eager["history"]]), rtol=2e-2, atol=1e-4)
    print("eager", [round(r["loss"], 5) for r in eager["history"]],
          "graphed", [round(r["loss"], 5) for r in graphed["history"]],
          "resumed", [round(r["loss"], 5) for r in resumed["history"]])


def test_pretrain_with_cuda_graph_of_the_compiled_student(tmp_path):
    """`--cuda-graph --compile`: the torch.compiled student's forward + backward replayed as one
    graph trains to the eager trainer's losses (bf16; compiled kernels round differently)."""
    pytest.importorskip("polars")
    pytest.importorskip("zarr")
    from test_pretrain import tiny_params

    from conftest import write_synthetic_cache
    from recon.pretraining.trainer import train

    cache = write_synthetic_cache(tmp_path / "cache")
    eager = train(tiny_params(device="cuda", epochs=1), cache, tmp_path / "eager", log=lambda *_: None)
    both = train(tiny_params(device="cuda", epochs=1, cuda_graph=True, compile=True), cache, tmp_path / "both",
                 log=lambda *_: None)
    assert both["history"][0]["step"] == eager["history"][0]["step"] == 3
    torch.testing.assert_close(both["history"][0]["loss"], eager["history"][0]["loss"], rtol=5e-2, atol=1e-3)
