"""Prune a checkpoint from its files, one tensor at a time, without loading the model (`dms-llm prune`).

    dms-llm prune --plan runs/llama2-80/dms_plan.json --model meta-llama/Llama-2-7b-hf --output-dir out/llama2-80

    from dms_llm.checkpoints.stream_prune import prune_checkpoint
    prune_checkpoint(PrunePlan.from_json("dms_plan.json"), "models/llama-2-7b", "out/llama2-80")

The source's safetensors files (one file or shards with `model.safetensors.index.json`; a local folder or
a Hub id in the local Hugging Face cache) are read tensor by tensor; each tensor is sliced by the same
`PlanSlicer` rules as `prune.prune_model`, and the pruned checkpoint is written shard by shard, with the
same shard layout, config, generation config, tokenizer, plan and model card as `save_pruned`: the
folder is the one `save_pruned(prune_model(model, plan), ...)` writes, byte for byte. Peak memory is one
output shard (`max_shard_size`) plus one source tensor, never the model.

Everything is checked before anything is written: the plan against the source config, every tensor's
presence and shape in the files against the config, the shards named by the index, the output folder.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from .weights import INDEX_NAME, WeightFiles

# Shard size of `dms-llm prune`: one output shard is held in memory while it is written, so this bounds
# the memory (2 GB: under 3 GB peak for a 7B model; see docs/RESULTS.md). save_pruned's default is 5GB.
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Source tensors that a stock model ignores when loading (a rotary cache some old checkpoints carry).
_IGNORED_SOURCE_SUFFIXES = (".rotary_emb.inv_freq",)
_SOURCE = "source"  # tokenizer=...: load the source folder's tokenizer


def _torch_dtype(code: str):
    import torch

    table = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    }  # fmt: skip
    if code not in table:
        raise ValueError(f"unsupported safetensors dtype {code!r}")
    return table[code]


def source_generation_config(folder: str):
    """The generation config `from_pretrained(folder)` gives a model: generation_config.json, else one
    derived from config.json (transformers' own fallback)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:
        return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True,
                                                local_files_only=True)


def _meta_model(config, dtype):
    import torch
    from transformers.initialization import no_init_weights

    from ..prune import _model_class

    with torch.device("meta"), no_init_weights():
        model = _model_class(config)._from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def source_structure(folder: str, dtype) -> tuple:
    """The model of checkpoint `folder` on the meta device (structure only, no memory) in `dtype`, and its
    `WeightFiles`, to read its weights one tensor at a time (the refit after pruning from the files)."""
    from transformers import AutoConfig

    from ..modeling import register_auto_classes

    register_auto_classes()
    return _meta_model(AutoConfig.from_pretrained(folder, local_files_only=True), dtype), WeightFiles(folder)


@dataclass
class _Output:
    """One tensor of the pruned checkpoint: its recipe and the shape the pruned config gives it."""

    recipe: object
    shape: tuple
    dtype: object


class CheckpointPruner:
    """Everything `prune_checkpoint` checks and derives before writing: the source files, the plan's
    slicing rules, and the pruned model's structure on the meta device (no memory)."""

    def __init__(self, plan, model: str | None, dtype: str | None = None):
        import torch
        from transformers import AutoConfig

        from ..arch import arch_spec
        from ..modeling import register_auto_classes
        from ..prune import PlanSlicer, check_plan_matches_config
        from .loading import _torch_dtype as parse_dtype
        from .loading import local_model_folder

        self.plan = plan
        self.folder = local_model_folder(model)
        if not os.path.isfile(os.path.join(self.folder, "config.json")):
            raise FileNotFoundError(f"{self.folder} has no config.json; pass a folder written by save_pretrained")
        register_auto_classes()
        self.config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        spec = arch_spec(self.config)
        check_plan_matches_config(self.config, plan)
        self.files = WeightFiles(self.folder)

        # The source model's parameters (a tied lm_head is not one), checked against the files.
        floating = {self.files.dtypes[k] for k in self.files.where if _torch_dtype(self.files.dtypes[k]).is_floating_point}
        wanted = None if dtype in (None, "auto") else parse_dtype(dtype)
        if wanted is None and len(floating) > 1:
            raise ValueError(f"the weights of {self.folder} mix dtypes {sorted(floating)}; choose one with --dtype")
        file_dtype = _torch_dtype(floating.pop()) if floating else torch.float32
        self.dtype = wanted or file_dtype
        self.cast = wanted is not None
        source_params = dict(_meta_model(self.config, self.dtype).named_parameters())
        self.source_params = set(source_params)
        missing = [n for n in source_params if n not in self.files]
        if missing:
            raise ValueError(f"the weights of {self.folder} lack {len(missing)} tensors its config.json implies, "
                             f"e.g. {missing[0]!r}")
        for name, p in source_params.items():
            if self.files.shapes[name] != tuple(p.shape):
                raise ValueError(f"{name} has shape {list(self.files.shapes[name])} in {self.files.where[name]} but "
                                 f"{list(p.shape)} by the config of {self.folder}: the files do not match their config")

        self.slicer = PlanSlicer(plan, spec)
        self.model = _meta_model(plan.pruned_config(), self.dtype)  # the pruned model, structure only
        self.model.generation_config = source_generation_config(self.folder)
        params = dict(self.model.named_parameters())  # unique: a tied lm_head is saved once, as the embedding
        aliases = {n for n, _ in self.model.named_parameters(remove_duplicate=False)} - set(params)
        state = self.model.state_dict()
        unsupported = [k for k in state if k not in params and k not in aliases]
        if unsupported:
            raise RuntimeError(f"the pruned model has state that is not a parameter, which pruning from the files "
                               f"cannot fill: {unsupported}")
        self.outputs: dict[str, _Output] = {}
        used = set()
        for name in state:  # save_pretrained's order: the shard layout follows it
            if name not in params:
                continue
            recipe = self.slicer.recipe(name)
            if recipe.output_bias is None and recipe.source not in source_params:
                raise RuntimeError(f"prune: {name!r} maps to {recipe.source!r}, which the source model lacks")
            used.add(recipe.source)
            self.outputs[name] = _Output(recipe, tuple(params[name].shape), params[name].dtype)
        leftover = [n for n in source_params if n not in used and not self.slicer.belongs_to_removed(n)]
        if leftover:
            raise RuntimeError(f"prune: source parameters with no counterpart in the pruned model: {leftover}")
        ignored = [k for k in self.files.where if k not in source_params and not self._ignorable(k)]
        if ignored:
            warnings.warn(f"{len(ignored)} tensors in the files of {self.folder} are not parameters of its model and are "
                          f"skipped (as from_pretrained skips them): {ignored[:5]}")

    def _ignorable(self, name: str) -> bool:
        spec_head = self.slicer.spec.lm_head + ".weight"
        return name.endswith(_IGNORED_SOURCE_SUFFIXES) or (name == spec_head and self.config.tie_word_embeddings)

    def tensor(self, name: str):
        """Read, slice and return one tensor of the pruned checkpoint."""
        out = self.outputs[name]
        recipe = out.recipe
        src = self.files.read(recipe.source) if recipe.source in self.source_params else None
        if src is not None and self.cast and src.is_floating_point():
            src = src.to(self.dtype)  # what from_pretrained(dtype=...) does, before pruning
        result = self.slicer.make(recipe, src, out.dtype).contiguous()
        if tuple(result.shape) != out.shape or result.dtype != out.dtype:
            raise RuntimeError(f"prune: {recipe.source} sliced to {tuple(result.shape)} {result.dtype} but the pruned "
                               f"config gives {name} {out.shape} {out.dtype}")
        return result

    def write_weights(self, folder: str, max_shard_size) -> None:
        """Write the weights as save_pretrained would: same shards, same index, one shard in memory at a time."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        params = dict(self.model.named_parameters())
        split = split_torch_state_dict_into_shards({n: params[n] for n in self.outputs},
                                                   filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for shard_file, names in split.filename_to_tensors.items():
            shard = {n: self.tensor(n) for n in names}
            save_file(shard, os.path.join(folder, shard_file), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            index = {"metadata": {"total_parameters": self.model.num_parameters(), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def prune_checkpoint(plan, model: str | None, out_dir: str, overwrite: bool = False, dtype: str | None = None,
                     max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, model_card_info: dict | None = None,
                     tokenizer=_SOURCE, save=None) -> str:
    """Write the checkpoint of `plan` applied to `model` (alias, folder or cached Hub id) into `out_dir`
    from the source files, one tensor at a time. `dtype` None/"auto": the checkpoint's own (one dtype);
    else each tensor is cast to it before slicing, as `from_pretrained(dtype=...)` would. `tokenizer`:
    the source folder's (default), a tokenizer object, or None. `save(model, tokenizer, out_dir, plan,
    model_card_info, source_dir, write_weights)` replaces `save_pruned` (the search saves into its run
    folder). Returns the absolute output path."""
    from .loading import load_tokenizer
    from .save import check_output_folder, save_pruned

    job = CheckpointPruner(plan, model, dtype)
    if save is None:
        check_output_folder(out_dir, plan, job.folder, overwrite)
    if isinstance(tokenizer, str) and tokenizer == _SOURCE:
        try:
            tokenizer = load_tokenizer(job.folder, local_files_only=True)
        except OSError as e:
            warnings.warn(f"no tokenizer saved with the pruned model: {e}")
            tokenizer = None

    def write_weights(folder):
        job.write_weights(folder, max_shard_size)

    if save is not None:
        return save(job.model, tokenizer, out_dir, plan, model_card_info, job.folder, write_weights)
    return save_pruned(job.model, tokenizer, out_dir, plan, overwrite=overwrite, model_card_info=model_card_info,
                       source_dir=job.folder, max_shard_size=max_shard_size, write_weights=write_weights)
