"""Models in and out: loading by alias, folder or Hub id (the embedded SmolLM2 default included), saving
a pruned model as a checkpoint folder with its model card, and pushing it to the Hub."""

# count_parameters is core (budget); named here too, where users of the checkpoints have always found it.
from ..budget import count_parameters
from ..hub import push_to_hub
from .card import update_model_card
from .loading import load_model_and_tokenizer, resolve_model
from .save import save_pruned

__all__ = ["count_parameters", "load_model_and_tokenizer", "push_to_hub", "resolve_model", "save_pruned", "update_model_card"]
