"""A whole model with its Triton kernels switched on (config.use_kernels, attention backend
"triton", chunked cross-entropy) against the same weights on the plain PyTorch path.
Under TRITON_INTERPRET=1 on a CPU-only machine; on a GPU the real kernels run.

Every kernel the configuration should use is counted, so a silent fall-back to PyTorch fails
the test; a kernel function that has gone missing raises instead of falling back."""
import importlib

import pytest
import torch

from minillm import GPT, preset
from minillm import kernel_dispatch
from minillm.kernel_dispatch import use_triton
from minillm.kernels import launch
from minillm.norms import RMSNorm

pytestmark = pytest.mark.skipif(not launch.HAS_TRITON, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not (launch.INTERPRET or torch.cuda.is_available()),
                                   reason="needs a GPU or TRITON_INTERPRET=1")


def count_calls(monkeypatch, names):
    """Wrap minillm.kernels.<module>.<function> for each "module.function", counting calls."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        module, fn = name.split(".")
        mod = importlib.import_module(f"minillm.kernels.{module}")
        real = getattr(mod, fn)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(mod, fn, counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("variant,used", [
    (dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu"),
     ["rms_norm.rms_norm", "rotary.apply_rotary", "swiglu.swiglu", "cross_entropy.cross_entropy",
      "flash_attention.flash_attention"]),
    (dict(pos_encoding="learned", norm="layernorm", activation="gelu_tanh", chunked_ce=True),
     ["layer_norm.layer_norm", "gelu.gelu_tanh", "fused_linear_cross_entropy.fused_linear_cross_entropy",
      "flash_attention.flash_attention"]),
])
def test_gpt_with_kernels_matches_pytorch_path(monkeypatch, variant, used):
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=32, **variant)
    plain = GPT(cfg.replace(attention_backend="naive")).to(DEVICE)
    fused = GPT(cfg.replace(attention_backend="triton", use_kernels=True)).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 19), device=DEVICE)
    tgt = torch.randint(0, 97, (2, 19), device=DEVICE)
    tgt[0, :3] = -100
    _, loss_a = plain(idx, tgt)
    calls = count_calls(monkeypatch, used)
    _, loss_b = fused(idx, tgt)
    assert all(calls.values()), calls  # every kernel of this configuration ran
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


@needs_kernels
def test_use_triton_rule(monkeypatch):
    x = torch.zeros(2, 4, device=DEVICE)
    assert use_triton(True, x)  # the kernels do run here
    assert not use_triton(False, x)
    if not torch.cuda.is_available():  # without the interpreter a CPU tensor stays on PyTorch
        monkeypatch.setattr(launch, "INTERPRET", False)
        assert not use_triton(True, x)
    monkeypatch.setattr(launch, "HAS_TRITON", False)  # Triton is not installed
    assert not use_triton(True, x)
    assert not kernel_dispatch.triton_available()


@needs_kernels
def test_a_missing_kernel_function_raises_instead_of_falling_back(monkeypatch):
    import minillm.kernels.rms_norm as rms_norm_module

    norm = RMSNorm(4, use_kernels=True).to(DEVICE)
    x = torch.randn(2, 4, device=DEVICE)
    norm(x)
    monkeypatch.delattr(rms_norm_module, "rms_norm")
    with pytest.raises(ImportError, match="rms_norm"):
        norm(x)


@needs_kernels
@pytest.mark.parametrize("variant", [dict(use_kernels=True), dict(chunked_ce=True)])
def test_strided_targets_give_the_plain_loss(variant):
    """targets = buf[:, 1:] (or any strided view) is the usual way to build LM targets; the
    cross-entropy kernels must read them by their strides (they read the wrong rows: 4.092 vs
    4.116 at model level). Reference: F.cross_entropy on the plain model's logits."""
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", vocab_size=97, n_layer=1, n_head=2, n_embd=32, block_size=32)
    model = GPT(cfg).to(DEVICE)
    fused = GPT(cfg.replace(**variant)).to(DEVICE)
    fused.load_state_dict(model.state_dict())
    idx = torch.randint(0, 97, (3, 10), device=DEVICE)
    buf = torch.randint(0, 97, (3, 20), device=DEVICE)
    targets = buf[:, ::2]
    assert not targets.is_contiguous()
    logits, _ = model(idx)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1))
    _, got = fused(idx, targets)
    assert abs(got.item() - want.item()) < 1e-4, (got.item(), want.item())


def _flash_launches():
    """Counts the launches of every @triton.jit kernel in kernels/flash_attention.py (device
    functions are never launched, so whichever forward kernel runs is counted)."""
    from kernel_check import launches
    import minillm.kernels.flash_attention as fa

    return launches(*[f for f in vars(fa).values() if hasattr(f, "pre_run_hooks")])


@needs_kernels
@pytest.mark.parametrize("pe", ["learned", "rope"])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "triton"])
def test_kv_cache_with_a_padding_mask_equals_the_full_forward(backend, pe):
    """Prefill, then decode through the KV cache with a right-padded mask over every key so far
    (B, start + T): the logits of the real tokens equal the full forward's without a cache,
    computed by the attention written out. (The triton path built its lengths from the new
    tokens' mask alone and masked the cached keys out: 0.115 off in max logit.)"""
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=16,
                 pos_encoding=pe)
    model = GPT(cfg.replace(attention_backend=backend)).to(DEVICE).eval()
    reference = GPT(cfg.replace(attention_backend="naive")).to(DEVICE).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    mask = (torch.arange(9, device=DEVICE)[None, :] < torch.tensor([[9], [6]], device=DEVICE)).long()
    with torch.no_grad(), _flash_launches() as counts:
        full, _ = reference(ids, attention_mask=mask)
        cache, pieces, start = model.new_kv_cache(2), [], 0
        for n in (4, 1, 2, 1, 1):  # prefill, single tokens and a chunk
            logits, _ = model(ids[:, start : start + n], attention_mask=mask[:, : start + n], kv_cache=cache)
            pieces.append(logits)
            start += n
    assert start == 9
    assert (sum(counts.values()) > 0) == (backend == "triton"), dict(counts)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=1e-4, rtol=1e-4)


@needs_kernels
def test_generate_under_bf16_autocast_with_the_triton_backend():
    """Under autocast the layers compute in bfloat16, so the KV cache must hold bfloat16 too:
    a float32 cache handed the kernel bf16 queries with fp32 keys ("must share a dtype").
    The logits are held to the rule of kernel_check: at most twice SDPA's own bfloat16 error
    against float32, plus a small epsilon."""
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=16, pos_encoding="rope")
    model = GPT(cfg.replace(attention_backend="triton")).to(DEVICE).eval()
    sdpa = GPT(cfg.replace(attention_backend="sdpa")).to(DEVICE).eval()
    sdpa.load_state_dict(model.state_dict())
    idx = torch.randint(0, 97, (2, 5), device=DEVICE)
    with torch.autocast(DEVICE, torch.bfloat16), _flash_launches() as counts:
        out = model.generate(idx, 4, temperature=0)
    assert out.shape == (2, 9) and sum(counts.values()) > 0

    def prefill_and_step(m, autocast):
        cache = m.new_kv_cache(2)
        with torch.no_grad(), torch.autocast(DEVICE, torch.bfloat16, enabled=autocast):
            a, _ = m(out[:, :5], kv_cache=cache)
            b, _ = m(out[:, 5:6], kv_cache=cache)
        return torch.cat([a, b], dim=1).float(), cache

    ours, cache = prefill_and_step(model, True)
    assert cache.k[0].dtype == torch.bfloat16
    theirs, _ = prefill_and_step(sdpa, True)
    exact, cache32 = prefill_and_step(sdpa, False)
    assert cache32.k[0].dtype == torch.float32
    err, torch_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-2 * exact.abs().max().item(), (err, torch_err)
