"""FLAP: fluctuation-based structures, ranked globally after standardisation, with bias compensation.

FLAP (An, Zhao, Yu, Tang, Wang 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI) scores an input channel j of o_proj / down_proj by its fluctuation over calibration tokens
weighted by the squared norm of the weight column that reads it (WIFV):

    F_j = Var_tokens(X_j) * ||W[:, j]||_2^2

Scores are standardised within each layer and structure type ((s - mean) / std over that layer's
o_proj input columns, or its MLP channels); an attention column's score is squared first and a KV group
gets the mean of its columns' standardised scores, as in the authors' code. All structures of all layers
are then ranked together ("AL-AM"), so layer widths come out adaptive: a layer whose scores have a long
low tail loses more. Structures are removed from the lowest score up until the parameter budget is met.
A removed channel's input is replaced by its calibration mean, which turns its contribution into a
constant: W[:, removed] @ mean[removed] is added to the output bias of o_proj / down_proj (the pruned
model gains those biases; they are counted).

Where the paper is silent or we simplify:
- statistics come from one pass of the dense model (FLAP's code also measures on the unpruned model);
- the unit is the KV group (GQA), the variance is the population variance (ranks are unchanged);
- when every structure of a sublayer is removed, the sublayer is removed and its constant output
  (compensation + its own bias) is added to the output bias of the nearest earlier sublayer that remains,
  which is exact because nothing reads the residual stream between the two. The very first sublayer
  has no earlier one, so with compensation it keeps at least its best-scored structure.
"""

from __future__ import annotations

import torch

from ..arch import ModelParts
from ..budget import ParameterCounter
from ..method import DEFAULT_ALIGN
from .common import (
    BudgetError,
    build_plan,
    check_budget,
    check_target,
    output_proj_input_stats,
    per_group,
    source_name,
)

OUTPUT_BIAS = {"attention": True, "mlp": True}


@torch.no_grad()
def fluctuation_scores(model, stats) -> tuple[dict, dict]:
    """Raw WIFV per o_proj input column (squared, as the authors' code does for attention) and per MLP
    channel: Var(X_j) * ||W[:, j]||^2."""
    parts = ModelParts(model)
    heads, chans = {}, {}
    for i in range(parts.shapes.num_layers):
        if f"{i}.attention" in stats:
            col = parts.attn_proj(i, "o").weight.double().pow(2).sum(0)
            heads[i] = (stats[f"{i}.attention"].var * col).pow(2).cpu()
        if f"{i}.mlp" in stats:
            col = parts.mlp_proj(i, "down").weight.double().pow(2).sum(0)
            chans[i] = (stats[f"{i}.mlp"].var * col).cpu()
    return heads, chans


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (x - x.mean()) / (std if std > 0 else 1.0)


def global_removal_order(head_columns: dict, chans: dict, model=None) -> list[tuple[str, int, int]]:
    """(kind, layer, index) of every structure, lowest score first (ties in a fixed order). Scores are
    standardised per layer and type; a KV group's score is the mean over its o_proj columns (`model`
    gives the column layout; without it `head_columns[l]` must already be one score per group)."""
    parts = ModelParts(model) if model is not None else None
    items = []
    for layer, cols in head_columns.items():
        z = _standardise(cols)
        if parts is not None:
            z = per_group(z, parts, layer) / (parts.shapes.n_rep(layer) * parts.shapes.head_dim)
        items += [(float(v), "attention", layer, j) for j, v in enumerate(z.tolist())]
    for layer, scores in chans.items():
        items += [(float(v), "mlp", layer, j) for j, v in enumerate(_standardise(scores).tolist())]
    items.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
    return [(kind, layer, j) for _, kind, layer, j in items]


@torch.no_grad()
def compensation(model, stats, kept_heads: dict, kept_chans: dict) -> tuple[dict, list[str]]:
    """Output-bias deltas: W[:, removed] @ mean[removed] per sublayer, removed sublayers carried back."""
    parts = ModelParts(model)
    s = parts.shapes
    deltas: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    last_present = None
    for i in range(s.num_layers):
        for kind in ("attention", "mlp"):
            key = f"{i}.{kind}"
            if key not in stats:
                continue
            proj = parts.attn_proj(i, "o") if kind == "attention" else parts.mlp_proj(i, "down")
            mean = stats[key].mean
            keep = torch.zeros(proj.weight.shape[1], dtype=torch.bool)
            if kind == "attention":
                q_rows = per_group_rows(parts, i, kept_heads[i])
                keep[q_rows] = True
            else:
                keep[kept_chans[i]] = True
            removed = (~keep).nonzero().flatten().to(proj.weight.device)
            delta = proj.weight.double()[:, removed] @ mean[removed].to(proj.weight.device)
            present = bool(keep.any())
            if present:
                deltas[key] = deltas.get(key, 0) + delta
                last_present = key
                continue
            # the whole sublayer goes: its constant output (and its own bias) moves to the previous writer
            if proj.bias is not None:
                delta = delta + proj.bias.double()
            if last_present is None:
                dropped.append(key)
            else:
                deltas[last_present] = deltas[last_present] + delta
    return {k: v.float().cpu() for k, v in deltas.items()}, dropped


def per_group_rows(parts: ModelParts, layer: int, groups: list[int]) -> torch.Tensor:
    from ..prune import head_rows

    s = parts.shapes
    return head_rows(groups, s.n_rep(layer), s.head_dim)


def flap_plan(model, calib_blocks, target_params: int, batch_size: int = 8, bias_compensation: bool = True,
              source_model: str | None = None, align: int = DEFAULT_ALIGN):
    """`bias_compensation=False` gives FLAP's structure without the biases (for ablations and tests).
    With `align` > 1, each layer's MLP keeps a multiple of `align` channels (or all of them): the
    channels the global order leaves in a layer, rounded down to a multiple, best scores first."""
    target = check_target(model, target_params)
    parts = ModelParts(model)
    s = parts.shapes
    stats = output_proj_input_stats(model, calib_blocks, batch_size)
    heads, chans = fluctuation_scores(model, stats)
    order = global_removal_order(heads, chans, model)
    if bias_compensation:  # the first sublayer must stay: nothing earlier could take its constant output
        first = next((kind, layer) for layer in range(s.num_layers) for kind, sc in (("attention", heads), ("mlp", chans)) if layer in sc)
        best = max(j for j, (kind, layer, _) in enumerate(order) if (kind, layer) == first)
        order = order[:best] + order[best + 1 :]
    count = ParameterCounter(model, OUTPUT_BIAS if bias_compensation else None).sizes

    # kept sizes after removing the first n structures of the order, per layer
    kinds = torch.tensor([0 if k == "attention" else 1 for k, _, _ in order], dtype=torch.long)
    layers = torch.tensor([layer for _, layer, _ in order], dtype=torch.long)

    def sizes(n: int):
        removed_kv = torch.bincount(layers[:n][kinds[:n] == 0], minlength=s.num_layers).tolist()
        removed_ch = torch.bincount(layers[:n][kinds[:n] == 1], minlength=s.num_layers).tolist()
        kv = [s.num_kv_heads[i] - removed_kv[i] for i in range(s.num_layers)]
        ch = [aligned(s.intermediate[i] - removed_ch[i], s.intermediate[i]) for i in range(s.num_layers)]
        return kv, ch

    def aligned(kept: int, dense: int) -> int:
        return kept if kept == dense else kept // align * align

    # smallest n whose count fits; at least one structure must stay (a model needs one sublayer)
    lo, hi = 0, len(order) - 1
    if count(*sizes(hi)) > target:
        raise BudgetError(f"target {target:,} is below what FLAP can reach by removing heads and channels ({count(*sizes(hi)):,})")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(*sizes(mid)) <= target else (mid + 1, hi)
    n_removed = lo
    removed: dict[tuple[str, int], set] = {}
    for kind, layer, j in order[:n_removed]:
        removed.setdefault((kind, layer), set()).add(j)
    kept_heads = {i: [g for g in range(s.num_kv_heads[i]) if g not in removed.get(("attention", i), ())]
                  for i in range(s.num_layers) if s.num_kv_heads[i]}
    widths = sizes(n_removed)[1]
    kept_chans = {}
    for i in range(s.num_layers):
        if s.intermediate[i]:  # the layer's remaining channels, lowest score first; the best `widths[i]` stay
            remaining = [j for kind, layer, j in order[n_removed:] if (kind, layer) == ("mlp", i)]
            kept_chans[i] = sorted(remaining[len(remaining) - widths[i]:] if widths[i] else [])
    meta = {"method": "flap", "criterion": "WIFV fluctuation Var(X_j) * ||W[:, j]||^2, standardised per layer and type",
            "allocation": "global (adaptive widths)", "bias_compensation": bias_compensation,
            "calibration_tokens": int(calib_blocks.numel()), "removed_structures": n_removed, "align": align}
    values, ob = None, None
    if bias_compensation:
        values, dropped = compensation(model, stats, kept_heads, kept_chans)
        ob = dict(OUTPUT_BIAS)
        if dropped:
            meta["compensation_dropped"] = dropped
    plan = build_plan(model, kept_heads, kept_chans, source_name(model, source_model), meta,
                      output_bias=ob, output_bias_values=values)
    return check_budget(plan, count(*sizes(n_removed)), target)
