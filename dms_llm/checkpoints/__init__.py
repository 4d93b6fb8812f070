"""Models in and out: loading by alias, folder or Hub id (the embedded SmolLM2 default included), saving
a pruned model as a checkpoint folder with its model card, and pushing it to the Hub."""

from ..hub import push_to_hub
from .card import update_model_card
from .loading import count_parameters, load_model_and_tokenizer, resolve_model
from .save import save_pruned

__all__ = ["count_parameters", "load_model_and_tokenizer", "push_to_hub", "resolve_model", "save_pruned", "update_model_card"]
