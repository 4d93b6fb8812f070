"""Saving a pruned model safely (the model card is `card.py`; pushing to the Hub, `dms_llm.hub`).

    from dms_llm.checkpoints import save_pruned, update_model_card, push_to_hub
    out = save_pruned(small, tokenizer, "outputs/smollm2-80m", source_dir="models/smollm2")   # small = convert(model, plan)
    update_model_card(out, {"perplexity": {"wikitext2": 21.4}})        # after evaluating the saved folder
    push_to_hub(out, "me/smollm2-80m-dms")

A checkpoint folder holds: safetensors weights (sharded above `max_shard_size`), config.json,
generation_config.json, the tokenizer, `dms_plan.json`, README.md, and, for the per-layer `dms_llama`
format only, `auto_map` in config.json plus the two modeling files (so `trust_remote_code=True` works
without dms_llm). A uniform plan gives a stock checkpoint of the source family: no custom code at all.

Everything is written into a staging folder beside `out_dir` (`OUT.saving`) and renamed into place at
the end, so an interrupted save never leaves a folder that looks complete; the source model folder is
never a valid destination.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

from ..files import check_output_folder as guard_output_folder
from ..files import replace_folder
from ..hub import save_tokenizer
from ..plan import PrunePlan, count_plan_parameters
from ..prune import plan_of
from .card import render_model_card

PLAN_FILE = "dms_plan.json"
# Shard size of save_pruned (and of a search's checkpoint, whichever way it is written).
DEFAULT_MAX_SHARD_SIZE = "5GB"

_IMPORTS_DMS_LLM = re.compile(r"^\s*(from|import)\s+dms_llm\b", re.M)


# ----- output-folder safety ---------------------------------------------------------------------------


def check_output_folder(out_dir: str, plan: PrunePlan, source_dir: str | None = None, overwrite: bool = False) -> None:
    """The checks `save_pruned` makes on its destination, for callers that want them before any work."""
    sources = [("source model folder", folder) for folder in _source_dirs(plan, source_dir)]
    # overwrite deletes the old folder: only ever a previous checkpoint
    guard_output_folder(os.path.abspath(out_dir), sources, overwrite, markers=("config.json", PLAN_FILE))


def _source_dirs(plan: PrunePlan, source_dir: str | None) -> list[str]:
    found = [source_dir] if source_dir else []
    for candidate in (plan.source_model, plan.source_config.get("_name_or_path")):
        if isinstance(candidate, str) and candidate and os.path.isdir(candidate):
            found.append(candidate)
    return found


# ----- saving -------------------------------------------------------------------------------------------


def _check_model_matches_plan(model, plan: PrunePlan) -> None:
    want_type = plan.source_model_type if plan.uses_stock_format() else "dms_llama"
    if model.config.model_type != want_type:
        raise ValueError(f"model is a {model.config.model_type!r} model but the plan produces {want_type!r}")
    n, want = sum(p.numel() for p in model.parameters()), count_plan_parameters(plan)
    if n != want or model.config.hidden_size != len(plan.hidden_channels):
        raise ValueError(
            f"model has {n:,} parameters and hidden size {model.config.hidden_size}, but the plan gives "
            f"{want:,} and {len(plan.hidden_channels)}: was it pruned with this plan?"
        )


def _write_checkpoint(model, tokenizer, folder: str, plan: PrunePlan, max_shard_size, write_weights=None) -> None:
    custom = model.config.model_type == "dms_llama"
    if custom:
        # Makes save_pretrained write auto_map and copy the modeling files (works for a remote-code
        # class too, which is why the classes are taken from the model rather than imported).
        type(model.config).register_for_auto_class("AutoConfig")
        type(model).register_for_auto_class("AutoModelForCausalLM")
    if write_weights is None:
        model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    else:
        # Everything save_pretrained writes but the weights (config with dtype and architectures,
        # generation config, modeling files), from a model that may live on the meta device; then the caller's
        # weight files.
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its "Writing model shards: 0it" would only confuse
        try:
            model.save_pretrained(folder, state_dict={}, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        write_weights(folder)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    plan.to_json(os.path.join(folder, PLAN_FILE))

    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    auto_map = saved.get("auto_map")
    if not custom:
        if auto_map:
            raise RuntimeError(f"stock checkpoint got an auto_map {auto_map}; it must load without remote code")
        return
    if not auto_map or "AutoModelForCausalLM" not in auto_map or "AutoConfig" not in auto_map:
        raise RuntimeError(f"dms_llama checkpoint lacks auto_map for AutoConfig/AutoModelForCausalLM: {auto_map}")
    for ref in auto_map.values():
        module_file = os.path.join(folder, ref.split(".")[0] + ".py")
        if not os.path.isfile(module_file):
            raise RuntimeError(f"auto_map names {ref} but {os.path.basename(module_file)} was not copied")
        with open(module_file) as f:
            if _IMPORTS_DMS_LLM.search(f.read()):
                raise RuntimeError(f"{module_file} imports dms_llm; remote code must need only transformers")


def save_pruned(
    model,
    tokenizer,
    out_dir: str,
    plan: PrunePlan | None = None,
    overwrite: bool = False,
    model_card_info: dict | None = None,
    source_dir: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    write_weights=None,
) -> str:
    """Save a pruned model (from `dms_llm.convert(source, plan)`) as a complete checkpoint folder; `plan`
    defaults to the one the model carries.

    Refuses to write into (or around) the source model folder (`source_dir`, and `plan.source_model`
    when it is a local folder), and into a non-empty `out_dir` unless `overwrite`. `model_card_info`
    may hold: title, description, base_model, license, tags, datasets, repo_id, command (default: the one
    the plan records, `plan.metadata.command`), settings (dict), results (see `update_model_card`). Returns the absolute path of the saved folder.

    `write_weights(folder)`, when given, writes the weight files (safetensors and their index) instead of
    `model.save_pretrained`; the model then only provides config, class and generation config, and may be
    on the meta device (`dms_llm.checkpoints.stream_prune` writes the weights from the source files, tensor
    by tensor).
    """
    plan = plan if plan is not None else plan_of(model)
    out = os.path.abspath(out_dir)
    check_output_folder(out, plan, source_dir, overwrite)
    _check_model_matches_plan(model, plan)
    # The card and dms_plan.json state the true counts of what is saved; a caller's figure that
    # disagrees (a stale plan, a budget-formula bug) is reported rather than written down.
    counted, dense = count_plan_parameters(plan), count_plan_parameters(PrunePlan.dense(plan.source_config))
    for field_name, true_value in (("params_before", dense), ("params_after", counted)):
        given = getattr(plan, field_name)
        if given is not None and given != true_value:
            warnings.warn(f"plan.{field_name} = {given:,} but the saved model's count is {true_value:,}; saving the latter")
    plan = dataclasses.replace(plan, params_before=dense, params_after=counted)
    info = dict(model_card_info or {})
    if plan.metadata.command and "command" not in info:  # the card's "How it was made": what the plan records
        info["command"] = plan.metadata.command

    def fill(staging):
        _write_checkpoint(model, tokenizer, staging, plan, max_shard_size, write_weights)
        card = render_model_card(plan, model.config.model_type, info, source_dir)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(card)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    replace_folder(out, fill)
    return out
