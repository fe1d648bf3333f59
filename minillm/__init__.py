"""minillm: a minimal, from-scratch transformer framework (GPT and BERT) in PyTorch."""
from .attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from .bert import BERT
from .config import PRESETS, ModelConfig, preset
from .gpt import GPT

__version__ = "0.1.0"


def build_model(config: ModelConfig):
    """A GPT or a BERT, as config.arch says."""
    return GPT(config) if config.arch == "gpt" else BERT(config)


__all__ = [
    "BERT", "GPT", "KVCache", "ModelConfig", "MultiHeadAttention", "PRESETS",
    "build_model", "preset", "scaled_dot_product_attention",
]
