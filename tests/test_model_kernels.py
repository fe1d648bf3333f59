"""A whole model with its Triton kernels switched on (config.use_kernels, attention backend
"triton", chunked cross-entropy) against the same weights on the plain PyTorch path.
Under TRITON_INTERPRET=1 on a CPU-only machine; on a GPU the real kernels run."""
import pytest
import torch

import kernels
from minillm import GPT, preset
from minillm.fused_ops import fused_op

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")


@pytest.mark.parametrize("variant", [
    dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu"),
    dict(pos_encoding="learned", norm="layernorm", activation="gelu_tanh", chunked_ce=True),
])
def test_gpt_with_kernels_matches_pytorch_path(variant):
    if not (kernels.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.zeros(2, 4, device=device)
    assert fused_op("rms_norm", "rms_norm", probe, enabled=True) is not None  # the kernels do run here
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=32, **variant)
    plain = GPT(cfg.replace(attention_backend="naive")).to(device)
    fused = GPT(cfg.replace(attention_backend="triton", use_kernels=True)).to(device)
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 19), device=device)
    tgt = torch.randint(0, 97, (2, 19), device=device)
    tgt[0, :3] = -100
    _, loss_a = plain(idx, tgt)
    _, loss_b = fused(idx, tgt)
    loss_a.backward()
    loss_b.backward()
    assert abs(loss_a.item() - loss_b.item()) < 1e-4
    ga = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ga[name].grad, atol=2e-4, rtol=1e-3, msg=name)
    with torch.no_grad():
        la, _ = plain(idx)
        lb, _ = fused(idx)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
