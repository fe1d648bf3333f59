"""minillm: a minimal, from-scratch transformer framework (GPT and BERT) in PyTorch."""
from .attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from .bert import BERT
from .config import PRESETS, ModelConfig, preset
from .gpt import GPT
from .model import build_model

__version__ = "0.1.0"

__all__ = [
    "BERT", "GPT", "KVCache", "ModelConfig", "MultiHeadAttention", "PRESETS",
    "build_model", "preset", "scaled_dot_product_attention",
]
