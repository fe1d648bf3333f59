"""What the kernel tests share: running an op forward and backward on fresh copies of its
inputs, FlashAttention's tolerance rule, and a check that the Triton kernels really ran.

The tolerance rule (FlashAttention-2's tests use it): for every output and gradient,

    max|ours - ref| <= 2 * max|torch_lowp - ref| + atol + rtol * max|ref|

where `ref` is an independent PyTorch computation (a torch op, or the formula written out in
the test) in float64, and `torch_lowp` is the same PyTorch computation in the inputs' own
dtype. Ours may be at most twice as far from the exact answer as PyTorch is at the same
precision, plus a small epsilon that each test file states per dtype (about one unit in the
last place; the interpreter truncates float32 -> bf16 where a GPU rounds). Non-finite values
of the reference must be matched exactly, and ours may hold no NaN the reference lacks.

Inputs keep their layout: `clone()` and `.to()` make a strided or expanded tensor contiguous,
so a test of non-contiguous inputs would silently test contiguous ones. Here every floating
input is copied into a fresh tensor with the same strides (an expanded dimension is expanded
again from a size-1 leaf), and so is every upstream gradient. The copies are made on DEVICE:
the GPU where there is one (the kernels run natively), the CPU otherwise (under the
interpreter, which conftest.py selects).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) of the rule, for outputs and gradients of the norms, activations and RoPE.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 8e-3)}


def same_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf on DEVICE with t's values, cast to dtype, and t's strides for every
    dimension that t does not expand; expanded dimensions (stride 0) have size 1 here:
    `.expand(t.shape)` restores t's exact layout."""
    src = t.detach()[tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())]
    copy = torch.empty_strided(src.shape, src.stride(), dtype=dtype or t.dtype, device=DEVICE)
    return copy.copy_(src)


def on_device(t):
    """t on DEVICE with its layout kept (None and non-tensors pass through)."""
    return same_layout(t).expand(t.shape) if isinstance(t, torch.Tensor) else t


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def outputs_and_grads(fn, inputs, upstream, dtype: torch.dtype | None = None) -> list:
    """[*outputs of fn(*inputs), *gradients of its floating-point inputs], detached.

    inputs: tensors (the floating ones are copied, cast to `dtype` if given, with their layout
        kept, and become the leaves whose gradients are returned), None, or anything else
        (integer targets, lengths), passed as is.
    upstream: the gradient flowing into each output (one tensor, or a sequence with None for
        an output that takes no part in the backward), cast to the output's dtype with its
        layout kept.
    """
    leaves, args = [], []
    for t in inputs:
        if _is_float(t):
            leaf = same_layout(t, dtype).requires_grad_()
            leaves.append(leaf)
            args.append(leaf.expand(t.shape))
        else:
            args.append(on_device(t))
    out = fn(*args)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    ups = list(upstream) if isinstance(upstream, (tuple, list)) else [upstream]
    assert len(ups) == len(outs), f"{len(outs)} outputs but {len(ups)} upstream gradients"
    pairs = [(o, same_layout(u, o.dtype).expand(u.shape)) for o, u in zip(outs, ups) if u is not None]
    torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
    return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]


def assert_fa2(name: str, ours, ref, lowp, atol: float, rtol: float):
    """The tolerance rule above, for one tensor: ours and lowp against the float64 ref."""
    ours, ref, lowp = ours.double(), ref.double(), lowp.double()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert not torch.isnan(ours[~torch.isnan(ref)]).any(), f"{name}: NaN where the reference has none"
    assert torch.equal(torch.isfinite(ours), finite), f"{name}: infinities differ from the reference"
    assert torch.equal(ours[~finite].nan_to_num(), ref[~finite].nan_to_num()), \
        f"{name}: infinities differ from the reference"
    if not finite.any():
        return
    err = (ours - ref)[finite].abs().max().item()
    torch_err = (lowp - ref)[finite].abs().max().item()
    bound = 2 * torch_err + atol + rtol * ref[finite].abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch's own: {torch_err:.3g})"


@contextlib.contextmanager
def launches(*kernels):
    """Count the launches of these @triton.jit kernels inside the block (by kernel name).

    A kernel test asserts the count, so that a silent fallback to the PyTorch reference (a
    wrong dispatch condition, Triton missing) fails instead of passing."""
    counts = Counter()
    hooks = []
    for kernel in kernels:
        def hook(*args, _name=kernel.__name__, **kwargs):
            counts[_name] += 1
        kernel.pre_run_hooks.append(hook)
        hooks.append((kernel, hook))
    try:
        yield counts
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)


def check_op(ours, torch_fn, inputs, upstream, names, tol=TOL, kernels=()):
    """Hold `ours` to the tolerance rule against `torch_fn` (float64 reference, and the
    low-precision baseline in the inputs' dtype) on every output and input gradient.

    names: one per output, then one per input (the gradients are named "d" + name; entries
        of inputs that get no gradient are skipped). tol: {dtype: (atol, rtol)}, looked up
        with the first floating input's dtype. kernels: the @triton.jit kernels that must
        each run at least once.
    """
    dtype = next(t.dtype for t in inputs if _is_float(t))
    with launches(*kernels) as counts:
        got = outputs_and_grads(ours, inputs, upstream)
    for kernel in kernels:
        assert counts[kernel.__name__] > 0, f"{kernel.__name__} did not run (a fallback took over)"
    ref = outputs_and_grads(torch_fn, inputs, upstream, dtype=torch.float64)
    lowp = outputs_and_grads(torch_fn, inputs, upstream)
    n_out = len(got) - sum(map(_is_float, inputs))
    labels = list(names[:n_out]) + ["d" + n for n, t in zip(names[n_out:], inputs) if _is_float(t)]
    assert len(labels) == len(got), f"names {names} do not match {len(got)} outputs and gradients"
    atol, rtol = tol[dtype]
    for label, o, r, lp in zip(labels, got, ref, lowp):
        assert o.dtype == lp.dtype, f"{label}: dtype {o.dtype}, torch gives {lp.dtype}"
        assert_fa2(f"{label} ({dtype})", o, r, lp, atol, rtol)
