"""The differentiable top-k operator of DMS (Liu et al., ICML 2024), as pure tensor math.

One `DifferentiableTopK` governs one structure of N interchangeable elements (the MLP channels of a
layer, the KV groups of a layer, the hidden channels, the layers). It owns a learnable kept ratio `e`
and a buffer of element importances `c` (a Taylor-score EMA, never trained by gradient). Everything
else (ranks, soft and hard masks, kept counts) is derived from those two on demand.
"""

from __future__ import annotations

import torch
from torch import nn

from .method import DMSConfig


def kept_count(ratio: float | torch.Tensor, n: int, min_kept: int, multiple: int = 1) -> int:
    """The single hard rule, used by the search, the parameter count, extraction and every baseline:
    k = clamp(round(e * N), min_kept, N), rounding half to even (N = 0 keeps 0).

    With `multiple` > 1 (aligned widths), k is the nearest of the multiples of `multiple` up to N, or N
    itself (ties go to the smaller), and a structure that must keep something keeps at least one multiple.
    """
    if multiple <= 1:
        return min(n, max(min_kept, round(float(ratio) * n)))
    wanted = float(ratio) * n
    lower = min(n, int(wanted // multiple) * multiple)
    upper = min(n, lower + multiple)
    k = upper if wanted - lower > upper - wanted else lower
    return min(n, max(k, min(multiple, n) if min_kept else 0))


def normalized_ranks(importance: torch.Tensor) -> torch.Tensor:
    """r_i = (number of elements more important than i) / N, ties broken by index (lower index wins).

    An argsort costs O(N log N) time and O(N) memory (the authors' pairwise comparison is O(N^2)).
    """
    n = importance.numel()
    # Stable descending sort: equal scores keep index order, so the rank is deterministic across ranks.
    order = torch.sort(importance.detach().float(), descending=True, stable=True).indices
    ranks = torch.empty(n, dtype=torch.float32, device=importance.device)
    ranks[order] = torch.arange(n, dtype=torch.float32, device=importance.device)
    return ranks / n


class DifferentiableTopK(nn.Module):
    """Learnable kept ratio + importance buffer of one structure with `n` elements of `kind`; the
    temperature, EMA decay and minimum kept count come from `method` (default: `DMSConfig()`)."""

    def __init__(self, n: int, kind: str, method: DMSConfig | None = None):
        super().__init__()
        method = method or DMSConfig()
        if n < 1:
            raise ValueError(f"a structure needs at least one element, got n={n}")
        self.n = n
        self.kind = kind
        self.temperature = method.temperature_for(kind, n)
        self.min_kept = method.min_kept_for(kind)
        # Channel counts (MLP widths, the hidden size) come in multiples of `method.align`.
        self.multiple = method.align if kind == "channel" else 1
        self.ema_decay = method.ema_decay
        self.ratio = nn.Parameter(torch.ones(()))
        self.register_buffer("importance", torch.zeros(n))
        # Frozen structures (heads and layers in the refine phase) use their hard mask with a
        # straight-through gradient and no longer move.
        self.frozen = False

    # ----- ratio -----------------------------------------------------------------------------
    @property
    def min_ratio(self) -> float:
        return 1.0 / (2 * self.n) if self.min_kept else 0.0

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep e where the hard rule is meaningful; called before every forward."""
        self.ratio.clamp_(self.min_ratio, 1.0)

    def kept(self) -> int:
        return kept_count(self.ratio.detach(), self.n, self.min_kept, self.multiple)

    # ----- masks -----------------------------------------------------------------------------
    def ranks(self) -> torch.Tensor:
        return normalized_ranks(self.importance)

    def hard_mask(self) -> torch.Tensor:
        """1 for the top-k elements by importance, 0 elsewhere (float, no gradient)."""
        mask = torch.zeros(self.n, device=self.importance.device)
        k = self.kept()
        if k:
            order = torch.sort(self.importance.float(), descending=True, stable=True).indices
            mask[order[:k]] = 1.0
        return mask

    def soft_mask(self) -> torch.Tensor:
        """m_i = sigmoid(lambda * (e - r_i)), differentiable in e.

        Before any importance has been measured all elements tie; the mask is then all ones (keep
        everything) but stays attached to e so that gradients and optimiser state exist from step 0.
        """
        if self.frozen:
            return self.straight_through_mask()
        if not bool(torch.any(self.importance != self.importance[0])):
            return torch.ones(self.n, device=self.ratio.device) + 0.0 * self.ratio
        return torch.sigmoid(self.temperature * (self.ratio - self.ranks().to(self.ratio.device)))

    def straight_through_mask(self) -> torch.Tensor:
        """The hard mask's value with the soft mask's gradient."""
        soft = torch.sigmoid(self.temperature * (self.ratio - self.ranks().to(self.ratio.device)))
        # Grouped so the value is exactly the hard mask: (soft - soft) is exactly 0 in floating point.
        return self.hard_mask().to(soft.device) + (soft - soft.detach())

    def straight_through_count(self) -> torch.Tensor:
        """Kept count: value = hard count (what extraction produces), gradient = d(sum soft)/de."""
        soft_sum = torch.sigmoid(self.temperature * (self.ratio - self.ranks().to(self.ratio.device))).sum()
        return (soft_sum - soft_sum.detach()) + float(self.kept())

    def kept_indices(self) -> list[int]:
        return torch.nonzero(self.hard_mask(), as_tuple=False).flatten().tolist()

    # ----- importance ------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self, taylor_sq: torch.Tensor) -> bool:
        """c <- decay c + (1 - decay) (m * dL/dm)^2; skipped (returns False) when the score is not finite."""
        taylor_sq = taylor_sq.detach().to(self.importance)
        if not torch.isfinite(taylor_sq).all():
            return False
        self.importance.mul_(self.ema_decay).add_(taylor_sq, alpha=1.0 - self.ema_decay)
        return True

    def extra_repr(self) -> str:
        return f"n={self.n}, kind={self.kind}, kept={self.kept()}, ratio={float(self.ratio.detach()):.4f}"
