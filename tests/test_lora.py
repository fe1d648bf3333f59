"""LoRA: a fresh adapter changes nothing, only adapters train, merging gives the same outputs,
and the saved adapters (plus head) rebuild the model on top of its base."""
import pytest
import torch
import torch.nn as nn

from minillm import BERT, GPT, preset
from minillm.checkpoint import load_weights
from minillm.lora import LoRALinear, apply_lora, count_trainable, lora_state_dict, merge_lora


def tiny(arch, **kw):
    torch.manual_seed(0)
    if arch == "gpt":
        return GPT(preset("gpt-cpu", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, **kw))
    return BERT(preset("bert-tiny", n_layer=2, n_head=2, n_embd=32, n_inner=64, block_size=16, vocab_size=50, **kw))


def outputs(model, x, mask):
    model.eval()
    with torch.no_grad():
        if model.config.num_labels:
            return model.classify(x, mask)[0]
        return model(x, attention_mask=mask)[0]


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return x, mask


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_fresh_adapters_change_nothing_and_only_they_train(arch, batch):
    model = tiny(arch, num_labels=3)
    before = outputs(model, *batch)
    replaced = apply_lora(model, rank=4, alpha=8, targets=("qkv", "proj", "fc"))
    assert len(replaced) == 2 * 4  # qkv, attn.proj, mlp.fc, mlp.proj in each of 2 blocks
    assert all(n.startswith("blocks.") for n in replaced)
    assert torch.equal(outputs(model, *batch), before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert count_trainable(model)[0] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # one optimizer step moves the adapters and nothing else
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, mask = batch
    loss = model.classify(x, mask, labels=torch.tensor([0, 1, 2]))[1]
    loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(outputs(model, *batch), before)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_merged_outputs_equal_unmerged(arch, batch):
    model = tiny(arch)
    apply_lora(model, rank=4, alpha=16, dropout=0.1, targets=("qkv", "fc"))
    randomize_adapters(model)
    unmerged = outputs(model, *batch)
    assert merge_lora(model) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "fc")))
    merged = outputs(model, *batch)
    assert (merged - unmerged).abs().max().item() < 1e-5
    # the merged model's state dict has the base model's names: a plain checkpoint again
    assert set(model.state_dict()) == set(tiny(arch).state_dict())


def test_saved_adapters_rebuild_the_model_on_its_base(batch, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny("bert", num_labels=2)
    apply_lora(model, rank=2, alpha=4, targets=("attn.proj",))
    for p in model.classifier.parameters():  # the head trains beside the adapters
        p.requires_grad_(True)
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    expected = outputs(model, *batch)
    sd = lora_state_dict(model)
    assert set(sd) == {"blocks.0.attn.proj.lora_A", "blocks.0.attn.proj.lora_B", "blocks.1.attn.proj.lora_A",
                       "blocks.1.attn.proj.lora_B", "classifier.weight", "classifier.bias"}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "adapters.safetensors")
    fresh = tiny("bert", num_labels=2)  # the same base weights (same seed), untrained head
    apply_lora(fresh, rank=2, alpha=4, targets=("attn.proj",))
    load_weights(fresh, load_file(tmp_path / "adapters.safetensors"), "adapters", strict=False)
    assert (outputs(fresh, *batch) - expected).abs().max().item() < 1e-6


def test_bad_targets_and_settings():
    with pytest.raises(ValueError, match="'wq' match no linear layer"):
        apply_lora(tiny("gpt"), targets=("wq",))
    with pytest.raises(ValueError, match="rank must be positive"):
        apply_lora(tiny("gpt"), rank=0)
    with pytest.raises(ValueError, match="at least one target"):
        apply_lora(tiny("gpt"), targets=())
