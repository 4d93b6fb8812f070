"""Least-squares refit of a pruned model's output projections (o_proj, down_proj) on calibration text.

Pruning heads or MLP channels drops their share of a sublayer's output. With the source model at hand,
much of that share can be rebuilt from the channels that stay: every kept sublayer of the source is run on
the pruned model's own input (the hidden channels the plan removed are zero there), and the pruned output
projection becomes the ridge least-squares map from the kept channels to the source sublayer's output on
the kept hidden channels:

    W' = W[H, :] C[:, K] (C[K, K] + alpha * mean(diag C[K, K]) I)^-1,    C = sum over tokens of z z^T,

z being the source sublayer's input to its output projection (every head or channel), K the kept ones and
H the kept hidden channels. When no head or channel was pruned, W' = W[H, K] (up to the ridge term).
Shapes do not change: a refit model saves, reloads and exports like any pruned one (its weights are no
longer a slice of the source's, which the plan's metadata records). Sublayers the plan removes entirely
are not rebuilt.

Layers are refit in groups, front to back, one calibration pass per group, so each group sees the input
that the refit layers before it produce, and the statistics held at once stay under `max_stat_bytes`.
When the source does not fit in memory beside the pruned model (--prune-from-files), the source is its
structure on the meta device and each group's source sublayers are read from the files before its pass
and dropped after it; the bound then covers those weights too.
"""

from __future__ import annotations

import inspect
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ModelParts
from .passes import batches, model_device, removed_after
from .plan import PrunePlan
from .prune import head_rows

# alpha of the ridge term, chosen on WikiText-2 and PTB validation perplexity (docs/RESULTS.md section 11).
DEFAULT_ALPHA = 1e-4


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The named arguments of a forward call, however the caller passed them."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments


class _Sublayer:
    """One kept sublayer: the pruned module whose input is observed, the source module that is run on that
    input, and the running sum of z z^T over the source's output-projection input z."""

    def __init__(self, kind: str, pruned: nn.Module, source: nn.Module, out_pruned: nn.Linear, out_source: nn.Linear,
                 kept: torch.Tensor):
        self.kind, self.pruned, self.source, self.out_pruned, self.out_source, self.kept = (
            kind, pruned, source, out_pruned, out_source, kept)
        self.cov: torch.Tensor | None = None

    def add(self, z: torch.Tensor) -> None:
        z = z.reshape(-1, z.shape[-1]).double()
        self.cov = z.T @ z if self.cov is None else self.cov.add_(z.T @ z)

    def stat_bytes(self, streamed: bool) -> int:
        """Memory the sublayer holds during its pass: z z^T, and the source weights when they are read in."""
        n = self.out_source.in_features
        weights = sum(p.numel() * p.element_size() for p in self.source.parameters()) if streamed else 0
        return n * n * 8 + weights

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
    kept_layers = [i for i, lp in enumerate(plan.layers) if not lp.removed]
    if len(kept_layers) != len(parts.layers) or len(src.layers) != len(plan.layers):
        raise ValueError(f"the plan keeps {len(kept_layers)} of {len(plan.layers)} layers, but the pruned model has "
                         f"{len(parts.layers)} and the source {len(src.layers)}: pass the model the plan pruned and its source")
    out = []
    for j, i in enumerate(kept_layers):
        lp = plan.layers[i]
        if lp.has_attention:
            kept = head_rows(lp.attention_groups, shapes.n_rep(i), shapes.head_dim)
            out.append(_Sublayer("attention", parts.attn(j), src.attn(i), parts.attn_proj(j, "o"), src.attn_proj(i, "o"), kept))
        if lp.has_mlp:
            kept = torch.as_tensor(lp.mlp_channels, dtype=torch.long)
            out.append(_Sublayer("mlp", parts.mlp(j), src.mlp(i), parts.mlp_proj(j, "down"), src.mlp_proj(i, "down"), kept))
    return out


def _observe(sub: _Sublayer, hidden: torch.Tensor, full_width: int):
    """A pre-hook on the pruned sublayer: run the source sublayer on the same input, widened to the source's
    hidden size with zeros, and add its output projection's input to the statistics."""

    def widen(x: torch.Tensor) -> torch.Tensor:
        wide = x.new_zeros(*x.shape[:-1], full_width)
        wide[..., hidden.to(x.device)] = x
        return wide

    def hook(module, args, kwargs):
        seen = {}
        grab = sub.out_source.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0]))
        try:
            if sub.kind == "attention":
                call = _call_arguments(module, args, kwargs)
                sub.source(hidden_states=widen(call["hidden_states"]), position_embeddings=call["position_embeddings"],
                           attention_mask=call.get("attention_mask"))
            else:
                sub.source(widen(args[0]))
        finally:
            grab.remove()
        sub.add(seen["z"])

    return hook


def _solve(sub: _Sublayer, hidden: torch.Tensor, alpha: float) -> tuple[float, float]:
    """Replace the pruned output projection's weight; returns the relative squared error of the sublayer's
    output on the calibration tokens before and after."""
    cov = sub.cov
    w = sub.out_source.weight.detach().double()[hidden.to(sub.out_source.weight.device)].to(cov.device)
    k = sub.kept.to(cov.device)
    cov_kk = cov[k][:, k]
    cross = w @ cov[:, k]
    ridge = alpha * cov_kk.diagonal().mean() + torch.finfo(torch.float64).tiny
    new = torch.linalg.solve(cov_kk + ridge * torch.eye(len(k), dtype=cov.dtype, device=cov.device), cross.T).T

    total = (w @ cov * w).sum()

    def error(wk: torch.Tensor) -> float:  # E|W z - Wk z_K|^2 / E|W z|^2 from the second moments
        return float(((total - 2 * (wk * cross).sum() + (wk @ cov_kk * wk).sum()) / total).clamp_min(0))

    before = error(sub.out_pruned.weight.detach().double().to(cov.device))
    sub.out_pruned.weight.data.copy_(new.to(sub.out_pruned.weight.dtype))
    return before, error(new)


@torch.no_grad()
def refit_output_projections(pruned: nn.Module, source: nn.Module, plan: PrunePlan, blocks: torch.Tensor,
                             alpha: float = DEFAULT_ALPHA, batch_size: int = 8, max_stat_bytes: int = 4 << 30,
                             progress: bool = False, read_source=None) -> dict:
    """Refit, in place, the o_proj/down_proj weights of `pruned` (= prune_model(source, plan)) so that each kept
    sublayer reproduces the source sublayer's output on `blocks` (token ids, [n, seq_len]) as closely as its
    kept channels allow. Returns what was done: alpha, tokens, passes, the sublayers' mean relative output error
    on `blocks` before and after, and the time it took.

    `read_source(name)`, when given, returns the source's tensor `name` (a state-dict name) and `source` is
    the source's structure on the meta device: each pass reads only its own sublayers' weights."""
    if not alpha > 0:
        raise ValueError(f"the refit's alpha must be > 0 (it keeps the solve well posed), got {alpha}")
    streamed = read_source is not None
    if streamed and any(p.device.type != "meta" for p in source.parameters()):
        raise ValueError("with read_source, pass the source's structure on the meta device (its weights are read per pass)")
    names = {module: name for name, module in source.named_modules()} if streamed else {}
    hidden = torch.as_tensor(plan.hidden_channels, dtype=torch.long)
    full_width = plan.shapes.hidden_size
    subs = _sublayers(pruned, source, plan)
    groups, group, size = [], [], 0
    for sub in subs:  # front to back, each group's memory within max_stat_bytes
        if group and size + sub.stat_bytes(streamed) > max_stat_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(sub)
        size += sub.stat_bytes(streamed)
    if group:
        groups.append(group)
    device = model_device(pruned)
    was_training = pruned.training, source.training
    pruned.eval()
    source.eval()
    errors, started = [], time.perf_counter()
    per_pass = -(-len(blocks) // batch_size)
    bar = tqdm(total=len(groups) * per_pass, desc="refit", unit="batch", disable=not progress, dynamic_ncols=True)
    try:
        for group in groups:
            if streamed:
                for s in group:
                    s.read_source(read_source, names, s.out_pruned.weight)
            hooks = [s.pruned.register_forward_pre_hook(_observe(s, hidden, full_width), with_kwargs=True) for s in group]
            with removed_after(hooks):
                for ids in batches(blocks, batch_size):
                    pruned(ids.to(device), use_cache=False)
                    bar.update(1)
            for s in group:
                errors.append(_solve(s, hidden, alpha))
                s.cov = None
                if streamed:
                    s.drop_source()
    finally:
        bar.close()
        if streamed:
            source.to("meta")
        pruned.train(was_training[0])
        source.train(was_training[1])
    before = sum(e[0] for e in errors) / max(len(errors), 1)
    after = sum(e[1] for e in errors) / max(len(errors), 1)
    return {"alpha": alpha, "tokens": int(blocks.numel()), "sublayers": len(errors), "passes": len(groups),
            "relative_error_before": before, "relative_error_after": after, "time_s": time.perf_counter() - started}
