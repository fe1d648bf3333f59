"""One dataclass describes every model minillm builds, GPT or BERT, plus named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "relu")
BACKENDS = ("auto", "naive", "sdpa", "triton")
ARCHS = ("gpt", "bert")
POOLINGS = ("cls", "mean", "last")

# Refuse configs that could never be allocated (a hostile or mistyped config.json):
# anything above this many parameters fails before a single tensor is created.
MAX_PARAMS = 20_000_000_000


def _show(value) -> str:
    """A value for an error message, cut short: a hostile config.json may hold a huge string."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


@dataclass
class ModelConfig:
    arch: str = "gpt"  # "gpt": decoder-only causal LM; "bert": bidirectional encoder
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # grouped-query attention; None means n_head
    n_embd: int = 768
    head_size: Optional[int] = None  # width of one head; None means n_embd // n_head (set by head pruning)
    n_inner: Optional[int] = None  # MLP hidden width; None means 4 * n_embd
    block_size: int = 1024  # the longest sequence the model accepts
    pos_encoding: str = "learned"
    rope_base: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "pre" (GPT-2) or "post" (BERT) residual blocks
    activation: str = "gelu_tanh"
    bias: bool = True
    dropout: float = 0.0  # embeddings, residual branches and MLP
    attn_dropout: float = 0.0  # attention probabilities
    tie_embeddings: bool = True
    attn_scale: Optional[float] = None  # multiplies q.k; None means 1/sqrt(head_dim)
    attn_scale_by_layer: bool = False  # also divide block i's scale by i + 1 (GPT-2's scale_attn_by_inverse_layer_idx)
    attention_backend: str = "auto"
    use_kernels: bool = False  # route norms, activations, RoPE through kernels/ on CUDA
    chunked_ce: bool = False  # fused linear + cross-entropy over token chunks (never builds full logits)
    # BERT-only
    type_vocab_size: int = 2
    pad_token_id: int = 0
    # classification heads (GPT and BERT); 0 means no head
    num_labels: int = 0
    classifier_pooling: str = "cls"  # BERT: "cls" (pooler on [CLS]) or "mean"; GPT always uses "last"
    pooler: bool = True  # BERT: build the pooler; masked-LM pretraining does without (its loss never reaches it)
    init_std: float = 0.02

    # The fields that decide the weights' names and shapes: a checkpoint loads only into a model
    # that agrees on all of them.
    shape_fields: ClassVar[tuple[str, ...]] = (
        "arch", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_size", "n_inner", "block_size",
        "pos_encoding", "norm", "activation", "bias", "tie_embeddings", "type_vocab_size", "num_labels",
        "pooler",
    )
    # The fields that change how the model runs or trains, never its weights nor what it computes
    # in eval mode (up to rounding): free to change when a checkpoint is loaded or a run resumed.
    runtime_fields: ClassVar[tuple[str, ...]] = (
        "attention_backend", "dropout", "attn_dropout", "use_kernels", "chunked_ce",
    )

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def validate(self) -> None:
        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"config.{name}={_show(value)} is not one of {list(options)}")

        choice("arch", ARCHS)
        choice("pos_encoding", POS_ENCODINGS)
        choice("norm", NORMS)
        choice("activation", ACTIVATIONS)
        choice("attention_backend", BACKENDS)
        choice("norm_position", ("pre", "post"))
        choice("classifier_pooling", POOLINGS)
        # Types first: a hostile config.json could put a string where a size belongs.
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "type_vocab_size"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {_show(value)}")
        for name in ("n_kv_head", "n_inner", "head_size"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"config.{name}={_show(value)} must be a positive integer or null")
        for name in ("pad_token_id", "num_labels"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"config.{name} must be an integer, got {_show(getattr(self, name))}")
        for name in ("rope_base", "norm_eps", "dropout", "attn_dropout", "init_std"):
            value = getattr(self, name)
            if not (is_int(value) or isinstance(value, float)) or not -1e300 < value < 1e300:  # no inf, nan
                raise ValueError(f"config.{name} must be a finite number, got {_show(value)}")
        if self.attn_scale is not None and (
            not (is_int(self.attn_scale) or isinstance(self.attn_scale, float))
            or not 0 < self.attn_scale < math.inf
        ):
            raise ValueError(f"config.attn_scale must be a positive number or null, got {_show(self.attn_scale)}")
        for name in ("bias", "tie_embeddings", "attn_scale_by_layer", "use_kernels", "chunked_ce", "pooler"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {_show(getattr(self, name))}")
        if self.n_embd % self.n_head and self.head_size is None:
            raise ValueError(
                f"n_head={self.n_head} does not divide n_embd={self.n_embd}: "
                "the width must split evenly into heads"
            )
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must be a positive divisor of n_head={self.n_head}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.head_dim}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"config.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_labels < 0:
            raise ValueError(f"config.num_labels must be >= 0, got {self.num_labels}")
        if self.arch == "bert" and self.num_labels and self.classifier_pooling == "cls" and not self.pooler:
            raise ValueError("a BERT classifier with classifier_pooling='cls' reads the pooler: it needs config.pooler=true")
        n_params = self.approx_params()
        if n_params > MAX_PARAMS:
            raise ValueError(
                f"config asks for about {n_params if n_params < 1e300 else float('inf'):.3g} parameters, "
                f"more than the {MAX_PARAMS:.0e} this framework will allocate"
            )

    def approx_params(self) -> int:
        """Parameter count from the shapes alone, so absurd configs fail before allocating."""
        c, inner = self.n_embd, self.inner
        q, kv = self.n_head * self.head_dim, self.kv_heads * self.head_dim
        attn = c * (q + 2 * kv) + q * c
        mlp = c * inner * (3 if self.activation == "swiglu" else 2)
        emb = self.vocab_size * c + (self.block_size * c if self.pos_encoding == "learned" else 0)
        emb += (self.type_vocab_size * c + (c * c if self.pooler else 0)) if self.arch == "bert" else 0
        head = self.num_labels * c
        return int(emb + self.n_layer * (attn + mlp + 4 * c) + head)

    def replace(self, **overrides) -> "ModelConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def shape(self) -> dict:
        """The shape fields, with the defaults that None stands for filled in: two configs whose
        shapes are equal hold interchangeable weights."""
        shape = {name: getattr(self, name) for name in self.shape_fields}
        shape.update(n_kv_head=self.kv_heads, n_inner=self.inner, head_size=self.head_dim)
        if self.arch != "bert":  # only BERT has token-type embeddings and a pooler
            del shape["type_vocab_size"], shape["pooler"]
        return shape

    def describe(self) -> str:
        """One line for messages: "gpt 4x128, 4 heads, vocab 96, context 128"."""
        heads = f"{self.n_head} heads" + (f" of {self.head_size}" if self.head_size else "")
        return (f"{self.arch} {self.n_layer}x{self.n_embd}, {heads}, vocab {self.vocab_size}, "
                f"context {self.block_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        return cls(**d)


_GPT2 = dict(arch="gpt", vocab_size=50257, block_size=1024, activation="gelu_tanh", norm_eps=1e-5)
_BERT = dict(
    arch="bert",
    vocab_size=30522,
    block_size=512,
    activation="gelu",
    norm_eps=1e-12,
    norm_position="post",
    tie_embeddings=True,
)

PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(**_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(**_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(**_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "bert-base": ModelConfig(**_BERT, n_layer=12, n_head=12, n_embd=768),
    "bert-tiny": ModelConfig(**_BERT, n_layer=2, n_head=2, n_embd=128),
    "bert-mini": ModelConfig(**_BERT, n_layer=4, n_head=4, n_embd=256),
    # Small models that train in minutes on a laptop CPU.
    "gpt-cpu": ModelConfig(arch="gpt", vocab_size=256, n_layer=4, n_head=4, n_embd=128, block_size=128),
    "bert-cpu": ModelConfig(
        **{**_BERT, "vocab_size": 256, "block_size": 128}, n_layer=4, n_head=4, n_embd=128
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset with per-field overrides: ``preset("gpt2", n_layer=6)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
