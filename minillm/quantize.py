"""Quantised CPU copies of a model for inference, and their safetensors form.

    qmodel = quantize_model(model, "int8-weight")   # a CPU float32 copy; the blocks' and head's linears quantised
    tensors = quantized_tensors(qmodel)             # plain tensors: integer weights, scales, biases, the float rest
    save_file(tensors, "model.safetensors")         # (finetune.py --quantize KIND: save_checkpoint(..., tensors=...))
    qmodel = load_quantized(config, tensors, "model.safetensors", "int8-weight")   # the same model, bit for bit

The kinds (QUANT_KINDS), and what does the work:
- "int8": int8 weights (one scale per output channel, symmetric) and activations quantised on the
  fly, one scale per token: torchao's Int8DynamicActivationInt8WeightConfig. Without torchao,
  torch.ao's dynamic quantisation (one scale and zero point per activation tensor), while torch has it.
- "int8-weight": the same int8 weights; activations stay float: torchao's Int8WeightOnlyConfig.
- "int4-weight": 4-bit weights in groups of 32 along each row (the whole row where its width is
  not a multiple of 32), each group with a float16 scale and minimum: Int4Linear below (torchao
  0.18 has no int4 weight-only path for the CPU). Activations stay float.
Only the linear layers of the blocks, the pooler and the classifier are quantised: the embeddings,
norms and (tied) LM heads stay float. torchao is the optional extra `pip install -e '.[quantize]'`.

In the file each quantised layer <L> (N outputs, K inputs) is:
    int8 kinds:   <L>.weight int8 (N, K); <L>.weight_scale float32 (N,); <L>.bias.  w = weight * scale
                  (torch.ao's copies also hold <L>.weight_zero_point int64 (N,), all zero: they load
                  back through torch.ao while torch has it, else through torchao, with the same weights)
    int4-weight:  <L>.weight uint8 (N, ceil(K/2)), two 4-bit values q in 0..15 a byte, column 2j in
                  the low nibble and 2j+1 in the high one; <L>.weight_scale and <L>.weight_min float16
                  (N, K/G); <L>.bias.  w[n, k] = weight_min[n, k//G] + weight_scale[n, k//G] * q[n, k]
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import untied
from .config import ModelConfig
from .model import build_model

QUANT_KINDS = ("int8", "int8-weight", "int4-weight")
EXTRA = "pip install -e '.[quantize]'"
TORCHAO_MIN = (0, 15)
INT4_GROUP = 32


def _check_kind(kind: str) -> None:
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantisation kind {kind!r}; expected one of {', '.join(QUANT_KINDS)}")


def quantizable_layers(model) -> list[str]:
    """The linear layers that carry the work of classification: the blocks and the head.
    The (tied) LM heads stay float: quantising them would add an int8 copy of the embeddings."""
    keep = ("blocks.", "pooler", "classifier", "score")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(keep)]


# -- the libraries, imported on first use ----------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """torchao's import logs warnings about CUDA-only .so files it cannot load here and about a
    torch.compile registration; torch.ao warns that it is deprecated. None of it is the user's."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao():
    """The torchao package, or None where it is not installed (an optional extra) or older than
    0.15, the first with the Int8Tensor weights (version=2 configs) used here."""
    try:
        with _quiet():
            import torchao
            import torchao.quantization  # noqa: F401  (its first import is the noisy one)
    except ImportError:
        return None
    version = re.match(r"(\d+)\.(\d+)", torchao.__version__)  # "unknown" in a source build: taken as new
    return None if version and (int(version[1]), int(version[2])) < TORCHAO_MIN else torchao


def _torch_ao_dynamic():
    """(quantize_dynamic, its per-channel qconfig, its Linear) from torch.ao, or None in a torch
    that no longer has them (torch.ao.quantization is deprecated in favour of torchao)."""
    try:
        with _quiet():
            from torch.ao.nn.quantized.dynamic import Linear
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic, per_channel_dynamic_qconfig, Linear


def _need_torchao(kind: str):
    torchao = _torchao()
    if torchao is None:
        raise ValueError(f"--quantize {kind} needs torchao >= 0.15: {EXTRA}")
    return torchao


def quantize_backend(kind: str) -> str:
    """Which library quantises `kind` here, for reports: "torchao 0.18.0", "torch.ao (fallback)" or "minillm"."""
    _check_kind(kind)
    if kind == "int4-weight":
        return "minillm"
    torchao = _torchao()
    if torchao is not None:
        return f"torchao {torchao.__version__}"
    if kind == "int8" and _torch_ao_dynamic() is not None:
        return "torch.ao (fallback)"
    raise ValueError(f"--quantize {kind} needs torchao >= 0.15: {EXTRA}")


# -- int4: minillm's own layer ----------------------------------------------------------------------


def int4_group_size(in_features: int) -> int:
    """Groups of 32 weights along a row; a row whose width is not a multiple of 32 is one group."""
    return INT4_GROUP if in_features % INT4_GROUP == 0 else in_features


class Int4Linear(nn.Module):
    """y = x w^T + b with w held in 4 bits: groups of G weights along each row share a float16
    scale and minimum, w = min + scale * q with q in 0..15 (min-max "asymmetric" quantisation, as
    llama.cpp's Q4_1), two q a byte: 5 bits a weight with G = 32, 6.4x smaller than float32.
    Each call rebuilds the float weight and calls F.linear. torch's fused CPU kernel
    (aten._weight_int4pack_mm_for_cpu) computes the same on float32 inputs, but was measured ~2x
    slower for one token and ~75x slower for 1024 (AMD EPYC, torch 2.13): it is fast in bfloat16 only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size or int4_group_size(in_features)
        if in_features % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide in_features={in_features}")
        groups = in_features // self.group_size
        self.register_buffer("weight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("weight_min", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        """The layer quantised: each group's range [min, max] cut into 15 steps, each weight rounded to the nearest."""
        w = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        g = w.reshape(w.shape[0], -1, layer.group_size)
        low, high = g.amin(-1), g.amax(-1)
        # float16 as stored (a constant group's step is clamped to float16's smallest normal, not 0)
        scale = ((high - low) / 15).clamp(min=2**-14).half()
        low = low.half()
        # rounded against the stored float16 scale and minimum, the ones that rebuild the weight
        q = ((g - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
        layer.weight.copy_(pack_int4(q.reshape(w.shape)))
        layer.weight_scale.copy_(scale)
        layer.weight_min.copy_(low)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, (out_features, in_features)."""
        q = unpack_int4(self.weight, self.in_features).float()
        g = q.reshape(self.out_features, -1, self.group_size)
        return (self.weight_min.float()[..., None] + self.weight_scale.float()[..., None] * g).reshape(q.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in 0..15 -> (N, ceil(K/2)) uint8: column 2j in the low nibble, 2j+1 in the high."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))  # an odd width: the last byte's high nibble is 0
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/2)) uint8 -> (N, K) uint8 values in 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :k]


# -- quantising a model ------------------------------------------------------------------------------


def quantize_model(model, kind: str = "int8", backend: str = "auto") -> nn.Module:
    """A CPU float32 copy of the model whose blocks' and head's linear layers are quantised as
    `kind` (QUANT_KINDS) says; the model itself is left as it was. backend="torch.ao" asks for
    torch.ao's dynamic int8 even where torchao is installed (benchmarks compare the two)."""
    _check_kind(kind)
    if backend not in ("auto", "torch.ao"):
        raise ValueError(f"quantize backend must be auto or torch.ao, got {backend!r}")
    if backend == "torch.ao" and kind != "int8":
        raise ValueError(f"torch.ao quantises dynamic int8 only, not {kind}")
    qmodel = copy.deepcopy(model).cpu().float().eval()
    names = quantizable_layers(qmodel)
    if kind == "int4-weight":
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent), child, Int4Linear.from_linear(qmodel.get_submodule(name)))
        return qmodel
    torchao = None if backend == "torch.ao" else _torchao() if kind == "int8" else _need_torchao(kind)
    if torchao is None:  # int8 without torchao (or asked for): torch.ao's dynamic quantisation
        return _quantize_torch_ao(qmodel, names)
    chosen = set(names)
    with _quiet():
        torchao.quantization.quantize_(qmodel, _torchao_config(kind), filter_fn=lambda m, fqn: fqn in chosen)
    return qmodel


def _torchao_config(kind: str):
    """torchao's recipe for an int8 kind. version=2 (torchao >= 0.15): weights become Int8Tensor
    (qdata, scale), the default from 0.18; set_inductor_config=False: no global torch.compile settings."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if kind == "int8":
        return Int8DynamicActivationInt8WeightConfig(version=2, set_inductor_config=False)
    return Int8WeightOnlyConfig(version=2, set_inductor_config=False)


def _quantize_torch_ao(qmodel, names: list[str]) -> nn.Module:
    """Dynamic int8 through torch.ao (the fallback without torchao): int8 weights, one scale per
    output channel; each call quantises its input with one scale and zero point for the tensor."""
    torch_ao = _torch_ao_dynamic()
    if torch_ao is None:
        raise ValueError(f"--quantize int8 needs torchao >= 0.15 here (this torch {torch.__version__} has no torch.ao "
                         f"dynamic quantisation): {EXTRA}")
    quantize_dynamic, qconfig, _ = torch_ao
    with _quiet():
        return quantize_dynamic(qmodel, qconfig_spec={name: qconfig for name in names}, dtype=torch.qint8)


def _torch_ao_layers(qmodel) -> list:
    torch_ao = _torch_ao_dynamic()
    return [] if torch_ao is None else [(n, m) for n, m in qmodel.named_modules() if isinstance(m, torch_ao[2])]


# -- to plain tensors and back --------------------------------------------------------------------------


def _live_tensors(qmodel) -> dict[str, torch.Tensor]:
    """The torchao or int4 copy's tensors under their names in the file (module docstring), as
    views of the model's own memory: loading copies into them. Tied weights once."""
    out = {}
    for key, value in qmodel.state_dict().items():
        if hasattr(value, "qdata"):  # torchao's Int8Tensor: its integer data and scales, as plain tensors
            out[key] = value.qdata
            out[key + "_scale"] = value.scale.view(-1)  # (N, 1) from torchao 0.15 on; (N,) in the file
        else:
            out[key] = value
    return untied(out)


def quantized_tensors(qmodel) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: each quantised layer's integer weights, scales and bias (the
    module docstring gives the layout), every other weight as it is (tied ones once)."""
    torch_ao = _torch_ao_layers(qmodel)
    if not torch_ao:
        return _live_tensors(qmodel)
    out: dict[str, torch.Tensor] = {}
    with _quiet():
        for name, m in torch_ao:
            w = m.weight()
            out[f"{name}.weight"] = w.int_repr()
            out[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
            out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64)
            if m.bias() is not None:
                out[f"{name}.bias"] = m.bias().detach()
    return {**out, **_torch_ao_rest(qmodel, torch_ao)}


def _torch_ao_rest(qmodel, torch_ao_layers) -> dict[str, torch.Tensor]:
    """The float rest of a torch.ao copy (views of its memory), tied weights once: its state dict
    less the int8 layers, whose packed parameters are not tensors."""
    prefixes = tuple(name + "." for name, _ in torch_ao_layers)
    return untied({k: v for k, v in qmodel.state_dict().items()
                   if isinstance(v, torch.Tensor) and not k.startswith(prefixes)})


def load_quantized(config: ModelConfig, tensors: dict, source: str, kind: str = "int8") -> nn.Module:
    """Rebuild the copy that quantized_tensors saved: a fresh model quantised as `kind`, its
    integer weights, scales and float rest then copied in, so its outputs are the saved model's,
    bit for bit. source names the file in errors."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"{source}: an unknown quantised kind {repr(kind)[:60]} (config.json's \"quantized\"); "
                         f"this minillm reads {', '.join(QUANT_KINDS)}")
    tensors = dict(tensors)
    # int8 files with zero points are torch.ao's (minillm's first int8 copies, or written without torchao)
    if kind == "int8" and any(k.endswith(".weight_zero_point") for k in tensors):
        if _torch_ao_dynamic() is not None:
            return _load_torch_ao(config, tensors, source)
        _drop_zero_points(tensors, source)  # no torch.ao in this torch: the same weights, through torchao
    elif kind != "int4-weight" and _torchao() is None:
        raise ValueError(f"{source}: an {kind} copy made with torchao; loading it needs torchao >= 0.15: {EXTRA}")
    qmodel = quantize_model(build_model(config), kind)
    _copy_into(_live_tensors(qmodel), tensors, source, kind)
    return qmodel.eval()


def _copy_into(own: dict, tensors: dict, source: str, kind: str) -> None:
    """Copy every saved tensor into the model's, naming any missing, unexpected, mis-shaped or mistyped."""
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(v.shape)} {v.dtype} (expected {tuple(own[k].shape)} {own[k].dtype})"
             for k, v in tensors.items() if k in own and (v.shape != own[k].shape or v.dtype != own[k].dtype)]
    problems = [f"{what} {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if names]
    if problems:
        raise ValueError(f"{source}: tensors do not fit the {kind} copy: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _drop_zero_points(tensors: dict, source: str) -> None:
    for k in [k for k in tensors if k.endswith(".weight_zero_point")]:
        if tensors.pop(k).any():
            raise ValueError(f"{source}: {k} is not all zero; only symmetric int8 weights can be read without torch.ao")


def _load_torch_ao(config: ModelConfig, tensors: dict, source: str) -> nn.Module:
    """An int8 copy made through torch.ao, rebuilt through torch.ao."""
    model = build_model(config).eval()
    qmodel = _quantize_torch_ao(model, quantizable_layers(model))
    layers = _torch_ao_layers(qmodel)
    with _quiet():
        for name, m in layers:
            try:
                q = tensors.pop(f"{name}.weight")
                scale, zp = tensors.pop(f"{name}.weight_scale"), tensors.pop(f"{name}.weight_zero_point")
            except KeyError as e:
                raise ValueError(f"{source}: the int8 weights of {name} are missing ({e.args[0]})") from None
            if q.shape != m.weight().shape or scale.shape != zp.shape or scale.shape != q.shape[:1]:
                raise ValueError(f"{source}: {name}.weight {tuple(q.shape)} or its scales {tuple(scale.shape)} do "
                                 f"not fit the layer ({tuple(m.weight().shape)})")
            dequant = (q.float() - zp[:, None].float()) * scale[:, None]
            qw = torch.quantize_per_channel(dequant, scale.double(), zp, 0, torch.qint8)
            m.set_weight_bias(qw, tensors.pop(f"{name}.bias", None))
    _copy_into(_torch_ao_rest(qmodel, layers), tensors, source, "int8")
    return qmodel.eval()
