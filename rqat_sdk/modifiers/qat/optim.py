"""AdamW on fp32 master copies of low-precision parameters.

The seed paper trains with learning rates of 1e-6: an update that small vanishes when added to a bf16
weight (bf16 keeps 8 bits of mantissa). The model keeps its bf16 weights, so activations, memory and the
fake-quantized forward are those of the bf16 model; the optimizer holds an fp32 copy of each bf16
parameter, steps it with the gradient upcast to fp32, and writes it back rounded. fp32 parameters are
their own masters.
"""

from __future__ import annotations

from typing import Any, cast

import torch


class MasterWeightOptimizer:
    def __init__(self, groups: list[dict[str, Any]], optimizer_class: type[torch.optim.Optimizer], **defaults: Any):
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        inner_groups = []
        for group in groups:
            masters = []
            for parameter in group["params"]:
                master = parameter if parameter.dtype == torch.float32 else parameter.detach().float().clone()
                self.pairs.append((parameter, master))
                masters.append(master)
            inner_groups.append({**group, "params": masters})
        self.optimizer = optimizer_class(inner_groups, **defaults)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def parameters(self) -> list[torch.nn.Parameter]:
        """The model's parameters this optimizer trains (for gradient clipping)."""
        return [parameter for parameter, _ in self.pairs]

    @torch.no_grad()
    def step(self) -> None:
        low = [(p, m) for p, m in self.pairs if m is not p and p.grad is not None]
        grads = [torch.empty_like(master) for _, master in low]
        for (_, master), grad in zip(low, grads, strict=True):
            master.grad = grad
        if low:
            sources = [cast(torch.Tensor, p.grad) for p, _ in low]  # not None: low keeps those with a gradient
            torch._foreach_copy_(grads, sources)  # upcast, few launches
        self.optimizer.step()
        if low:
            torch._foreach_copy_([p for p, _ in low], [m for _, m in low])  # round back to the model's dtype
        for _, master in low:
            master.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter, _ in self.pairs:
            parameter.grad = None

    def state_dict(self) -> dict[str, Any]:
        masters = [master for parameter, master in self.pairs if master is not parameter]
        return {"optimizer": self.optimizer.state_dict(), "masters": masters}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        masters = [master for parameter, master in self.pairs if master is not parameter]
        if len(masters) != len(state["masters"]):
            raise ValueError(f"checkpoint holds {len(state['masters'])} master weights, the model {len(masters)}")
        for master, saved in zip(masters, state["masters"], strict=True):
            master.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
