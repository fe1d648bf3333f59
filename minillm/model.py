"""build_model: the GPT or BERT that a ModelConfig describes."""
from __future__ import annotations

from .bert import BERT
from .config import ModelConfig
from .gpt import GPT


def build_model(config: ModelConfig):
    """A GPT or a BERT, as config.arch says, freshly initialised."""
    return GPT(config) if config.arch == "gpt" else BERT(config)
