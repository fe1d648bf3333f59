"""Hugging Face weights in and out: GPT-2- and BERT-format directories.

A directory holds config.json and model.safetensors (or pytorch_model.bin, read with
``torch.load(weights_only=True)``: never unpickled). Names are mapped one to one between
the two layouts below; anything missing, unexpected or mis-shaped is reported by name.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import build_model

# Tensors that HF checkpoints may carry but that hold no weights we need.
_IGNORED_SUFFIXES = (
    ".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "cls.seq_relationship.weight",
    "cls.seq_relationship.bias", "cls.predictions.decoder.bias",
)

_T = "transpose"  # GPT-2 stores its linear layers as Conv1D: (in, out)


def gpt2_name_map(n_layer: int, with_score: bool = False, untied_head: bool = False) -> dict[str, tuple[str, str]]:
    """HF GPT-2 name (without the 'transformer.' prefix) -> (minillm name, transform)."""
    m = {"wte.weight": ("tok_emb.weight", ""), "wpe.weight": ("pos_emb.weight", ""),
         "ln_f.weight": ("norm_f.weight", ""), "ln_f.bias": ("norm_f.bias", "")}
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for hf, ours, tr in [
            ("ln_1", "norm1", ""), ("ln_2", "norm2", ""), ("attn.c_attn", "attn.qkv", _T),
            ("attn.c_proj", "attn.proj", _T), ("mlp.c_fc", "mlp.fc", _T), ("mlp.c_proj", "mlp.proj", _T),
        ]:
            m[f"{h}{hf}.weight"] = (f"{b}{ours}.weight", tr)
            m[f"{h}{hf}.bias"] = (f"{b}{ours}.bias", "")
    if with_score:
        m["score.weight"] = ("score.weight", "")
    if untied_head:
        m["lm_head.weight"] = ("lm_head.weight", "")
    return m


def bert_name_map(n_layer: int, untied_head: bool = False) -> dict[str, tuple[str, str]]:
    """HF BERT name (without the 'bert.' prefix) -> (minillm name, transform)."""
    m = {
        "embeddings.word_embeddings.weight": ("tok_emb.weight", ""),
        "embeddings.position_embeddings.weight": ("pos_emb.weight", ""),
        "embeddings.token_type_embeddings.weight": ("type_emb.weight", ""),
        "embeddings.LayerNorm.weight": ("emb_norm.weight", ""),
        "embeddings.LayerNorm.bias": ("emb_norm.bias", ""),
        "pooler.dense.weight": ("pooler.weight", ""),
        "pooler.dense.bias": ("pooler.bias", ""),
        "cls.predictions.transform.dense.weight": ("mlm_dense.weight", ""),
        "cls.predictions.transform.dense.bias": ("mlm_dense.bias", ""),
        "cls.predictions.transform.LayerNorm.weight": ("mlm_norm.weight", ""),
        "cls.predictions.transform.LayerNorm.bias": ("mlm_norm.bias", ""),
        "cls.predictions.bias": ("mlm_decoder.bias", ""),
        "classifier.weight": ("classifier.weight", ""),
        "classifier.bias": ("classifier.bias", ""),
    }
    if untied_head:
        m["cls.predictions.decoder.weight"] = ("mlm_decoder.weight", "")
    for i in range(n_layer):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for hf, ours in [
            ("attention.output.dense", "attn.proj"), ("attention.output.LayerNorm", "norm1"),
            ("intermediate.dense", "mlp.fc"), ("output.dense", "mlp.proj"), ("output.LayerNorm", "norm2"),
        ]:
            m[f"{h}{hf}.weight"] = (f"{b}{ours}.weight", "")
            m[f"{h}{hf}.bias"] = (f"{b}{ours}.bias", "")
        # query, key and value are three tensors in HF and one fused projection here
        for part in ("weight", "bias"):
            m[f"{h}attention.self.query.{part}"] = (f"{b}attn.qkv.{part}", "q")
            m[f"{h}attention.self.key.{part}"] = (f"{b}attn.qkv.{part}", "k")
            m[f"{h}attention.self.value.{part}"] = (f"{b}attn.qkv.{part}", "v")
    return m


# Heads that a checkpoint may lack (a bare BertModel has no MLM head or classifier):
# they keep their fresh initialisation and are reported.
_OPTIONAL_BERT = ("cls.", "classifier.", "pooler.")
_OPTIONAL_GPT = ("score.",)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _int(cfg: dict, key: str, path: str, default=None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
    """A minillm ModelConfig from a GPT-2 or BERT config.json (validated before any allocation)."""
    kind = hf.get("model_type")
    num_labels = len(hf["id2label"]) if isinstance(hf.get("id2label"), dict) and _is_classifier(hf) else 0
    if kind == "gpt2":
        # reorder_and_upcast_attn only makes half-precision scores in float32: the same function,
        # which our attention computes in float32 anyway where precision is lost (the softmax).
        for key in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if not isinstance(hf.get(key, False), bool):
                raise ValueError(f"{path}: '{key}' must be true or false, got {hf[key]!r}")
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
        if hf.get("activation_function", "gelu_new") not in act:
            raise ValueError(f"{path}: activation_function {hf.get('activation_function')!r} is not supported")
        n_embd = _int(hf, "n_embd", path)
        return ModelConfig(
            arch="gpt", vocab_size=_int(hf, "vocab_size", path), n_layer=_int(hf, "n_layer", path),
            n_head=_int(hf, "n_head", path), n_embd=n_embd,
            n_inner=hf.get("n_inner") or 4 * n_embd, block_size=_int(hf, "n_positions", path),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation=act[hf.get("activation_function", "gelu_new")],
            dropout=float(hf.get("resid_pdrop", 0.0)), attn_dropout=float(hf.get("attn_pdrop", 0.0)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), num_labels=num_labels,
            attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            attn_scale_by_layer=hf.get("scale_attn_by_inverse_layer_idx", False),
        )
    if kind == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
        act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
        if hf.get("hidden_act", "gelu") not in act:
            raise ValueError(f"{path}: hidden_act {hf.get('hidden_act')!r} is not supported")
        return ModelConfig(
            arch="bert", vocab_size=_int(hf, "vocab_size", path), n_layer=_int(hf, "num_hidden_layers", path),
            n_head=_int(hf, "num_attention_heads", path), n_embd=_int(hf, "hidden_size", path),
            n_inner=_int(hf, "intermediate_size", path), block_size=_int(hf, "max_position_embeddings", path),
            type_vocab_size=_int(hf, "type_vocab_size", path, 2), norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            norm_position="post", activation=act[hf.get("hidden_act", "gelu")],
            dropout=float(hf.get("hidden_dropout_prob", 0.0)),
            attn_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
            pad_token_id=int(hf.get("pad_token_id") or 0), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            num_labels=num_labels,
        )
    raise ValueError(f"{path}: model_type {kind!r} is neither 'gpt2' nor 'bert'")


def _is_classifier(hf: dict) -> bool:
    return any("SequenceClassification" in a for a in hf.get("architectures") or [])


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Tensors of a HF directory, from safetensors or (without unpickling) pytorch_model.bin."""
    st = os.path.join(directory, "model.safetensors")
    binf = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(st):
        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{st}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if os.path.exists(binf):
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption
            raise ValueError(f"{binf}: could not be read as plain tensors ({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{binf}: expected a dict of tensors")
        return sd
    raise ValueError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def load_hf(directory: str, **overrides):
    """(model, missing heads): a minillm GPT or BERT holding the weights of a HF GPT-2/BERT
    directory, and the heads the directory lacks, which keep their fresh initialisation
    (e.g. ["cls"] for a bare BertModel: no MLM head).

    overrides: ModelConfig fields to change (e.g. num_labels=2, attention_backend="sdpa").
    """
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: not a directory")
    cfg_path = os.path.join(directory, "config.json")
    try:
        config = config_from_hf(_read_json(cfg_path), cfg_path)
    except (TypeError, ValueError) as e:  # e.g. a list where a number belongs: name the file
        msg = str(e)
        raise ValueError(msg if msg.startswith(cfg_path) else f"{cfg_path}: {msg}") from None
    if overrides:
        config = config.replace(**overrides)
    sd = read_state_dict(directory)
    if config.arch == "gpt":
        sd = _strip(sd, "transformer.")
        name_map = gpt2_name_map(config.n_layer, with_score=True, untied_head=not config.tie_embeddings)
        optional = _OPTIONAL_GPT
        if config.tie_embeddings:
            sd.pop("lm_head.weight", None)
    else:
        sd = _strip(sd, "bert.")
        name_map, optional = bert_name_map(config.n_layer, untied_head=not config.tie_embeddings), _OPTIONAL_BERT
        if config.tie_embeddings:  # the decoder is the word-embedding matrix; a saved copy is redundant
            sd.pop("cls.predictions.decoder.weight", None)
    model = build_model(config)
    missing_heads = _load_mapped(model, sd, name_map, optional, directory)
    return model, missing_heads


def _load_mapped(model, sd, name_map, optional, directory) -> list[str]:
    ours = dict(model.named_parameters())
    unexpected = [k for k in sd if k not in name_map and not k.endswith(_IGNORED_SUFFIXES)]
    missing = [k for k in name_map if k not in sd and not k.startswith(optional)]
    missing_heads = sorted({k.split(".")[0] for k, (our_name, _) in name_map.items()
                            if k not in sd and k.startswith(optional) and our_name in ours})
    bad_shapes = []
    if not unexpected and not missing:
        qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
        for hf_name, (our_name, tr) in name_map.items():
            if hf_name not in sd:
                continue
            t = sd[hf_name]
            if our_name not in ours:  # e.g. a classifier in the checkpoint, none asked for
                continue
            if tr in ("q", "k", "v"):
                qkv_parts.setdefault(our_name, {})[tr] = t
                continue
            t = t.t() if tr == _T else t
            if t.shape != ours[our_name].shape:
                bad_shapes.append(f"{hf_name} {tuple(sd[hf_name].shape)} (expected {tuple(ours[our_name].shape)})")
                continue
            with torch.no_grad():
                ours[our_name].copy_(t)
        hf_of = {(our, tr): hf for hf, (our, tr) in name_map.items() if tr in ("q", "k", "v")}
        for our_name, parts in qkv_parts.items():
            want = ours[our_name].shape
            part_shape = (want[0] // 3, *want[1:])
            wrong = [f"{hf_of[(our_name, k)]} {tuple(t.shape)} (expected {part_shape})"
                     for k, t in parts.items() if tuple(t.shape) != part_shape]
            if wrong:
                bad_shapes += wrong
                continue
            t = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
            with torch.no_grad():
                ours[our_name].copy_(t)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if bad_shapes:
        problems.append(f"mis-shaped tensors: {_short(bad_shapes)}")
    if problems:
        raise ValueError(f"{directory}: weights do not fit the model in config.json; " + "; ".join(problems))
    return missing_heads


def _short(names: list[str], n: int = 6) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---------------------------------------------------------------------------------------------
# Export: a minillm model as a directory that `transformers` loads.


def config_to_hf(config: ModelConfig, id2label: dict | None = None) -> dict:
    c = config
    unsupported = []
    if c.pos_encoding != "learned":
        unsupported.append(f"pos_encoding={c.pos_encoding}")
    if c.norm != "layernorm":
        unsupported.append(f"norm={c.norm}")
    if c.activation == "swiglu":
        unsupported.append("activation=swiglu")
    if c.n_kv_head not in (None, c.n_head):
        unsupported.append("grouped-query attention")
    if c.head_dim * c.n_head != c.n_embd:
        unsupported.append(f"{c.n_head} heads of {c.head_dim} in a width of {c.n_embd} (pruned heads)")
    if not c.bias:
        unsupported.append("bias=False")
    want_norm = "pre" if c.arch == "gpt" else "post"
    if c.norm_position != want_norm:
        unsupported.append(f"norm_position={c.norm_position}")
    if c.arch == "bert" and c.classifier_pooling == "mean" and c.num_labels:
        unsupported.append("classifier_pooling=mean")
    # GPT-2 can drop the 1/sqrt(head_dim) (a scale of 1) and divide by the layer number; BERT can do neither
    if c.attn_scale not in (None, 1.0) or (c.arch == "bert" and c.attn_scale is not None):
        unsupported.append(f"attn_scale={c.attn_scale}")
    if c.arch == "bert" and c.attn_scale_by_layer:
        unsupported.append("attn_scale_by_layer=True")
    if unsupported:
        raise ValueError(f"this model cannot be written in Hugging Face {c.arch.upper()} format: {', '.join(unsupported)}")
    labels = {}
    if c.num_labels:
        id2label = id2label or {i: f"LABEL_{i}" for i in range(c.num_labels)}
        labels = {"id2label": {str(i): str(v) for i, v in id2label.items()},
                  "label2id": {str(v): int(i) for i, v in id2label.items()}}
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation]
    if c.arch == "gpt":
        arch = "GPT2ForSequenceClassification" if c.num_labels else "GPT2LMHeadModel"
        return {"model_type": "gpt2", "architectures": [arch], "vocab_size": c.vocab_size,
                "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": c.inner,
                "n_positions": c.block_size, "layer_norm_epsilon": c.norm_eps, "activation_function": act,
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.attn_dropout,
                "tie_word_embeddings": c.tie_embeddings, "pad_token_id": c.pad_token_id,
                "scale_attn_weights": c.attn_scale is None, "scale_attn_by_inverse_layer_idx": c.attn_scale_by_layer,
                **({"bos_token_id": 50256, "eos_token_id": 50256} if c.vocab_size == 50257 else
                   {"bos_token_id": None, "eos_token_id": None}), **labels}
    arch = "BertForSequenceClassification" if c.num_labels else "BertForMaskedLM"
    return {"model_type": "bert", "architectures": [arch], "vocab_size": c.vocab_size,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "hidden_size": c.n_embd,
            "intermediate_size": c.inner, "max_position_embeddings": c.block_size,
            "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.norm_eps, "hidden_act": act,
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attn_dropout,
            "pad_token_id": c.pad_token_id, "position_embedding_type": "absolute",
            "tie_word_embeddings": c.tie_embeddings, **labels}


def save_hf(model, directory: str, id2label: dict | None = None) -> None:
    """Write config.json and model.safetensors in GPT-2 / BERT layout (after merging any LoRA)."""
    c = model.config
    hf_cfg = config_to_hf(c, id2label)
    ours = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if c.arch == "gpt":
        for hf_name, (our_name, tr) in gpt2_name_map(c.n_layer, with_score=bool(c.num_labels)).items():
            t = ours[our_name]
            out[("" if hf_name.startswith("score.") else "transformer.") + hf_name] = (
                t.t().contiguous() if tr == _T else t
            )
        if not c.tie_embeddings:
            out["lm_head.weight"] = ours["lm_head.weight"]
    else:
        d = c.n_embd
        for hf_name, (our_name, tr) in bert_name_map(c.n_layer, untied_head=False).items():
            if hf_name.startswith("classifier.") and not c.num_labels:
                continue
            if hf_name.startswith("cls.") and c.num_labels:
                continue
            if hf_name.startswith("pooler.") and not c.pooler:  # masked-LM pretraining builds none
                continue
            t = ours[our_name]
            if tr in ("q", "k", "v"):
                t = t[{"q": 0, "k": 1, "v": 2}[tr] * d : ({"q": 0, "k": 1, "v": 2}[tr] + 1) * d].contiguous()
            prefix = "" if hf_name.startswith(("cls.", "classifier.")) else "bert."
            out[prefix + hf_name] = t
        if not c.num_labels:
            out["cls.predictions.decoder.weight"] = ours["mlm_decoder.weight"].clone()
            out["cls.predictions.decoder.bias"] = ours["mlm_decoder.bias"].clone()
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2)
