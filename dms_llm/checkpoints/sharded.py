"""Load a checkpoint straight into FSDP2 shards: each process reads only its own rows from the files.

    model = load_sharded("models/llama-2-70b", "bfloat16")    # every process calls it, in a process group

The model is built on the meta device (parameters only: the rotary buffers are computed from the config),
sharded with the search's layout (`training.sharding.shard_model`), each process allocates its shard of
every parameter (FSDP2 splits dim 0 into contiguous row blocks) on the device FSDP2 computes on and
reads exactly those rows from the safetensors files, one parameter at a time. No process ever holds the
whole model: host memory per process is its shard plus one parameter's rows in flight on a CPU, and the
rows in flight alone on a GPU (docs/RESULTS.md 9). Before anything is
allocated, the files are checked against the config (every parameter present, with its shape).
"""

from __future__ import annotations

import os

import torch

from .stream_prune import _torch_dtype
from .weights import WeightFiles, _safe_open


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The dim-0 rows FSDP2 gives `rank` of `world`: torch.chunk's split, ceil(n / world) rows each, the
    last ranks taking the remainder (or nothing)."""
    per = -(-n // world)
    start = min(rank * per, n)
    return start, min(start + per, n)


def _shard_device(model) -> torch.device:
    """Where FSDP2 keeps `model`'s shards: its device mesh's device (a GPU: this process's current one), so the
    shards are allocated there directly and the host holds only the rows being read."""
    mesh = next(model.parameters()).device_mesh
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def load_sharded(folder: str, dtype: str | torch.dtype = "auto"):
    """The causal LM saved in `folder` (safetensors), sharded across the processes of the default process
    group; `dtype` as in `load_model_and_tokenizer` ("auto": the files' own, which must be one). In eval
    mode, its parameters frozen."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from ..modeling import register_auto_classes
    from ..streamed import skeleton
    from ..training.sharding import shard_model
    from .loading import _torch_dtype as parse_dtype

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    register_auto_classes()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    files = WeightFiles(folder)
    wanted = parse_dtype(dtype)
    if wanted == "auto":
        floating = {files.dtypes[k] for k in files.where if _torch_dtype(files.dtypes[k]).is_floating_point}
        if len(floating) != 1:
            raise ValueError(f"the weights of {folder} have dtypes {sorted(floating)}; choose one with --dtype")
        wanted = _torch_dtype(floating.pop())
    model = skeleton(config, wanted)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in files]
    if missing:
        raise ValueError(f"the weights of {folder} lack {len(missing)} tensors its config.json implies, e.g. {missing[0]!r}")
    wrong = [n for n, p in params.items() if files.shapes[n] != tuple(p.shape)]
    if wrong:
        n = wrong[0]
        raise ValueError(f"{n} has shape {list(files.shapes[n])} in {files.where[n]} but {list(params[n].shape)} by the "
                         f"config of {folder}: the files do not match their config")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("load_sharded: no process group; launch with torchrun or accelerate launch")
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.requires_grad_(False)
    shard_model(model)
    model.to_empty(device=_shard_device(model))  # allocates this process's shards; buffers too, restored below
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in model.named_parameters():
            local = p.to_local()
            start, end = _rows(p.shape[0], rank, world)
            if local.shape[0] != end - start:
                raise RuntimeError(f"load_sharded: {name} holds {local.shape[0]} rows on rank {rank}, expected {end - start}")
            if end > start:
                with _safe_open(os.path.join(folder, files.where[name])) as f:
                    local.copy_(f.get_slice(name)[start:end])
    return model.eval()
