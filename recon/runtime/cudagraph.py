"""One micro-batch's forward + backward captured as a CUDA graph and replayed every step.

The eager student is launch-bound on a fast GPU (thousands of small kernels per step); a replay
issues them as one graph. Only forward and backward are captured: the caller reads the loss
terms after each replay and runs the (fused, eager) optimizer step itself, so the non-finite-loss
guard still stops *before* an optimizer step can use bad gradients, and the learning-rate
schedule, checkpoints and resume need nothing special.

Contract: inputs keep their shapes (drop the last partial batch) and no DDP. ``fn`` may call a
``torch.compile``d model (default mode; not ``reduce-overhead``, which makes graphs of its own).
Gradients live in fixed buffers that each replay *adds* to (so gradient accumulation works):
zero them with ``optimizer.zero_grad(set_to_none=False)``, never set them to ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

#: fn(*inputs) -> (loss to back-propagate, detached report tensor, e.g. the stacked loss terms)
StepFn = Callable[..., tuple[Tensor, Tensor]]


class GraphedForwardBackward:
    """Call with the step's input tensors (``None`` allowed); returns the report tensor of this
    replay (a fixed buffer: read it before the next call). Captures on the first call, after
    ``warmup`` eager passes on a side stream. The CUDA RNG state and ``module``'s buffers (batch-norm
    running statistics) are restored after capture, so capturing leaves no trace: a resumed run
    draws the random masks an uninterrupted one would, and the weights match eager training."""

    def __init__(self, fn: StepFn, module: nn.Module, warmup: int = 3) -> None:
        self.fn, self.warmup = fn, warmup
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buffers = list(module.buffers())
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[Tensor | None] = []
        self.report: Tensor | None = None

    def _pass(self) -> Tensor:
        loss, report = self.fn(*self.static)
        loss.backward()
        return report

    def _capture(self, inputs: tuple[Tensor | None, ...]) -> None:
        if any(x is not None and not x.is_cuda for x in inputs):
            raise ValueError("CUDA-graph capture needs every input on a CUDA device")
        device = next(x for x in inputs if x is not None).device
        rng = torch.cuda.get_rng_state(device)
        grads_before = [None if p.grad is None else p.grad.clone() for p in self.params]
        buffers_before = [b.clone() for b in self.buffers]
        self.static = [None if x is None else x.clone() for x in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as the CUDA-graph docs ask
            for _ in range(self.warmup):
                self._pass()
        torch.cuda.current_stream(device).wait_stream(side)
        for buffer, before in zip(self.buffers, buffers_before):
            buffer.copy_(before)
        for p, before in zip(self.params, grads_before):
            # parameters the loss reaches get a fixed zeroed buffer the graph accumulates into;
            # the others keep grad None, so the optimizer skips them exactly as in eager mode
            if p.grad is not None:
                if before is None:
                    p.grad.zero_()
                else:  # restore what the caller had accumulated before this first call
                    p.grad.copy_(before)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.report = self._pass()
        torch.cuda.set_rng_state(rng, device)

    def __call__(self, *inputs: Tensor | None) -> Tensor:
        if self.graph is None:
            self._capture(inputs)
        elif len(inputs) != len(self.static):
            raise ValueError(f"expected {len(self.static)} inputs, got {len(inputs)}")
        for buffer, value in zip(self.static, inputs):
            if buffer is None or value is None:
                if buffer is not value:
                    raise ValueError("an input switched between None and a tensor after capture")
                continue
            if buffer.shape != value.shape:
                raise ValueError(f"CUDA graph captured input shape {tuple(buffer.shape)}, got "
                                 f"{tuple(value.shape)}: keep batches full (drop_last)")
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.report
