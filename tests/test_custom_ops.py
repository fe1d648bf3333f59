"""The kernels as torch.library custom ops: torch.compile(fullgraph=True) traces each public op
(and a small composition) without a graph break, the Triton kernels run inside the compiled
function, and forward and backward match PyTorch; torch.library.opcheck accepts every op;
a second-order gradient raises a clear error where the backward kernel is not differentiable.

On a CPU-only machine under the interpreter with the "aot_eager" backend (no C++ compiler
needed); on a GPU the same, natively. Tolerances: the rule of tests/kernel_check.py with its
float32 table, as the eager tests of each op.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

from minillm.kernels import launch
import minillm.kernels.cross_entropy as ce
import minillm.kernels.fused_linear_cross_entropy as flce
import minillm.kernels.gelu as gelu_mod
import minillm.kernels.layer_norm as ln
import minillm.kernels.rms_norm as rn
import minillm.kernels.rotary as rotary
import minillm.kernels.swiglu as swiglu_mod
from kernel_check import DEVICE, check_op, launches

pytestmark = pytest.mark.skipif(not (launch.HAS_TRITON and (launch.INTERPRET or torch.cuda.is_available())),
                                reason="needs Triton, and a GPU or TRITON_INTERPRET=1")


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def rotate(q, k, cos, sin):
    """The rotate-half RoPE written out (the convention of kernels/rotary.py)."""
    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return rot(q), rot(k)


def tables(t, half):
    angles = torch.outer(torch.arange(t, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(half) / half))
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


g = torch.Generator().manual_seed(0)
X = torch.randn(3, 5, 40, generator=g)
W, B = torch.randn(40, generator=g) + 1, torch.randn(40, generator=g)
COS, SIN = tables(5, 8)
TARGETS = torch.tensor([3, -100, 0, 16, 5, 2])

# (name, our op, torch's, inputs, upstream gradients, output + input names, kernels that must run)
CASES = [
    ("gelu", gelu_mod.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), [X], torch.randn(3, 5, 40),
     ("y", "x"), (gelu_mod._gelu_fwd_kernel, gelu_mod._gelu_bwd_kernel)),
    ("swiglu", swiglu_mod.swiglu, lambda a, b: F.silu(a) * b, [X, X.flip(0)], torch.randn(3, 5, 40),
     ("y", "gate", "up"), (swiglu_mod._swiglu_fwd_kernel, swiglu_mod._swiglu_bwd_kernel)),
    ("layer_norm", lambda x, w, b: ln.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (40,), w, b),
     [X, W, B], torch.randn(3, 5, 40), ("y", "x", "weight", "bias"),
     (ln._layer_norm_fwd_kernel, ln._layer_norm_bwd_kernel)),
    ("rms_norm", lambda x, w: rn.rms_norm(x, w), lambda x, w: F.rms_norm(x, (40,), w, 1e-6), [X, W],
     torch.randn(3, 5, 40), ("y", "x", "weight"), (rn._rms_norm_fwd_kernel, rn._rms_norm_bwd_kernel)),
    ("rotary", lambda q, k: rotary.apply_rotary(q, k, COS, SIN), lambda q, k: rotate(q, k, COS, SIN),
     [torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 1, 5, 16, generator=g)],
     [torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16)], ("q_rot", "k_rot", "q", "k"), (rotary._rotary_kernel,)),
    ("cross_entropy", lambda x, t: ce.cross_entropy(x, t, label_smoothing=0.1),
     lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1), [torch.randn(6, 30, generator=g), TARGETS],
     torch.tensor(1.5), ("loss", "logits", "targets"), (ce._cross_entropy_fwd_kernel,)),
    ("fused_linear_cross_entropy",
     lambda h, w, t, b: flce.fused_linear_cross_entropy(h, w, t, b, chunk_size=4),
     lambda h, w, t, b: F.cross_entropy(F.linear(h, w, b), t),
     [torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g), TARGETS, torch.randn(30, generator=g)],
     torch.tensor(1.5), ("loss", "hidden", "weight", "targets", "bias"), (ce._cross_entropy_fwd_kernel,)),
]
TOL = {torch.float32: (1e-5, 1e-5)}


@pytest.mark.parametrize("name, ours, reference, inputs, upstream, names, kernels_run", CASES,
                         ids=[c[0] for c in CASES])
def test_compiled_fullgraph_runs_the_kernels_and_matches(name, ours, reference, inputs, upstream, names,
                                                         kernels_run):
    """fullgraph=True raises on any graph break; check_op counts the launches inside the
    compiled function and holds forward and backward to the tolerance rule."""
    check_op(compiled(ours), reference, inputs, upstream, names, tol=TOL, kernels=kernels_run)


def test_compiled_composition():
    """rms_norm -> swiglu -> cross_entropy traced as one graph, forward and backward."""
    def block(x, w, targets, norm=rn.rms_norm, act=swiglu_mod.swiglu, loss=ce.cross_entropy):
        h = norm(x, w)
        return loss(act(h[:, :20], h[:, 20:]), targets)

    def reference(x, w, targets):
        return block(x, w, targets, norm=lambda x, w: F.rms_norm(x, (40,), w, 1e-6),
                     act=lambda a, b: F.silu(a) * b, loss=F.cross_entropy)

    x, w = torch.randn(6, 40, generator=g), torch.randn(40, generator=g)
    check_op(compiled(block), reference, [x, w, TARGETS], torch.tensor(1.0), ("loss", "x", "weight", "targets"), tol=TOL,
             kernels=(rn._rms_norm_fwd_kernel, rn._rms_norm_bwd_kernel, swiglu_mod._swiglu_fwd_kernel,
                      swiglu_mod._swiglu_bwd_kernel, ce._cross_entropy_fwd_kernel))


def _on_device(*ts):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts]


def _leaf(t):
    return t.to(DEVICE).requires_grad_()


OPCHECKS = [
    ("gelu_tanh", gelu_mod._gelu_op, lambda: [_leaf(torch.randn(4, 6))]),
    ("gelu_tanh_backward", gelu_mod._gelu_backward_op, lambda: _on_device(torch.randn(4, 6), torch.randn(4, 6))),
    ("swiglu", swiglu_mod._swiglu_op, lambda: [_leaf(torch.randn(4, 6)), _leaf(torch.randn(4, 6))]),
    ("layer_norm", ln._layer_norm_op, lambda: [_leaf(torch.randn(4, 6)), _leaf(torch.randn(6)), None, 1e-5]),
    ("rms_norm", rn._rms_norm_op, lambda: [_leaf(torch.randn(4, 6)), _leaf(torch.randn(6)), _leaf(torch.randn(6)),
                                           1e-6]),
    ("rotary", rotary._rotary_op, lambda: [_leaf(torch.randn(1, 2, 3, 8)), _leaf(torch.randn(1, 1, 3, 8)),
                                           *tables(3, 4), False]),
    ("cross_entropy", ce._cross_entropy_op, lambda: [_leaf(torch.randn(4, 20)), *_on_device(TARGETS[:4]), -100,
                                                     0.0, "mean", True]),
    ("fused_linear_cross_entropy", flce._flce_op,
     lambda: [_leaf(torch.randn(4, 6)), _leaf(torch.randn(20, 6)), *_on_device(TARGETS[:4]), None, -100, 0.0,
              "sum", 2, torch.float32, True, True, False]),
]


@pytest.mark.parametrize("name, op, make_args", OPCHECKS, ids=[c[0] for c in OPCHECKS])
def test_opcheck(name, op, make_args):
    """torch's own checks of a custom op: schema, fake (meta) implementation, autograd
    registration, and the op traced by AOT autograd against eager."""
    torch.library.opcheck(op, make_args())


@pytest.mark.parametrize("name, fn, inputs", [
    ("gelu_tanh", gelu_mod.gelu_tanh, [torch.randn(5)]),
    ("swiglu", swiglu_mod.swiglu, [torch.randn(5), torch.randn(5)]),
    ("layer_norm", ln.layer_norm, [torch.randn(2, 5), torch.randn(5)]),
    ("rms_norm", rn.rms_norm, [torch.randn(2, 5), torch.randn(5)]),
    ("cross_entropy", ce.cross_entropy, [torch.randn(2, 5), torch.tensor([1, 4])]),
    ("fused_linear_cross_entropy", flce.fused_linear_cross_entropy,
     [torch.randn(2, 3), torch.randn(5, 3), torch.tensor([1, 4])]),
])
def test_double_backward_raises(name, fn, inputs):
    """The backward kernels are not differentiable: create_graph=True must raise, not hand
    back a gradient that is silently detached (or wrong)."""
    args = [t.to(DEVICE).requires_grad_() if t.is_floating_point() else t.to(DEVICE) for t in inputs]
    leaves = [a for a in args if a.requires_grad]
    out = fn(*args)
    with pytest.raises(RuntimeError, match=f"{name}: double backward"):
        torch.autograd.grad(out.sum(), leaves, create_graph=True)


def test_rotary_double_backward_is_exact():
    """RoPE's backward is the same kernel rotating the other way, itself differentiable: the
    second-order gradient matches the written-out rotation's."""
    cos, sin = tables(3, 4)
    q, k = torch.randn(1, 2, 3, 8).to(DEVICE), torch.randn(1, 1, 3, 8).to(DEVICE)

    def second_order(fn):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        q_rot, k_rot = fn(qq, kk, cos, sin)
        dq, dk = torch.autograd.grad((q_rot.pow(2).sum() + k_rot.pow(3).sum()), (qq, kk), create_graph=True)
        return torch.autograd.grad(dq.sum() + dk.pow(2).sum(), (qq, kk))

    with launches(rotary._rotary_kernel) as counts:
        ours = second_order(rotary.apply_rotary)
    assert counts[rotary._rotary_kernel.__name__] >= 3, "_rotary_kernel did not run (a fallback took over)"
    for a, b in zip(ours, second_order(rotate)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_launch_guard_selects_the_tensors_device():
    """Triton launches on the current CUDA device: a tensor on cuda:1 must be launched under
    torch.cuda.device(1), or GPU 1 pointers reach a kernel running on GPU 0. The guard is
    built without touching a GPU (entering it needs one); on the CPU it is a no-op."""
    class OnGpu1:  # stands in for a tensor on cuda:1
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = launch.device_guard(OnGpu1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with launch.device_guard(torch.zeros(1)):
        pass
    for module in (gelu_mod, swiglu_mod, ln, rn, rotary, ce):  # every launcher runs inside one
        assert "with device_guard(" in inspect.getsource(module), module.__name__


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_a_second_gpu():
    """With cuda:0 current, ops on cuda:1 tensors give the reference's results."""
    x = torch.randn(4, 64, device="cuda:1")
    w = torch.randn(64, device="cuda:1")
    with torch.cuda.device(0):
        torch.testing.assert_close(rn.rms_norm(x, w), rn.rms_norm_reference(x, w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gelu_mod.gelu_tanh(x), gelu_mod.gelu_tanh_reference(x), atol=1e-5, rtol=1e-5)
        t = torch.randint(0, 64, (4,), device="cuda:1")
        torch.testing.assert_close(ce.cross_entropy(x, t), ce.cross_entropy_reference(x, t), atol=1e-5, rtol=1e-5)
