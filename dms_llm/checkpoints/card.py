"""The model card (README.md) of a saved checkpoint: Hub front matter, size, per-layer table, how to load
it, how it was made, and the evaluation results once they exist."""

from __future__ import annotations

import json
import os

from ..files import write_text_atomic
from ..hub import hub_id_of
from ..markdown import table
from ..plan import PrunePlan, count_plan_parameters

EVAL_START = "<!-- dms_llm:evaluation:start -->"
EVAL_END = "<!-- dms_llm:evaluation:end -->"




def _source_card_data(source_dir: str | None) -> dict:
    """The front matter of the source model's README.md (license and such), when it has one."""
    path = os.path.join(source_dir, "README.md") if source_dir else None
    if not path or not os.path.isfile(path):
        return {}
    from huggingface_hub import ModelCard

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return {}  # no front matter
    try:
        return ModelCard(text).data.to_dict()
    except ValueError:  # front matter that is not valid YAML: the source card just has no metadata to offer
        return {}


def _base_model(plan: PrunePlan, info: dict) -> str | None:
    if info.get("base_model"):
        return info["base_model"]
    for name in (plan.source_model, plan.source_config.get("_name_or_path")):
        if isinstance(name, str) and name and hub_id_of(name):
            return hub_id_of(name)
    return None


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(table(header, [[_fmt(c) for c in row] for row in rows]))


def render_results(results: dict) -> str:
    """Markdown for an evaluation-results dict: `{"markdown": str}` is used verbatim; a
    `dms_eval/1` dict (dms_llm.evaluation, optionally with a "baseline" dict) becomes its comparison
    table; any other dict is rendered generically: a section of numbers becomes a two-column table; a section of
    dicts (task -> metric -> value) a table with one column per metric."""
    if isinstance(results.get("markdown"), str):
        return results["markdown"].strip()
    if str(results.get("format", "")).startswith("dms_eval/"):
        # dms_llm.evaluation's own table (with the dense baseline row and the differences to it)
        from ..evaluation import results_markdown

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
    from huggingface_hub import ModelCardData

    base = _base_model(plan, info)
    source = plan.source_model or "the source model"
    source_link = f"[{base}](https://huggingface.co/{base})" if base else f"`{source}`"
    stock = model_type != "dms_llama"

    out = ["---", ModelCardData(**_card_metadata(plan, info, base, source_dir)).to_yaml(), "---", ""]
    out.append(f"# {info.get('title') or (base or os.path.basename(str(source)) or 'model') + ' (DMS-pruned)'}")
    out.append("")
    out.append(
        f"Structurally pruned from {source_link} with `dms_llm` by Differentiable Model "
        "Scaling (Liu et al., ICML 2024): attention heads (KV groups), MLP channels, hidden channels and "
        "whole sublayers were searched with differentiable top-k masks and then physically removed."
    )
    if info.get("description"):
        out += ["", str(info["description"])]
    out += _size_section(plan, model_type, stock)
    out += _layers_section(plan)
    out += _loading_section(info.get("repo_id") or "path/to/this/folder", stock)
    if info.get("command"):
        out += ["", "## How it was made", "", "```bash", str(info["command"]), "```"]
    if info.get("settings"):
        out += ["", "## Search settings", "", _table(["setting", "value"], [[k, v] for k, v in info["settings"].items()])]
    out += ["", _eval_section(info.get("results")), ""]
    return "\n".join(out)


def _card_metadata(plan: PrunePlan, info: dict, base: str | None, source_dir: str | None) -> dict:
    """The card's YAML header: base model, license (the caller's, else the source config's or card's), tags."""
    source_card = _source_card_data(source_dir)
    meta: dict = {}
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
    return meta


def _size_section(plan: PrunePlan, model_type: str, stock: bool) -> list[str]:
    """Source and pruned sizes side by side, and the checkpoint's format."""
    s = plan.shapes
    before = plan.params_before or 0
    after = plan.params_after or count_plan_parameters(plan)
    ratio = after / before if before else float("nan")
    out = ["", "## Size", ""]
    out.append(
        _table(
            ["", "source", "pruned"],
            [
                ["parameters", before, after],
                ["kept", "", f"{ratio:.2%}" if before else "?"],
                ["hidden size", s.hidden_size, len(plan.hidden_channels)],
                ["layers", s.num_layers, len(plan.kept_layers())],
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
    return out + ["", f"Format: {fmt} `dms_plan.json` lists the kept indices of every structure."]


def _layers_section(plan: PrunePlan) -> list[str]:
    """One table row per source layer: where it went and what it kept."""
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
    return ["", "## Layers", "",
            _table(["source layer", "layer", "sublayers", "KV groups", "query heads", "MLP channels"], rows)]


def _loading_section(repo: str, stock: bool) -> list[str]:
    """How to load the folder (a `dms_llama` one with or without dms_llm) and evaluate it with lm-eval."""
    out = ["", "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
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
    return out + [
        "",
        "Zero-shot evaluation with lm-evaluation-harness:",
        "",
        "```bash",
        f"lm_eval run --model hf --model_args pretrained={repo}{trc} --tasks arc_easy,boolq",
        "```",
    ]


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
