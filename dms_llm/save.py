"""Saving a pruned model safely, its model card, and pushing it to the Hugging Face Hub.

    from dms_llm.save import save_pruned, update_model_card, push_to_hub
    out = save_pruned(small, tokenizer, "outputs/smollm2-80m", plan, source_dir="models/smollm2")
    update_model_card(out, {"perplexity": {"wikitext2": 21.4}})        # after evaluating the saved folder
    push_to_hub(out, "me/smollm2-80m-dms")

A checkpoint folder holds: safetensors weights (sharded above `max_shard_size`), config.json,
generation_config.json, the tokenizer, `dms_plan.json`, README.md, and, for the per-layer `dms_llama`
format only, `auto_map` in config.json plus the two modeling files (so `trust_remote_code=True` works
without dms_llm). A uniform plan gives a stock checkpoint of the source family: no custom code at all.

Everything is written into a hidden temporary folder beside `out_dir` and renamed into place at the end,
so an interrupted save never leaves a folder that looks complete; the source model folder is never a
valid destination.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings

from .files import write_text_atomic
from .plan import PrunePlan, count_plan_parameters

EVAL_START = "<!-- dms_llm:evaluation:start -->"
EVAL_END = "<!-- dms_llm:evaluation:end -->"
PLAN_FILE = "dms_plan.json"
# Shard size of save_pruned (and of a search's checkpoint, whichever way it is written).
DEFAULT_MAX_SHARD_SIZE = "5GB"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_IMPORTS_DMS_LLM = re.compile(r"^\s*(from|import)\s+dms_llm\b", re.M)


# ----- output-folder safety ---------------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _check_destination(out: str, sources: list[str], overwrite: bool) -> None:
    real_out = os.path.realpath(out)
    for src in sources:
        real_src = os.path.realpath(src)
        if _inside(real_out, real_src):
            raise ValueError(
                f"refusing to save into {out}: it is (inside) the source model folder {src}; choose another folder"
            )
        if _inside(real_src, real_out):
            raise ValueError(
                f"refusing to save into {out}: the source model folder {src} is inside it and would be replaced"
            )
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder; choose another output folder")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
            "or choose another folder"
        )
    # overwrite deletes the old folder: only ever a previous checkpoint, never e.g. a home or repo folder.
    if not any(os.path.isfile(os.path.join(out, f)) for f in ("config.json", PLAN_FILE)):
        raise FileExistsError(
            f"refusing to overwrite {out}: it does not look like a model checkpoint (no config.json or "
            f"{PLAN_FILE}), and overwriting deletes it; choose another folder"
        )
    if _inside(os.path.realpath(os.getcwd()), real_out):
        raise FileExistsError(f"refusing to overwrite {out}: it contains the current working directory")


def check_output_folder(out_dir: str, plan: PrunePlan, source_dir: str | None = None, overwrite: bool = False) -> None:
    """The checks `save_pruned` makes on its destination, for callers that want them before any work."""
    _check_destination(os.path.abspath(out_dir), _source_dirs(plan, source_dir), overwrite)


def _source_dirs(plan: PrunePlan, source_dir: str | None) -> list[str]:
    found = [source_dir] if source_dir else []
    for candidate in (plan.source_model, plan.source_config.get("_name_or_path")):
        if isinstance(candidate, str) and candidate and os.path.isdir(candidate):
            found.append(candidate)
    return found


def _move_into_place(tmp: str, out: str) -> None:
    """Rename the finished temporary folder to `out`; an old `out` is deleted only once that worked."""
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    parent, name = os.path.split(out)
    aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(out, aside)  # onto the empty placeholder: atomic on POSIX
    try:
        os.rename(tmp, out)
    except BaseException:
        if not os.path.exists(out):
            os.rename(aside, out)  # put the old checkpoint back: the new one never arrived
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.exists(aside):
        warnings.warn(f"could not delete the replaced checkpoint moved aside to {aside}; remove it by hand")


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
        tokenizer.save_pretrained(folder)
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
    plan: PrunePlan,
    overwrite: bool = False,
    model_card_info: dict | None = None,
    source_dir: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    write_weights=None,
) -> str:
    """Save a pruned model (from `prune_model(source, plan)`) as a complete checkpoint folder.

    Refuses to write into (or around) the source model folder (`source_dir`, and `plan.source_model`
    when it is a local folder), and into a non-empty `out_dir` unless `overwrite`. `model_card_info`
    may hold: title, description, base_model, license, tags, datasets, repo_id, command, settings
    (dict), results (see `update_model_card`). Returns the absolute path of the saved folder.

    `write_weights(folder)`, when given, writes the weight files (safetensors and their index) instead of
    `model.save_pretrained`; the model then only provides config, class and generation config, and may be
    on the meta device (`dms_llm.stream_prune` writes the weights from the source files, tensor by tensor).
    """
    out = os.path.abspath(out_dir)
    _check_destination(out, _source_dirs(plan, source_dir), overwrite)
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
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        _write_checkpoint(model, tokenizer, tmp, plan, max_shard_size, write_weights)
        card = render_model_card(plan, model.config.model_type, info, source_dir)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----- model card ---------------------------------------------------------------------------------------


def _read_front_matter(readme: str) -> dict:
    try:
        with open(readme) as f:
            text = f.read()
    except OSError:
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    import yaml

    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _base_model(plan: PrunePlan, info: dict) -> str | None:
    if info.get("base_model"):
        return info["base_model"]
    for name in (plan.source_model, plan.source_config.get("_name_or_path")):
        if not isinstance(name, str) or not name:
            continue
        if _HUB_ID.match(name) and not os.path.exists(name):
            return name
        m = _HF_CACHE_SNAPSHOT.search(os.path.abspath(name) + "/")  # a Hub download in the local cache
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_results(results: dict) -> str:
    """Markdown for an evaluation-results dict: `{"markdown": str}` is used verbatim; a
    `dms_eval/1` dict (dms_llm.evaluation, optionally with a "baseline" dict) becomes its comparison
    table; any other dict is rendered generically: a section of numbers becomes a two-column table; a section of
    dicts (task -> metric -> value) a table with one column per metric."""
    if isinstance(results.get("markdown"), str):
        return results["markdown"].strip()
    if str(results.get("format", "")).startswith("dms_eval/"):
        # dms_llm.evaluation's own table (with the dense baseline row and the differences to it)
        from .evaluation import results_markdown

        rows = [results["baseline"]] if isinstance(results.get("baseline"), dict) else []
        return results_markdown(rows + [{k: v for k, v in results.items() if k != "baseline"}]).strip()
    titles = {"perplexity": "Perplexity", "ppl": "Perplexity", "zero_shot": "Zero-shot", "zeroshot": "Zero-shot"}
    scalars, parts = [], []
    for key, value in results.items():
        title = titles.get(key, key.replace("_", " ").capitalize())
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            cols = list(dict.fromkeys(c for v in value.values() for c in v))
            rows = [[name] + [v.get(c, "") for c in cols] for name, v in value.items()]
            parts.append(f"### {title}\n\n" + _table([key if key not in titles else "task", *cols], rows))
        elif isinstance(value, dict):
            parts.append(f"### {title}\n\n" + _table(["name", "value"], [[k, v] for k, v in value.items()]))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            scalars.append([key, value])
        else:
            parts.append(f"### {title}\n\n```json\n{json.dumps(value, indent=1, default=str)}\n```")
    if scalars:
        parts.insert(0, _table(["name", "value"], scalars))
    return "\n\n".join(parts)


def _eval_section(results: dict | None) -> str:
    body = render_results(results) if results else "Not evaluated yet."
    return f"{EVAL_START}\n## Evaluation\n\n{body}\n{EVAL_END}"


def render_model_card(plan: PrunePlan, model_type: str, info: dict, source_dir: str | None = None) -> str:
    import yaml

    s = plan.shapes
    source_card = _read_front_matter(os.path.join(source_dir, "README.md")) if source_dir else {}
    meta: dict = {}
    base = _base_model(plan, info)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    for key in ("license", "license_name", "license_link"):
        value = info.get(key) or plan.source_config.get(key) or source_card.get(key)
        if value:
            meta[key] = value
    meta["pipeline_tag"] = "text-generation"
    tags = ["dms_llm", "pruned", "structured-pruning", "differentiable-model-scaling", plan.source_model_type]
    meta["tags"] = list(dict.fromkeys(tags + list(info.get("tags") or [])))
    if info.get("datasets"):
        meta["datasets"] = list(info["datasets"])

    before = plan.params_before or 0
    after = plan.params_after or count_plan_parameters(plan)
    ratio = after / before if before else float("nan")
    source = plan.source_model or "the source model"
    source_link = f"[{base}](https://huggingface.co/{base})" if base else f"`{source}`"
    stock = model_type != "dms_llama"
    repo = info.get("repo_id") or "path/to/this/folder"
    kept = plan.kept_layers()

    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    out.append(f"# {info.get('title') or (base or os.path.basename(str(source)) or 'model') + ' (DMS-pruned)'}")
    out.append("")
    out.append(
        f"Structurally pruned from {source_link} with `dms_llm` by Differentiable Model "
        "Scaling (Liu et al., ICML 2024): attention heads (KV groups), MLP channels, hidden channels and "
        "whole sublayers were searched with differentiable top-k masks and then physically removed."
    )
    if info.get("description"):
        out += ["", str(info["description"])]
    out += ["", "## Size", ""]
    out.append(
        _table(
            ["", "source", "pruned"],
            [
                ["parameters", before, after],
                ["kept", "", f"{ratio:.2%}" if before else "?"],
                ["hidden size", s.hidden_size, len(plan.hidden_channels)],
                ["layers", s.num_layers, len(kept)],
                ["head_dim", s.head_dim, s.head_dim],
            ],
        )
    )
    fmt = (
        f"a stock `{model_type}` checkpoint (every layer has the same shape): it loads with plain transformers."
        if stock
        else "the per-layer `dms_llama` architecture (layers differ in shape); its modeling code ships in this "
        "folder (`configuration_dms_llama.py`, `modeling_dms_llama.py`, `auto_map` in config.json)."
    )
    out += ["", f"Format: {fmt} `dms_plan.json` lists the kept indices of every structure."]

    out += ["", "## Layers", ""]
    rows = [
        [
            r["source_layer"],
            "removed" if r["layer"] is None else r["layer"],
            r["sublayers"],
            f"{r['kv_groups']}/{r['kv_groups_before']}",
            f"{r['heads']}/{r['heads_before']}",
            f"{r['mlp_channels']}/{r['mlp_channels_before']}",
        ]
        for r in plan.summary()
    ]
    out.append(_table(["source layer", "layer", "sublayers", "KV groups", "query heads", "MLP channels"], rows))

    out += ["", "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if stock:
        out += [
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")  # no custom code needed',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
        ]
    else:
        out += [
            "# 1) with dms_llm installed: importing it registers dms_llama with the Auto classes",
            "import dms_llm  # noqa: F401",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            "",
            "# 2) without dms_llm: the modeling code in this folder is used",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            "# (the tokenizer reads config.json too, hence the same flag)",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)',
            "```",
        ]
    trc = "" if stock else ",trust_remote_code=True"
    out += [
        "",
        "Zero-shot evaluation with lm-evaluation-harness:",
        "",
        "```bash",
        f"lm_eval run --model hf --model_args pretrained={repo}{trc} --tasks arc_easy,boolq",
        "```",
    ]
    if info.get("command"):
        out += ["", "## How it was made", "", "```bash", str(info["command"]), "```"]
    if info.get("settings"):
        out += ["", "## Search settings", "", _table(["setting", "value"], [[k, v] for k, v in info["settings"].items()])]
    out += ["", _eval_section(info.get("results")), ""]
    return "\n".join(out)


def update_model_card(out_dir: str, results: dict) -> str:
    """Add or replace the evaluation section of a saved checkpoint's README.md (atomically)."""
    path = os.path.join(out_dir, "README.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: update_model_card expects a folder written by save_pruned")
    with open(path) as f:
        text = f.read()
    section = _eval_section(results)
    start, end = text.find(EVAL_START), text.find(EVAL_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(EVAL_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text_atomic(path, text)
    return path


# ----- Hub ----------------------------------------------------------------------------------------------


def push_to_hub(out_dir: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a saved checkpoint folder to the Hub (creating the repo if needed); returns the commit URL.

    Every failure (offline, no or bad token, invalid repo id, network) becomes a RuntimeError that
    names the local folder; the folder itself is only read.
    """
    folder = os.path.abspath(out_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise RuntimeError(f"{folder} is not a saved checkpoint (no config.json); nothing was pushed")
    try:
        import huggingface_hub as hub

        hub.create_repo(repo_id, private=private, token=token, repo_type="model", exist_ok=True)
        commit = hub.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            token=token,
            commit_message="Upload DMS-pruned model (dms_llm)",
        )
    except Exception as e:
        raise RuntimeError(
            f"pushing to the Hub as {repo_id!r} failed ({type(e).__name__}: {e}). The local checkpoint is kept "
            f"unchanged at {folder}; fix the cause (network, HF_HUB_OFFLINE, token with write access, "
            f"repo id 'user/name') and push again, e.g. `hf upload {repo_id} {folder}`"
        ) from e
    return str(getattr(commit, "commit_url", None) or commit)


def save_into_run_folder(model, tokenizer, out: str, plan, model_card_info: dict, source_dir: str | None,
                         carry=(), add=None, write_weights=None) -> None:
    """Save a checkpoint into `out`, a run folder that already holds the run's logs and resume state.

    The checkpoint is written into a staging folder beside `out`; the files and folders named in `carry`
    are copied over from `out`, `add(staging)` may write more; then `out` is swapped for it. The finished
    run no longer needs its (possibly large) resume checkpoint, which goes with the old folder.
    """
    import shutil

    def fill(staging):
        save_pruned(model, tokenizer, staging, plan, overwrite=True, model_card_info=model_card_info, source_dir=source_dir,
                    write_weights=write_weights)
        for name in carry:
            src, dst = os.path.join(out, name), os.path.join(staging, os.path.basename(name))
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            elif os.path.exists(src):
                shutil.copy2(src, dst)
        if add is not None:
            add(staging)

    replace_run_folder(out, fill)


def replace_run_folder(out: str, fill) -> None:
    """Replace the existing folder `out` by the folder `fill(staging)` creates beside it, in two renames.

    An interruption before the swap leaves `out` as it was (and a staging folder the next call removes); a
    failure between the two renames puts the old folder back.
    """
    import shutil

    out = out.rstrip(os.sep)
    staging, old = out + ".saving", out + ".old"
    if os.path.isdir(old) and not os.path.exists(out):
        os.replace(old, out)  # a process killed between the renames below: `old` is still the run's only copy
    for leftover in (staging, old):  # from a crash mid-save: ours to replace
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    fill(staging)
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if not os.path.exists(out):
            os.replace(old, out)
        raise
    shutil.rmtree(old)
