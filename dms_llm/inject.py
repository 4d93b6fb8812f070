"""Hooks that apply `ModelMasks` to a Llama-family model without touching its modeling code.

Where each mask multiplies (DMS section 2):

| structure | hook                                                           |
|-----------|----------------------------------------------------------------|
| heads     | pre-hook on o_proj: its input columns, one block per KV group  |
| channels  | pre-hook on down_proj: its input                               |
| hidden    | embedding output and every attention/MLP sublayer output; each RMSNorm's input is scaled by sqrt(D / sum m) and its output scaled back, so its statistic runs over kept channels only |
| depth     | the attention / MLP sublayer output (residual branch)          |

A sublayer's depth gate and the hidden mask are multiplied once, into one factor per sublayer.

`MaskHooks` owns every handle: it lists its targets, raises before installing anything when a target
does not resolve, and `remove()` leaves the model exactly as it was (the hooks never change weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ModelParts
from .masks import ModelMasks


class HookTargetError(LookupError):
    pass


@dataclass(frozen=True)
class HookTarget:
    module_name: str
    kind: str  # "pre" or "post"
    mask_key: str  # the key of `ModelMasks.current` it reads


def _scale(x: torch.Tensor, mask) -> torch.Tensor:
    return x * mask.to(x.dtype)


class MaskHooks:
    """Install with `MaskHooks(model, masks).install()` or `with MaskHooks(model, masks): ...`."""

    def __init__(self, model: nn.Module, masks: ModelMasks, refresh_on_forward: bool = True):
        self.model = model
        self.masks = masks
        self.refresh_on_forward = refresh_on_forward
        self.parts = ModelParts(model)
        if self.parts.shapes != masks.shapes:
            raise ValueError("these masks were built for a model of different shape")
        self.handles: list = []
        self.targets: list[HookTarget] = self._plan_targets()

    # ----- which modules get which hook -------------------------------------------------------
    def _plan_targets(self) -> list[HookTarget]:
        masks, names = self.masks, self._module_names()
        targets = []
        hidden = masks.hidden is not None

        def add(module, kind, key, what):
            if module is None:
                raise HookTargetError(f"cannot apply the {what} mask: module not found in {type(self.model).__name__}")
            targets.append(HookTarget(names[id(module)], kind, key))

        if hidden:
            add(self.parts.embed, "post", "hidden", "hidden")
            for norm in self.parts.norms():
                add(norm, "norm", "norm_scale", "hidden")
        for layer in range(self.parts.shapes.num_layers):
            has_gate = bool(masks.depth_gates)
            if str(layer) in masks.heads:
                add(self.parts.attn_proj(layer, "o"), "pre", f"heads.{layer}", f"heads of layer {layer}")
            if str(layer) in masks.channels:
                add(self.parts.mlp_proj(layer, "down"), "pre", f"channels.{layer}", f"channels of layer {layer}")
            attn_needed = hidden or has_gate or str(layer) in masks.heads
            if attn_needed and self.parts.shapes.num_kv_heads[layer]:
                add(self.parts.attn(layer), "attn_post", f"attn_out.{layer}", f"attention of layer {layer}")
            if (hidden or has_gate) and self.parts.shapes.intermediate[layer]:
                add(self.parts.mlp(layer), "post", f"mlp_out.{layer}", f"MLP of layer {layer}")
        return targets

    def _module_names(self) -> dict[int, str]:
        return {id(m): name for name, m in self.model.named_modules()}

    # ----- hook functions ----------------------------------------------------------------------
    def _mask(self, key):
        return self.masks.current.get(key) if self.masks.enabled else None

    def _masked(self, key, x, mask):
        masked = _scale(x, mask)
        self.masks.watch(key, masked)
        return masked

    def _make_hook(self, target: HookTarget):
        key = target.mask_key
        if target.kind == "pre":

            def pre(module, args):
                mask = self._mask(key)
                return None if mask is None else (self._masked(key, args[0], mask), *args[1:])

            return [("pre", pre)]
        if target.kind == "post":

            def post(module, args, output):
                mask = self._mask(key)
                return None if mask is None else self._masked(key, output, mask)

            return [("post", post)]
        if target.kind == "attn_post":

            def attn_post(module, args, output):
                mask = self._mask(key)
                if mask is None:
                    return None
                if isinstance(output, tuple):
                    return (self._masked(key, output[0], mask), *output[1:])
                return self._masked(key, output, mask)

            return [("post", attn_post)]
        if target.kind == "norm":

            def norm_pre(module, args):
                scale = self._mask(key)
                return None if scale is None else (_scale(args[0], scale), *args[1:])

            def norm_post(module, args, output):
                scale = self._mask(key)
                return None if scale is None else output / scale.to(output.dtype)

            return [("pre", norm_pre), ("post", norm_post)]
        raise ValueError(target.kind)

    def _refresh(self, module, args, kwargs):
        if self.masks.enabled:
            self.masks.clamp_()
            self.masks.refresh()

    # ----- lifecycle ---------------------------------------------------------------------------
    def install(self) -> "MaskHooks":
        if self.handles:
            raise RuntimeError("hooks are already installed")
        modules = dict(self.model.named_modules())
        try:
            if self.refresh_on_forward:
                self.handles.append(self.model.register_forward_pre_hook(self._refresh, with_kwargs=True))
            for target in self.targets:
                module = modules[target.module_name]
                for kind, fn in self._make_hook(target):
                    register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                    self.handles.append(register(fn))
        except Exception:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.masks.current = {}
        self.masks.discard_importance()

    @property
    def installed(self) -> bool:
        return bool(self.handles)

    def __enter__(self) -> "MaskHooks":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def describe(self) -> list[str]:
        return [f"{t.kind:9s} {t.module_name} <- {t.mask_key}" for t in self.targets]
