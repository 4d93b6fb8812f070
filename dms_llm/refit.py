"""Compensation of a pruned model on calibration text: which heads and channels each layer keeps, and a
least-squares refit of its output projections (o_proj, down_proj).

Pruning heads or MLP channels drops their share of a sublayer's output. With the source model at hand,
much of that share can be rebuilt from the channels that stay: every kept sublayer of the source is run on
the pruned model's own input (the hidden channels the plan removed are zero there), and the pruned output
projection becomes the ridge least-squares map from the kept channels to the source sublayer's output on
the kept hidden channels:

    W' = W[H, :] C[:, K] (C[K, K] + alpha * mean(diag C[K, K]) I)^-1,    C = sum over tokens of z z^T,

z being the source sublayer's input to its output projection (every head or channel), K the kept ones and
H the kept hidden channels. When no head or channel was pruned, W' = W[H, K] (up to the ridge term). The
target is the source sublayer on the *pruned* model's input: on the dense model's input (asymmetric calibration),
or the dense residual stream's whole error, the refit model was 18% / 25% and 6% / 14% worse on validation
(docs/RESULTS.md 24). A projection with a bias (a plan that adds output biases, as FLAP's do) gets an intercept,
unregularised.

`select="reconstruction"` also chooses K, keeping each layer's counts: heads (whole KV groups) and channels
are removed greedily by the least increase of that error, the optimal-brain-surgeon rule on the same
statistics (removing column set S from the fit costs tr(W_S (H^-1)_SS^-1 W_S^T), after which W and H^-1
are updated as if S had never been there), a few units at a time. The plan is updated in place.

Hidden channels the plan removes are missing from every sublayer's input. With `fill_hidden`, each kept
sublayer's input is completed instead of left at zero: the removed channels of the source's normalised input
are predicted from the kept ones by the ridge regression B = C[D, H] (C[H, H] + alpha * mean(diag) I)^-1 on
the dense model's own normalised inputs (C their second moments over the calibration tokens, D the removed
channels), and the pruned q/k/v (gate/up) become W[:, H] + W[:, D] B: on the kept channels they compute what
the source computes on the completed input, which is then the input the output projection is fit on.

The layers are compensated front to back on the pruned prefix: the hidden states of every calibration
token are kept between sublayers, so each sublayer is fit on the input that the compensated layers before
it produce, and one pass of each source sublayer is the whole cost. The pruned sublayer's own input to its
output projection is z's kept columns (its heads and channels are the source's, on the same input), so
its output, which carries the stream on to the next sublayer, is the refit projection applied to them; only
when z over every calibration token would take more than KEPT_INPUTS_MAX_BYTES is the pruned sublayer run. Shapes do not
change: a refit model saves, reloads and exports like any pruned one (its weights are no longer a slice
of the source's, which the plan's metadata records). Sublayers the plan removes entirely are not rebuilt.
When the source does not fit in memory beside the pruned model (--prune-from-files), the source is its
structure on the meta device and each sublayer's weights are read from the files before its pass and
dropped after it.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ModelParts
from .passes import batches, model_device, removed_after
from .plan import PrunePlan
from .prune import PlanSlicer, head_rows

# alpha of the ridge term, chosen on WikiText-2 and PTB validation perplexity (docs/RESULTS.md section 11).
DEFAULT_ALPHA = 1e-4
DEFAULT_BLOCKS = 128  # calibration blocks the refit reads: -1.4% WikiText-2 valid at 256 for twice the time (RESULTS 11)
SELECTIONS = ("plan", "reconstruction")
# The kept columns of z over every calibration token are held to carry the stream on, which saves the pruned
# sublayer's pass (the refit of the default 80% SmolLM2 plan: 1.21x faster, eval/bench_refit.py); above this
# many bytes the pass is run instead (the source's passes and the second moments are the rest of the time).
KEPT_INPUTS_MAX_BYTES = 2 << 30
# The hidden fill's second moments (float64, hidden x hidden per kept sublayer) are gathered by dense passes
# over the calibration blocks, as many sublayers per pass as fit in this many bytes (a 7B model: 15 a pass).
FILL_STATISTICS_MAX_BYTES = 2 << 30
# Greedy removal takes this many rounds per sublayer at most (units leave in equal chunks): one unit per
# round is the exact greedy rule, and on SmolLM2 rounds of a few channels lost nothing measurable.
_SELECTION_ROUNDS = 64


class _Stop(Exception):
    """Raised by a capturing hook to end a forward pass early."""


def _attention_call(attention: nn.Module, hidden: torch.Tensor, position_embeddings, attention_mask) -> torch.Tensor:
    """Run an attention module (stock or dms_llama) outside its decoder layer; its output projection's output."""
    kwargs = {}
    for name, p in inspect.signature(attention.forward).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = {"hidden_states": hidden, "position_embeddings": position_embeddings, "attention_mask": attention_mask}
        if name in value:
            kwargs[name] = value[name]
        elif p.default is p.empty:  # the KV cache, under whichever name: none here
            kwargs[name] = None
    return attention(**kwargs)[0]


class _Sublayer:
    """One kept sublayer: source and pruned modules, the source's output projection (whose input z is
    observed) and the pruned one (which is refit), the norm in front of it, and the kept units (KV groups
    or channels) as column indices of z."""

    def __init__(self, kind: str, source_layer: int, pruned_layer: int, pruned: nn.Module, source: nn.Module,
                 norm: nn.Module, out_pruned: nn.Linear, out_source: nn.Linear, unit_width: int, kept_units: list[int]):
        self.kind, self.source_layer, self.pruned_layer = kind, source_layer, pruned_layer
        self.pruned, self.source, self.norm, self.out_pruned, self.out_source = pruned, source, norm, out_pruned, out_source
        self.unit_width, self.kept_units = unit_width, kept_units

    @property
    def units(self) -> int:
        return self.out_source.in_features // self.unit_width

    def columns(self, units: list[int]) -> torch.Tensor:
        """Column indices of z owned by `units`: each unit is `unit_width` consecutive columns."""
        return head_rows(units, 1, self.unit_width)

    def read_source(self, read, names: dict, like: torch.Tensor) -> None:
        """Fill the source sublayer (on the meta device) from `read(tensor name)`, on `like`'s device."""
        self.source.to_empty(device=like.device)
        prefix = names[self.source]
        with torch.no_grad():
            for name, p in self.source.named_parameters():
                p.copy_(read(f"{prefix}.{name}").to(device=like.device, dtype=p.dtype))

    def drop_source(self) -> None:
        self.source.to("meta")


def _sublayers(pruned: nn.Module, source: nn.Module, plan: PrunePlan) -> list[_Sublayer]:
    parts, src = ModelParts(pruned), ModelParts(source)
    shapes = plan.shapes
    kept_layers = plan.kept_layers()
    if len(kept_layers) != len(parts.layers) or len(src.layers) != len(plan.layers):
        raise ValueError(f"the plan keeps {len(kept_layers)} of {len(plan.layers)} layers, but the pruned model has "
                         f"{len(parts.layers)} and the source {len(src.layers)}: pass the model the plan pruned and its source")
    out = []
    for j, i in enumerate(kept_layers):
        lp = plan.layers[i]
        if lp.has_attention:
            out.append(_Sublayer("attention", i, j, parts.attn(j), src.attn(i), parts.norm(j, "attn_norm"),
                                 parts.attn_proj(j, "o"), src.attn_proj(i, "o"), shapes.n_rep(i) * shapes.head_dim,
                                 list(lp.attention_groups)))
        if lp.has_mlp:
            out.append(_Sublayer("mlp", i, j, parts.mlp(j), src.mlp(i), parts.norm(j, "mlp_norm"),
                                 parts.mlp_proj(j, "down"), src.mlp_proj(i, "down"), 1, list(lp.mlp_channels)))
    return out


class _Statistics:
    """Second moments of [z, 1] over the calibration tokens: each batch's product in the model's precision
    (float32 at least), summed in float64."""

    def __init__(self):
        self.cov: torch.Tensor | None = None
        self.tokens = 0

    def add(self, z: torch.Tensor) -> None:
        z = z.reshape(-1, z.shape[-1])
        z = torch.cat([z.float(), z.new_ones(z.shape[0], 1, dtype=torch.float32)], dim=1)
        prod = (z.T @ z).double()
        self.cov = prod if self.cov is None else self.cov.add_(prod)
        self.tokens += z.shape[0]


def _relative_error(w: torch.Tensor, w_cov: torch.Tensor, cov: torch.Tensor, cols: torch.Tensor, wk: torch.Tensor) -> float:
    """E|w [z;1] - wk [z;1]_cols|^2 / E|w [z;1]|^2, from the second moments (`w_cov` = w @ cov, computed once
    for every error of the sublayer: it is the largest product)."""
    total = (w_cov * w).sum()
    cross = (wk * w_cov[:, cols]).sum()
    own = (wk @ cov[cols][:, cols] * wk).sum()
    return float(((total - 2 * cross + own) / total).clamp_min(0))


def _ridge(cov: torch.Tensor, cols: torch.Tensor, alpha: float, intercept: torch.Tensor | None) -> torch.Tensor:
    """alpha * mean(diag) on the diagonal of cov[cols, cols], except on the intercept's column."""
    d = cov[cols, cols].clone()
    free = torch.ones_like(d, dtype=torch.bool) if intercept is None else cols != intercept
    shift = alpha * d[free].mean() + torch.finfo(torch.float64).tiny
    return torch.diag(torch.where(free, shift, torch.zeros_like(d)))


def _select_units(sub: _Sublayer, w: torch.Tensor, cov: torch.Tensor, alpha: float, keep: int,
                  intercept: torch.Tensor | None) -> list[int]:
    """The `keep` units whose removal costs the least reconstruction error, by greedy optimal-brain-surgeon
    removal in rounds (see the module docstring)."""
    h_inv = torch.linalg.inv(cov + _ridge(cov, torch.arange(cov.shape[0]), alpha, intercept))
    w = w.clone()
    alive = torch.arange(sub.units)
    per_round = max(1, math.ceil((sub.units - keep) / _SELECTION_ROUNDS))
    while len(alive) > keep:
        cols = sub.columns(alive.tolist()).view(len(alive), sub.unit_width)
        blocks = h_inv[cols[:, :, None], cols[:, None, :]]  # [units, width, width]
        wu = w[:, cols].permute(1, 0, 2)  # [units, rows, width]
        costs = (wu * torch.linalg.solve(blocks, wu.transpose(1, 2)).transpose(1, 2)).sum((1, 2))
        drop = torch.topk(costs, min(per_round, len(alive) - keep), largest=False).indices
        s = cols[drop].flatten()
        block_inv = torch.linalg.inv(h_inv[s][:, s])
        w -= (w[:, s] @ block_inv) @ h_inv[s, :]
        h_inv -= (h_inv[:, s] @ block_inv) @ h_inv[s, :]
        alive = alive[~torch.isin(alive, alive[drop])]
    return alive.tolist()


def _solve(sub: _Sublayer, stats: _Statistics, hidden: torch.Tensor, alpha: float, select: bool) -> tuple[float, float, list[int]]:
    """Choose the kept units (or keep the plan's) and the refit weight; write them into the pruned sublayer's
    output projection. Returns the relative output error on the calibration tokens before (the plan's
    units, sliced weights) and after, and the kept units."""
    cov = stats.cov
    n = sub.out_source.in_features
    out_w = sub.out_source.weight.detach()
    rows = hidden.to(out_w.device)
    bias = sub.out_source.bias.detach()[rows].double() if sub.out_source.bias is not None else torch.zeros(len(rows), dtype=torch.float64)
    w = torch.cat([out_w[rows].double().cpu(), bias.cpu()[:, None]], dim=1).to(cov.device)
    fit_bias = sub.out_pruned.bias is not None
    intercept = torch.tensor(n) if fit_bias else None

    def with_intercept(cols: torch.Tensor) -> torch.Tensor:
        return torch.cat([cols, torch.tensor([n])]) if fit_bias else cols

    plan_cols = with_intercept(sub.columns(sub.kept_units))
    sliced = sub.out_pruned.weight.detach().double().cpu()
    if fit_bias:
        sliced = torch.cat([sliced, sub.out_pruned.bias.detach().double().cpu()[:, None]], dim=1)
    # With no intercept the constant column is left out of the fit; its share of the target (the source
    # bias) is then not a term the kept columns could match, so it counts in neither error.
    target = w if fit_bias else w[:, :n]
    target_cov = cov if fit_bias else cov[:n, :n]
    target_w_cov = target @ target_cov
    before = _relative_error(target, target_w_cov, target_cov, plan_cols, sliced.to(cov.device))

    units = sub.kept_units
    if select:
        units = _select_units(sub, target, target_cov, alpha, len(sub.kept_units), intercept)
    cols = with_intercept(sub.columns(units))
    cov_kk = target_cov[cols][:, cols]
    cross = target_w_cov[:, cols]
    new = torch.linalg.solve(cov_kk + _ridge(target_cov, cols, alpha, intercept), cross.T).T
    after = _relative_error(target, target_w_cov, target_cov, cols, new)
    with torch.no_grad():
        if fit_bias:
            sub.out_pruned.bias.copy_(new[:, -1].to(sub.out_pruned.bias.dtype))
            new = new[:, :-1]
        sub.out_pruned.weight.copy_(new.to(sub.out_pruned.weight.dtype))
    return before, after, units


def _reslice_inputs(sub: _Sublayer, plan: PrunePlan, pruned_model: nn.Module, source_model: nn.Module,
                    fill: torch.Tensor | None = None) -> None:
    """q/k/v (or gate/up) of the pruned sublayer from the source, after a selection changed the plan's units or
    with the hidden fill B (`fill`): then each weight is W[rows, H] + W[rows, D] B, which computes on the kept
    hidden channels what the source computes on the input completed by B."""
    slicer = PlanSlicer(plan, ModelParts(pruned_model).spec, device=sub.out_pruned.weight.device)
    prefix = f"{slicer.prefix}{sub.pruned_layer}."
    names = {m: n for n, m in pruned_model.named_modules()}
    sublayer_name = names[sub.pruned]
    source_params = dict(source_model.named_parameters())
    out_name = names[sub.out_pruned]
    removed = _removed_channels(torch.as_tensor(plan.hidden_channels), plan.shapes.hidden_size) if fill is not None else None
    with torch.no_grad():
        for name, p in sub.pruned.named_parameters():
            full = f"{sublayer_name}.{name}"
            if full.startswith(out_name + ".") or not full.startswith(prefix):
                continue
            recipe = slicer.recipe(full)
            w = source_params[recipe.source]
            if fill is None or p.dim() != 2:  # biases and norms take no input channels
                p.copy_(slicer.make(recipe, w, p.dtype))
                continue
            kept = slicer.make(recipe, w, w.dtype).double()
            extra = slicer.make(replace(recipe, cols=removed.to(recipe.cols.device)), w, w.dtype).double()
            p.copy_((kept + extra @ fill.to(kept.device)).to(p.dtype))


def _set_units(plan: PrunePlan, sub: _Sublayer, units: list[int]) -> None:
    if sub.kind == "attention":
        plan.layers[sub.source_layer].attention_groups = list(units)
    else:
        plan.layers[sub.source_layer].mlp_channels = list(units)
    sub.kept_units = list(units)


@torch.no_grad()
def _hidden_fill_maps(source: nn.Module, subs: list[_Sublayer], blocks: torch.Tensor, hidden: torch.Tensor,
                      alpha: float, batch_size: int) -> dict[tuple[int, str], torch.Tensor]:
    """B per kept sublayer ((source layer, kind) -> [removed, kept] hidden channels, float64): the ridge
    regression of the removed channels of the source's normalised sublayer input on the kept ones, over the
    dense model's passes on `blocks`."""
    src, width = ModelParts(source), source.config.hidden_size
    removed = _removed_channels(hidden, width)
    norms = {(sub.source_layer, sub.kind): src.norm(sub.source_layer, "attn_norm" if sub.kind == "attention" else "mlp_norm")
             for sub in subs}
    per_pass = max(1, FILL_STATISTICS_MAX_BYTES // (width * width * 8))
    keys, maps, device = list(norms), {}, model_device(source)
    for start in range(0, len(keys), per_pass):
        group = keys[start:start + per_pass]
        stats = {key: _Statistics() for key in group}
        hooks = [norms[key].register_forward_hook(lambda m, a, out, key=key: stats[key].add(out.detach())) for key in group]
        last = max(layer for layer, _ in group)
        if last + 1 < len(src.layers):  # the pass ends after the group's last layer
            hooks.append(src.layers[last + 1].register_forward_pre_hook(_raise_stop))
        with removed_after(hooks):
            for ids in batches(blocks, batch_size):
                try:
                    source(ids.to(device), use_cache=False)
                except _Stop:
                    pass
        for key in group:
            cov = stats[key].cov[:width, :width]
            kept = cov[hidden][:, hidden]
            ridge = alpha * kept.diagonal().mean() * torch.eye(len(hidden), dtype=cov.dtype, device=cov.device)
            maps[key] = torch.linalg.solve(kept + ridge, cov[hidden][:, removed]).T
        del stats
    return maps


def _raise_stop(*_):
    raise _Stop


def _removed_channels(hidden: torch.Tensor, width: int) -> torch.Tensor:
    return torch.as_tensor(sorted(set(range(width)) - set(hidden.tolist())), dtype=torch.long)


@torch.no_grad()
def _capture_inputs(pruned: nn.Module, parts: ModelParts, blocks: torch.Tensor, batch_size: int, device):
    """The first decoder layer's input for every batch, and the rotary embeddings and attention mask that
    the first attention sublayer is called with (the same for every block: one length, no padding)."""
    first_layer, hidden = parts.layers[0], []
    attention = next((parts.attn(j) for j in range(len(parts.layers)) if parts.attn(j) is not None), None)

    def grab_hidden(module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    with removed_after([first_layer.register_forward_pre_hook(grab_hidden, with_kwargs=True)]):
        for ids in batches(blocks, batch_size):
            try:
                pruned(ids.to(device), use_cache=False)
            except _Stop:
                pass
    call = {}
    if attention is not None:
        def grab_call(module, args, kwargs):
            call.update(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
            raise _Stop

        with removed_after([attention.register_forward_pre_hook(grab_call, with_kwargs=True)]):
            try:
                pruned(blocks[:1].to(device), use_cache=False)
            except _Stop:
                pass
    return hidden, call.get("position_embeddings"), call.get("attention_mask")


def _check_arguments(source: nn.Module, blocks: torch.Tensor, alpha: float, batch_size: int, select: str,
                     read_source) -> None:
    """The refit's arguments, checked before any work."""
    if not alpha > 0:
        raise ValueError(f"the refit's alpha must be > 0 (it keeps the solve well posed), got {alpha}")
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if read_source is not None and any(p.device.type != "meta" for p in source.parameters()):
        raise ValueError("with read_source, pass the source's structure on the meta device (its weights are read per pass)")
    list(batches(blocks, batch_size))  # validates the blocks


def _refit_sublayer(sub: _Sublayer, states: list[torch.Tensor], run, widen, hidden: torch.Tensor, alpha: float,
                    select: str, plan: PrunePlan, pruned: nn.Module, source: nn.Module, fill: torch.Tensor | None = None):
    """Refit one sublayer on the residual streams entering it (`states`): the source sublayer's input to its
    output projection, gathered over every block, is what the solve fits. Returns (relative error before, after, kept
    units the selection changed, the kept columns of that input per state or None when they would take more
    than KEPT_INPUTS_MAX_BYTES); `plan` and the pruned model follow a changed selection. `fill`: the hidden
    fill's B of this sublayer (`widen` then completes the input with it)."""
    if fill is not None:
        _reslice_inputs(sub, plan, pruned, source, fill)
    stats, seen, inputs = _Statistics(), {}, []
    input_bytes = sum(x[..., 0].numel() for x in states) * sub.out_source.in_features * sub.out_pruned.weight.element_size()
    keep = input_bytes <= KEPT_INPUTS_MAX_BYTES
    grab = sub.out_source.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0]))
    with removed_after([grab]):
        for x in states:
            run(sub.source, sub.kind, widen(sub.norm(x), fill))
            z = seen.pop("z")
            stats.add(z)
            if keep:
                inputs.append(z.to(sub.out_pruned.weight.dtype))
    old_units = list(sub.kept_units)
    before, after, units = _solve(sub, stats, hidden, alpha, select == "reconstruction")
    changed = 0
    if units != old_units:
        changed = len(set(old_units) - set(units))
        _set_units(plan, sub, units)
        _reslice_inputs(sub, plan, pruned, source, fill)
    if keep:
        cols = sub.columns(units).to(inputs[0].device)
        inputs = [z[..., cols] for z in inputs]
    return before, after, changed, (inputs if keep else None)


@torch.no_grad()
def refit_output_projections(pruned: nn.Module, source: nn.Module, plan: PrunePlan, blocks: torch.Tensor,
                             alpha: float = DEFAULT_ALPHA, batch_size: int = 8, select: str = "plan",
                             progress: bool = False, read_source=None, fill_hidden: bool = False) -> dict:
    """Compensate, in place, `pruned` (= prune_model(source, plan)) so that each kept sublayer reproduces the
    source sublayer's output on `blocks` (token ids, [n, seq_len]) as closely as its kept channels allow:
    its o_proj/down_proj weights are refit and, with `select="reconstruction"`, the heads and channels it
    keeps are chosen again (same counts; `plan` is updated). Returns what was done: alpha, selection,
    tokens, the sublayers' mean relative output error on `blocks` before and after, how many kept units the
    selection changed, and the time it took.

    `read_source(name)`, when given, returns the source's tensor `name` (a state-dict name) and `source` is
    the source's structure on the meta device: each sublayer's weights are read for its pass only.
    `fill_hidden`: complete each sublayer's input where the plan removed hidden channels (the module's
    docstring); it runs the dense source over `blocks`, so it needs the source in memory, not `read_source`."""
    if fill_hidden and read_source is not None:
        raise ValueError("fill_hidden runs the dense source over the calibration blocks: it needs the source in memory, "
                         "not read from the files (read_source)")
    _check_arguments(source, blocks, alpha, batch_size, select, read_source)
    streamed = read_source is not None
    names = {module: name for name, module in source.named_modules()} if streamed else {}
    hidden = torch.as_tensor(plan.hidden_channels, dtype=torch.long)
    full_width = plan.shapes.hidden_size
    subs = _sublayers(pruned, source, plan)
    parts = ModelParts(pruned)
    device = model_device(pruned)
    was_training = pruned.training, source.training
    pruned.eval()
    source.eval()
    # The source's attention runs with the pruned model's mask, which is only right for the same kernel
    # (sdpa may pass no mask at all and rely on is_causal).
    source_attention = source.config._attn_implementation
    source.config._attn_implementation = pruned.config._attn_implementation
    errors, changed, started = [], 0, time.perf_counter()

    removed = _removed_channels(hidden, full_width)

    def widen(x: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """x on the kept hidden channels -> the full width: the removed ones zero, or predicted by `fill`."""
        wide = x.new_zeros(*x.shape[:-1], full_width)
        wide[..., hidden.to(x.device)] = x
        if fill is not None:
            wide[..., removed.to(x.device)] = (x.double() @ fill.T.to(x.device)).to(x.dtype)
        return wide

    bar = tqdm(total=len(subs), desc="refit", unit="sublayer", disable=not progress, dynamic_ncols=True)
    try:
        fills = _hidden_fill_maps(source, subs, blocks, hidden, alpha, batch_size) if fill_hidden and len(removed) else {}
        states, rope, mask = _capture_inputs(pruned, parts, blocks, batch_size, device)

        def run(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
            return _attention_call(module, x, rope, mask) if kind == "attention" else module(x)

        for sub in subs:
            if streamed:
                sub.read_source(read_source, names, sub.out_pruned.weight)
            before, after, units_changed, inputs = _refit_sublayer(sub, states, run, widen, hidden, alpha, select, plan,
                                                                   pruned, source, fills.get((sub.source_layer, sub.kind)))
            changed += units_changed
            errors.append((before, after))
            if streamed:
                sub.drop_source()
            for k, x in enumerate(states):  # the residual stream through the compensated sublayer
                x.add_(sub.out_pruned(inputs[k]) if inputs is not None else run(sub.pruned, sub.kind, sub.norm(x)))
                if inputs is not None:
                    inputs[k] = None  # freed as the stream moves on
            bar.update(1)
    finally:
        bar.close()
        if streamed:
            source.to("meta")
        pruned.train(was_training[0])
        source.train(was_training[1])
        source.config._attn_implementation = source_attention
    if select == "reconstruction":
        plan.validate()
    before = sum(e[0] for e in errors) / max(len(errors), 1)
    after = sum(e[1] for e in errors) / max(len(errors), 1)
    return {"alpha": alpha, "select": select, "fill_hidden": bool(fills), "tokens": int(blocks.numel()), "sublayers": len(errors),
            "units_changed": changed, "relative_error_before": before, "relative_error_after": after,
            "time_s": time.perf_counter() - started}
