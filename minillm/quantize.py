"""Dynamic int8 quantisation for CPU inference, and its safetensors form.

    qmodel = quantize_int8(model)              # a copy: int8 linear layers in the blocks and head
    save_file(quantized_tensors(qmodel), ...)  # plain tensors: int8 weights, scales, zero points
    qmodel = load_quantized(config, tensors, "path")

Each quantised layer keeps one scale per output channel and quantises its input on the fly
(torch's dynamic quantisation). The embeddings, norms and the tied LM heads stay float.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from .checkpoint import untied
from .config import ModelConfig
from .model import build_model


def quantizable_layers(model) -> list[str]:
    """The linear layers that carry the work of classification: the blocks and the head.
    The (tied) LM heads stay float: quantising them would add an int8 copy of the embeddings."""
    keep = ("blocks.", "pooler", "classifier", "score")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(keep)]


def quantize_int8(model) -> nn.Module:
    """A copy whose linear layers hold int8 weights (one scale per output channel) and quantise
    their inputs on the fly: torch's dynamic quantisation, for CPU inference."""
    float_copy = copy.deepcopy(model).cpu().float().eval()
    spec = {name: per_channel_dynamic_qconfig for name in quantizable_layers(float_copy)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantized tensors as deprecated
        return quantize_dynamic(float_copy, qconfig_spec=spec, dtype=torch.qint8)


def _quantized_modules(qmodel):
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, DynamicLinear)]


def quantized_tensors(qmodel) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: each int8 layer as <name>.weight (int8), .weight_scale,
    .weight_zero_point and .bias; every other weight as it is (tied ones once)."""
    out: dict[str, torch.Tensor] = {}
    qnames = []
    for name, m in _quantized_modules(qmodel):
        w = m.weight()
        out[f"{name}.weight"] = w.int_repr()
        out[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
        out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64)
        if m.bias() is not None:
            out[f"{name}.bias"] = m.bias().detach()
        qnames.append(name + ".")
    # the state dict also holds the int8 layers' packed parameters (not tensors): written above
    rest = {k: v for k, v in qmodel.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.startswith(tuple(qnames))}
    return {**out, **untied(rest)}


def load_quantized(config: ModelConfig, tensors: dict, source: str) -> nn.Module:
    """Rebuild the int8 model saved by quantized_tensors. source names the file in errors."""
    qmodel = quantize_int8(build_model(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, m in _quantized_modules(qmodel):
            try:
                q = tensors.pop(f"{name}.weight")
                scale, zp = tensors.pop(f"{name}.weight_scale"), tensors.pop(f"{name}.weight_zero_point")
            except KeyError:
                raise ValueError(f"{source}: the int8 weights of {name} are missing") from None
            dequant = (q.float() - zp[:, None].float()) * scale[:, None]
            qw = torch.quantize_per_channel(dequant, scale.double(), zp, 0, torch.qint8)
            m.set_weight_bias(qw, tensors.pop(f"{name}.bias", None))
    # the float rest (embeddings, norms, unquantised heads), copied in place: load_state_dict would
    # also ask the int8 layers for their packed weights, which were set above
    own = {**dict(qmodel.named_parameters()), **dict(qmodel.named_buffers())}
    unexpected = [k for k in tensors if k not in own]
    mis_shaped = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if unexpected or mis_shaped:
        raise ValueError(f"{source}: tensors that do not fit the int8 model: {', '.join((unexpected + mis_shaped)[:5])}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    return qmodel.eval()
