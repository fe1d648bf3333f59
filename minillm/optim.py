"""The optimizers of --optimizer. Each is one torch.optim.Optimizer whose param groups all take
the loop's learning rate (set_lr sets every group's "lr" before each step) and whose state_dict
holds only tensors and JSON-able values (checkpoint.optimizer_to_tensors saves it; a resumed run
continues bit for bit).

    adamw  AdamW (Loshchilov & Hutter, 2019): the default and the safe choice. Its steps are about
           lr per element whatever the gradient's scale, so one learning rate suits every weight.
           Two moments per weight.
    sgd    SGD with Nesterov momentum (0.9): one buffer per weight, the least memory; a baseline.
           Its step is lr times the (momentum-averaged) gradient, not ~lr per element, so it wants
           a larger learning rate than AdamW, found per model. Weight decay is L2 (added to the
           gradient), as torch.optim.SGD does it.
    muon   Muon (Jordan et al., 2024) on the hidden matrices, AdamW on everything else, in one
           optimizer (class Muon). Muon orthogonalises each matrix's momentum (newton_schulz), so
           the update moves every direction of the matrix by about the same amount, however
           lopsided the gradient's spectrum; it has trained transformers to a given loss in fewer
           steps than AdamW (the modded-nanoGPT speedrun; Liu et al., 2025). The hidden matrices
           are the trainable 2-D weights inside model.blocks: attention and MLP projections (fused
           ones, qkv or SwiGLU's gate and up, are orthogonalised whole, as torch.optim.Muon does)
           and LoRA's A and B where LoRA wraps them. Embeddings, the LM head tied to them,
           classifier heads, norms and biases are not hidden matrices: AdamW takes them. Muon needs
           whole matrices, so it does not run under --fsdp.

All three decay only weights of two or more dimensions (never biases and norm gains), and count
a weight used in two places (the GPT's embedding and LM head) once.

Muon's learning rate. The orthogonalised update of an m x n matrix has singular values near 1, so
its elements have an RMS of about 1/sqrt(max(m, n)). Scaling the step by 0.2 * sqrt(max(m, n))
("match_rms_adamw": Liu et al., 2025, "Muon is Scalable for LLM Training"; torch.optim.Muon's
adjust_lr_fn="match_rms_adamw") makes its RMS about 0.2 * lr, like an AdamW step. So one --lr
drives both parts, and the --lr and --weight-decay tuned for AdamW are the place to start.
Jordan's original scaling, sqrt(max(1, m / n)), wants lr ~0.02 for the matrices alone, which no
one learning rate can share with AdamW: it is Muon(lr_adjustment="original"), not a flag.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "sgd", "muon")
DEFAULT_MOMENTUM = {"sgd": 0.9, "muon": 0.95}
# Jordan's quintic a x + b x^3 + c x^5: the steepest slope at 0 (a) that still keeps every
# singular value within about [0.7, 1.2] after 5 steps. Small singular values grow ~a-fold a
# step, so 5 steps suffice; landing near 1 rather than on it costs nothing measurable.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
LR_ADJUSTMENTS = ("match_rms_adamw", "original")
SHARDED_MUON = "--optimizer muon orthogonalises whole matrices; it does not run under --fsdp"


def build_optimizer(model: nn.Module, kind: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.99), momentum: Optional[float] = None,
                    nesterov: bool = True) -> torch.optim.Optimizer:
    """The optimizer `kind` names over the model's trainable weights. betas: AdamW's (Muon's
    AdamW part too). momentum: SGD's and Muon's (None: DEFAULT_MOMENTUM); AdamW has --beta1
    instead, and refuses one. nesterov: SGD's and Muon's."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if kind == "adamw" and momentum is not None:
        raise ValueError("--momentum is for --optimizer sgd or muon; AdamW's momentum is --beta1")
    params = trainable_parameters(model)
    if kind == "adamw":
        # the fused implementation runs on CPU and CUDA; other devices take the foreach one
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(decay_groups(params, weight_decay), lr=lr, betas=betas, eps=1e-8, fused=fused)
    momentum = DEFAULT_MOMENTUM[kind] if momentum is None else momentum
    if kind == "sgd":
        # foreach left to torch: its multi-tensor path on accelerators, where it pays, a loop on CPU.
        # torch refuses Nesterov without momentum, where it would be plain SGD anyway.
        return torch.optim.SGD(decay_groups(params, weight_decay), lr=lr, momentum=momentum,
                               nesterov=nesterov and momentum > 0)
    return Muon(muon_groups(model, params, weight_decay), lr=lr, betas=betas, momentum=momentum, nesterov=nesterov)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each trainable parameter once, in the model's order (a tied weight is one parameter)."""
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and embeddings), none on biases and norm gains: decaying those
    pulls a norm's gain towards 0 and a bias towards no offset, which helps nothing."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def muon_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Muon's group (the 2-D weights inside model.blocks), then decay_groups of the rest for AdamW."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError("--optimizer muon needs a transformer: its hidden matrices are the weights in model.blocks")
    in_blocks = {id(p) for p in blocks.parameters()}
    hidden = [p for p in params if id(p) in in_blocks and p.dim() == 2]
    hidden_ids = {id(p) for p in hidden}
    others = [p for p in params if id(p) not in hidden_ids]
    return [{"params": hidden, "muon": True, "weight_decay": weight_decay},
            *({**group, "muon": False} for group in decay_groups(others, weight_decay))]


def newton_schulz(g: torch.Tensor, coefficients: Iterable[float] = NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About U V^T for g = U S V^T (the semi-orthogonal matrix nearest g), in `dtype`: the
    quintic iteration X <- a X + (b A + c A^2) X with A = X X^T maps each singular value s of X to
    a s + b s^3 + c s^5 and leaves the singular vectors alone (Jordan et al., 2024)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype)
    x = x.T if tall else x  # work on the wide side: X X^T is then the smaller Gram matrix
    # The Frobenius norm bounds the spectral norm: every singular value now lies in [0, 1],
    # where the iteration converges. eps keeps a zero gradient from dividing by zero.
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def adjusted_lr(lr: float, shape: torch.Size, adjustment: str) -> float:
    """Muon's step size for an m x n matrix (see the module docstring)."""
    rows, cols = shape
    if adjustment == "match_rms_adamw":
        scale = 0.2 * math.sqrt(max(rows, cols))  # steps of RMS ~0.2 * lr, as AdamW's
    else:
        scale = math.sqrt(max(1, rows / cols))  # Jordan's: update RMS 1/sqrt(cols) for tall and wide alike
    return lr * scale


class Muon(torch.optim.Optimizer):
    """Muon on the param groups marked "muon": True (2-D weights), AdamW on those marked False:
    one optimizer, so set_lr and the checkpoint treat it as any other. Every group carries both
    parts' settings; each part reads its own. Both read the group's lr at each step, so a schedule
    moves Muon's adjusted step with AdamW's.

    The Muon step (as torch.optim.Muon and Jordan's reference): the momentum buffer is an average,
    B <- lerp(B, G, 1 - momentum); Nesterov looks ahead, U = lerp(G, B, momentum), else U = B;
    W <- W (1 - lr * weight_decay) - adjusted_lr * newton_schulz(U). The AdamW step is
    torch.optim.AdamW's, element for element.

    ns_dtype: the precision of Newton-Schulz, a setting of this object, not saved with its state.
    None: bfloat16 on CUDA, as the reference implementations (the result only needs singular values
    near 1, and bfloat16 matmuls are many times faster there); float32 elsewhere, where bfloat16
    matmuls are no faster and only add noise."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_steps: int = NS_STEPS,
                 ns_eps: float = 1e-7, lr_adjustment: str = "match_rms_adamw",
                 ns_dtype: Optional[torch.dtype] = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"Muon's momentum must be in [0, 1), got {momentum}")
        if lr_adjustment not in LR_ADJUSTMENTS:
            raise ValueError(f"lr_adjustment must be one of {', '.join(LR_ADJUSTMENTS)}, got {lr_adjustment!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps, ns_eps=ns_eps,
                        lr_adjustment=lr_adjustment)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, refusing a group that does not say which part it is, or gives Muon a weight
        that is not one whole matrix."""
        if not isinstance(param_group.get("muon"), bool):
            raise ValueError('each Muon param group says which part it is: "muon": True (2-D weights) or False (AdamW)')
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["muon"]:
            for p in group["params"]:
                if hasattr(p, "to_local"):  # a DTensor: FSDP holds a slice of the matrix
                    raise ValueError(SHARDED_MUON)
                if p.dim() != 2:
                    raise ValueError(f"Muon orthogonalises 2-D weights; got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._muon_update if group["muon"] else self._adamw_update
            for p in group["params"]:
                if p.grad is not None:
                    update(p, p.grad, self.state[p], group)
        return loss

    def _muon_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        direction = grad.lerp(buf, momentum) if group["nesterov"] else buf
        dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
        orthogonal = newton_schulz(direction, group["ns_coefficients"], group["ns_steps"], group["ns_eps"], dtype)
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])  # decoupled decay, from the unadjusted lr (as AdamW's)
        p.add_(orthogonal, alpha=-adjusted_lr(lr, p.shape, group["lr_adjustment"]))

    @staticmethod
    def _adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if not state:
            # the step count is a number, not a tensor: it travels in the checkpoint's JSON
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        step, lr, (beta1, beta2) = state["step"], group["lr"], group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # the moments start at 0: divide out their bias towards it, (1 - beta^step)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """One line for the run's announcement: "Muon (momentum 0.95) on 24 hidden matrices (10.62M
    params), AdamW on 38 others (4.10M)"."""
    def millions(params: list[torch.Tensor]) -> str:
        return f"{sum(p.numel() for p in params) / 1e6:.2f}M"

    if isinstance(opt, Muon):
        hidden = [p for g in opt.param_groups if g["muon"] for p in g["params"]]
        others = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
        return (f"Muon (momentum {opt.defaults['momentum']}) on {len(hidden)} hidden matrices "
                f"({millions(hidden)} params), AdamW on {len(others)} others ({millions(others)})")
    params = [p for g in opt.param_groups for p in g["params"]]
    name = type(opt).__name__
    if isinstance(opt, torch.optim.SGD):
        nesterov = ", Nesterov" if opt.defaults["nesterov"] else ""
        name += f" (momentum {opt.defaults['momentum']}{nesterov})"
    return f"{name} on {len(params)} tensors ({millions(params)} params)"
