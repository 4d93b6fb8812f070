"""How the frozen weights are sharded across the processes (FSDP2): one layout, used by the search on a
model in memory and by `checkpoints.sharded.load_sharded`, which builds the sharded model from the files.

Units: every decoder layer; the input embedding and the head each on their own when they are not tied
(together in the root when they are); the root holds what is left (the final norm). A decoder layer's
full weights exist only while it runs. The embedding and the head, on their own, are gathered when
their forward starts rather than for the whole forward as in the root; FSDP2 (torch 2.13, gloo) still
keeps both gathered from their forward until the backward ends (seen in tests: they are plain tensors,
not shards, after a forward), which costs about 2 x 0.24 GiB at Llama-2-7B's shape.
"""

from __future__ import annotations

from torch import nn

from ..arch import ModelParts


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard `model`'s weights in place over the default process group (every process calls it with the
    same model structure); returns it. A model on the meta device is sharded as structure only: each
    process then allocates and fills its own shard (`load_sharded`)."""
    from torch.distributed.fsdp import fully_shard

    parts = ModelParts(model)
    for layer in parts.layers:
        fully_shard(layer)
    tied = parts.lm_head.weight is parts.embed.weight
    if not tied:
        fully_shard(parts.embed)
        fully_shard(parts.lm_head)
    fully_shard(model)
    return model
