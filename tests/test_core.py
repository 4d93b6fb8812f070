"""The DMS operator, the hooks and the parameter count, on tiny real models of every family."""

import copy
import math

import pytest
import torch
from conftest import FAMILIES, input_ids, tiny_model

from dms_llm import (
    DifferentiableTopK,
    DMSConfig,
    HookTargetError,
    MaskHooks,
    ModelMasks,
    ParameterCounter,
    UnsupportedArchitectureError,
    budget_loss,
    kept_count,
    normalized_ranks,
)

# ----- operator ---------------------------------------------------------------------------------

# The paper's operator, every count allowed (the default aligns channel counts to multiples of 32, which
# the small structures below do not have; alignment has its own tests).
EXACT = DMSConfig(align=1)


@pytest.mark.parametrize("n,ratio,kind,expected", [
    (10, 1.0, "channel", 10), (10, 0.55, "channel", 6), (10, 0.04, "channel", 1),
    (4, 0.0, "head", 0), (4, 0.3, "head", 1), (7, 0.5, "layer", 4), (7, 0.49, "layer", 3),
])
def test_kept_count_rule(n, ratio, kind, expected):
    topk = DifferentiableTopK(n, kind, EXACT)
    topk.ratio.data.fill_(ratio)
    assert kept_count(ratio, n, topk.min_kept) == expected  # the module and the free function share one rule
    assert topk.kept() == expected
    assert int(topk.hard_mask().sum()) == expected
    assert len(topk.kept_indices()) == expected


def test_hard_mask_keeps_most_important_and_soft_is_monotone():
    topk = DifferentiableTopK(8, "channel", EXACT)
    topk.importance.copy_(torch.tensor([0.1, 5.0, 0.3, 2.0, 0.0, 9.0, 1.0, 0.2]))
    topk.ratio.data.fill_(0.375)
    assert topk.kept_indices() == [1, 3, 5]
    soft = topk.soft_mask().detach()
    order = torch.argsort(topk.importance, descending=True)
    assert torch.all(soft[order][:-1] >= soft[order][1:])


def test_ranks_are_evenly_spaced_and_break_ties_by_index():
    r = normalized_ranks(torch.tensor([1.0, 3.0, 3.0, 0.5]))
    assert r.tolist() == [0.5, 0.0, 0.25, 0.75]


@pytest.mark.parametrize("n,kind", [(64, "channel"), (1536, "channel"), (8, "head"), (30, "layer")])
def test_soft_count_gradient_is_about_n(n, kind):
    topk = DifferentiableTopK(n, kind)
    topk.importance.copy_(torch.rand(n, generator=torch.Generator().manual_seed(0)))
    topk.ratio.data.fill_(0.5)
    topk.soft_mask().sum().backward()
    # Steep sigmoids (heads/layers, lambda = 4N) sample the derivative coarsely: ~1.14 N when e
    # sits exactly on a rank.
    assert topk.ratio.grad.item() == pytest.approx(n, rel=0.1 if kind == "channel" else 0.2)


def test_cold_start_mask_is_all_ones_and_differentiable():
    topk = DifferentiableTopK(16, "channel")
    mask = topk.soft_mask()
    assert torch.equal(mask.detach(), torch.ones(16))
    mask.sum().backward()
    assert topk.ratio.grad is not None


def test_clamping():
    ch, head = DifferentiableTopK(10, "channel", EXACT), DifferentiableTopK(4, "head", EXACT)
    ch.ratio.data.fill_(-3.0)
    head.ratio.data.fill_(-3.0)
    ch.clamp_()
    head.clamp_()
    assert ch.ratio.item() == pytest.approx(0.05) and ch.kept() == 1
    assert head.ratio.item() == 0.0 and head.kept() == 0
    ch.ratio.data.fill_(7.0)
    ch.clamp_()
    assert ch.ratio.item() == 1.0


def test_importance_ema_and_nonfinite_skip():
    topk = DifferentiableTopK(3, "channel")
    assert topk.update_importance(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(topk.importance, torch.tensor([0.01, 0.02, 0.03]))
    assert not topk.update_importance(torch.tensor([1.0, float("nan"), 3.0]))
    assert torch.allclose(topk.importance, torch.tensor([0.01, 0.02, 0.03]))


def test_rank_memory_is_linear_for_llama_7b_mlp():
    n = 11008
    topk = DifferentiableTopK(n, "channel")
    topk.importance.copy_(torch.rand(n))
    topk.ratio.data.fill_(0.7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        topk.soft_mask().sum().backward()
        topk.hard_mask()
    peak_alloc = max(e.cpu_memory_usage for e in prof.events())
    assert peak_alloc < 64 * n  # an N x N float matrix would be 484 MB


# ----- hooks ------------------------------------------------------------------------------------


def _structure_masks(model, structures, depth="sublayer", method=None):
    masks = ModelMasks(model.config, structures=structures, depth=depth, method=method)
    g = torch.Generator().manual_seed(3)
    for _, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        topk.ratio.data.fill_(0.5 if topk.kind != "layer" else 0.67)
    return masks


def _snapshot_hooks(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_identity_masks_reproduce_logits_exactly_and_removal_restores(family):
    model = tiny_model(family)
    x = input_ids()
    before_hooks, before_state = _snapshot_hooks(model), copy.deepcopy(model.state_dict())
    reference = model(x).logits
    masks = ModelMasks(model.config)
    with MaskHooks(model, masks) as hooks:
        assert hooks.installed and len(hooks.describe()) == len(hooks.targets)
        assert torch.equal(model(x).logits, reference)
        with masks.hard():  # ratio 1 -> everything kept
            assert torch.equal(model(x).logits, reference)
    assert _snapshot_hooks(model) == before_hooks
    after_state = model.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert torch.equal(model(x).logits, reference)


def _zero_by_hand(model, masks):
    """The reference: a copy of the model whose removed structures are cut out by editing weights."""
    ref = copy.deepcopy(model)
    layers = ref.model.layers
    cfg = model.config
    head_dim = cfg.head_dim
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for name, topk in masks.named_structures():
            keep = topk.hard_mask().bool()
            if name.startswith("heads."):
                o = layers[int(name.split(".")[1])].self_attn.o_proj
                cols = (~keep).repeat_interleave(n_rep * head_dim)
                o.weight[:, cols] = 0
                if keep.sum() == 0 and o.bias is not None:
                    o.bias.zero_()
            elif name.startswith("channels."):
                layers[int(name.split(".")[1])].mlp.down_proj.weight[:, ~keep] = 0
            elif name in ("attn_layers", "mlp_layers", "layers"):
                for i in torch.nonzero(~keep).flatten().tolist():
                    outs = []
                    if name != "mlp_layers":
                        outs.append(layers[i].self_attn.o_proj)
                    if name != "attn_layers":
                        outs.append(layers[i].mlp.down_proj)
                    for lin in outs:
                        lin.weight.zero_()
                        if lin.bias is not None:
                            lin.bias.zero_()
            elif name == "hidden":
                ref.model.embed_tokens.weight[:, ~keep] = 0
                for layer in layers:
                    for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                        lin.weight[~keep, :] = 0
                        if lin.bias is not None:
                            lin.bias[~keep] = 0
                # mean(x^2) over D channels with zeros = (k / D) * mean over the k kept channels:
                # rescaling the norm weight and eps by weights alone gives the kept-only statistic.
                k, d = int(keep.sum()), keep.numel()
                norms = [ref.model.norm] + [n for l in layers for n in (l.input_layernorm, l.post_attention_layernorm)]
                for norm in norms:
                    norm.weight.mul_(math.sqrt(k / d))
                    norm.variance_epsilon = norm.variance_epsilon * k / d
    return ref


@pytest.mark.parametrize("structures", ["heads", "channels", "hidden", "layers", "heads,channels,hidden,layers"])
@pytest.mark.parametrize("depth", ["sublayer", "block"])
def test_hard_mask_equals_zeroing_weights_by_hand(family, structures, depth):
    if depth == "block" and "layers" not in structures:
        pytest.skip("depth mode only matters when layers are searched")
    model = tiny_model(family)
    x = input_ids()
    masks = _structure_masks(model, structures, depth)
    reference = _zero_by_hand(model, masks)(x).logits
    with MaskHooks(model, masks), masks.hard():
        hooked = model(x).logits
    assert (hooked - reference).abs().max().item() < 1e-5
    assert (hooked - model(x).logits).abs().max().item() > 1e-3  # something really was removed


@pytest.mark.parametrize("depth", ["sublayer", "block"])
def test_spared_layers_stay_whole_and_the_rest_matches_physical_pruning(family, depth):
    """Spared layers get no structure; the plan, the count and the hooked logits all agree on the rest."""
    from dms_llm.plan import count_plan_parameters
    from dms_llm.prune import prune_model

    model = tiny_model(family, num_hidden_layers=5)
    masks = ModelMasks(model.config, depth=depth, spared_layers=[0, 4])
    assert not {"heads.0", "channels.0", "heads.4", "channels.4"} & {n for n, _ in masks.named_structures()}
    assert all(topk.n == 3 for topk in masks.depth_gates.values())
    g = torch.Generator().manual_seed(4)
    for _, topk in masks.named_structures():  # cut hard everywhere that may be cut
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        topk.ratio.data.fill_(0.34 if topk.kind == "layer" else 0.3)
    plan = masks.to_plan(model.config)
    cfg = model.config
    for layer in (0, 4):
        assert plan.layers[layer].attention_groups == list(range(cfg.num_key_value_heads))
        assert plan.layers[layer].mlp_channels == list(range(cfg.intermediate_size))
    assert sum(not lp.attention_groups for lp in plan.layers[1:4]) >= 1  # a searched sublayer was dropped
    pruned = prune_model(model, plan)
    counted = ParameterCounter(model).masked(masks)
    assert float(counted.detach()) == count_plan_parameters(plan) == sum(p.numel() for p in pruned.parameters())
    counted.backward()
    assert all(topk.ratio.grad is not None for topk in masks.depth_gates.values())
    x = input_ids()
    with MaskHooks(model, masks), masks.hard():
        hooked = model(x).logits
    assert (hooked - pruned(x).logits).abs().max().item() < 1e-5


def test_layer_with_no_heads_drops_its_output_bias():
    model = tiny_model("llama-mha", attention_bias=True)
    masks = _structure_masks(model, "heads")
    masks.heads["1"].ratio.data.fill_(0.0)
    reference = _zero_by_hand(model, masks)(input_ids()).logits
    with MaskHooks(model, masks), masks.hard():
        assert (model(input_ids()).logits - reference).abs().max().item() < 1e-5


def test_masks_disabled_gives_unmasked_model():
    model = tiny_model("qwen2")
    x = input_ids()
    reference = model(x).logits
    masks = _structure_masks(model, "heads,channels,hidden,layers")
    with MaskHooks(model, masks), masks.hard():
        assert not torch.allclose(model(x).logits, reference)
        with masks.disabled():
            assert torch.equal(model(x).logits, reference)


def test_unsupported_architecture_and_missing_target_are_clear_errors():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        MaskHooks(gpt2, ModelMasks(tiny_model().config))
    model = tiny_model("llama-gqa")
    del model.model.layers[1].mlp.down_proj
    with pytest.raises(HookTargetError, match="channels of layer 1"):
        MaskHooks(model, ModelMasks(model.config, structures="channels"))
    with pytest.raises(ValueError, match="unknown structure"):
        ModelMasks(model.config, structures="heads,widths")


# ----- gradients and importance ----------------------------------------------------------------


def test_backward_populates_importance_and_reaches_every_ratio(family):
    model = tiny_model(family)
    model.requires_grad_(False)
    x = input_ids()
    masks = ModelMasks(model.config)
    counter = ParameterCounter(model)
    with MaskHooks(model, masks):
        model(x, labels=x).loss.backward()
        assert masks.update_importance() == len(list(masks.named_structures()))
        for name, topk in masks.named_structures():
            assert torch.all(topk.importance >= 0) and topk.importance.sum() > 0, name
            topk.ratio.data.fill_(0.8 if topk.kind == "channel" else 0.9)
        for depth_gate in masks.depth_gates.values():
            depth_gate.ratio.data.fill_(1.0)  # keep every sublayer so every width has a budget cost
        masks.zero_grad()
        model(x, labels=x).loss.backward()
        task = {n: t.ratio.grad.clone() for n, t in masks.named_structures()}
        masks.zero_grad()
        budget_loss(counter.masked(masks) / counter.dense(), 0.3, 1.0).backward()
        budget = {n: t.ratio.grad.clone() for n, t in masks.named_structures()}
    for name in task:
        assert torch.isfinite(task[name]) and torch.isfinite(budget[name]), name
        assert budget[name] > 0, name  # shrinking any structure lowers the count
    assert sum(float(g.abs()) > 0 for g in task.values()) >= len(task) - 1


def test_two_sided_budget_loss_also_penalises_an_architecture_under_the_budget():
    over, under = torch.tensor(0.9), torch.tensor(0.6, requires_grad=True)
    assert float(budget_loss(under.detach(), 0.8, 2.0)) == 0.0
    assert float(budget_loss(over, 0.8, 2.0)) == pytest.approx(2.0 * math.log(0.9 / 0.8))
    assert float(budget_loss(over, 0.8, 2.0, two_sided=True)) == pytest.approx(2.0 * math.log(0.9 / 0.8))
    loss = budget_loss(under, 0.8, 2.0, two_sided=True)
    assert float(loss.detach()) == pytest.approx(2.0 * math.log(0.8 / 0.6))
    loss.backward()
    assert float(under.grad) < 0  # descending the loss grows the architecture back to the budget


def test_importance_update_is_skipped_when_not_finite():
    model = tiny_model("llama-gqa")
    masks = ModelMasks(model.config, structures="channels")
    with MaskHooks(model, masks):
        (model(input_ids()).logits.sum() * float("inf")).backward()
        assert masks.update_importance() == 0
    assert all(float(t.importance.abs().sum()) == 0 for _, t in masks.named_structures())


# ----- parameter count --------------------------------------------------------------------------


def _hand_count(model, masks):
    """Independent count: walk the modules and count the surviving slices of each tensor."""
    cfg = model.config
    kept = {name: topk.hard_mask().bool() for name, topk in masks.named_structures()}
    d = int(kept["hidden"].sum()) if "hidden" in kept else cfg.hidden_size
    total = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        attn_on = bool(kept.get("layers", kept.get("attn_layers", torch.ones(99, dtype=torch.bool)))[i])
        mlp_on = bool(kept.get("layers", kept.get("mlp_layers", torch.ones(99, dtype=torch.bool)))[i])
        groups = int(kept[f"heads.{i}"].sum()) if f"heads.{i}" in kept else cfg.num_key_value_heads
        chans = int(kept[f"channels.{i}"].sum()) if f"channels.{i}" in kept else cfg.intermediate_size
        if attn_on and groups:
            a = layer.self_attn
            for proj, out_per_group in ((a.q_proj, n_rep), (a.k_proj, 1), (a.v_proj, 1)):
                rows = groups * out_per_group * cfg.head_dim
                total += rows * d + (rows if proj.bias is not None else 0)
            total += groups * n_rep * cfg.head_dim * d + (d if a.o_proj.bias is not None else 0) + d
        if mlp_on and chans:
            total += 3 * chans * d + d
    return total


def test_dense_count_equals_numel(family):
    model = tiny_model(family)
    assert ParameterCounter(model).dense() == sum(p.numel() for p in model.parameters())
    masks = ModelMasks(model.config)
    assert ParameterCounter(model).hard(masks) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("structures", ["heads", "channels,hidden", "layers", "heads,channels,hidden,layers"])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_count_matches_hand_count(family, structures, seed):
    model = tiny_model(family)
    masks = ModelMasks(model.config, structures=structures)
    g = torch.Generator().manual_seed(seed)
    for _, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        topk.ratio.data.fill_(float(torch.rand((), generator=g)) * 0.9 + 0.1)
    counted = ParameterCounter(model).masked(masks)
    assert float(counted.detach()) == _hand_count(model, masks)
    assert float(counted.detach()) == int(float(counted.detach()))  # the straight-through value is exact


def test_untied_count_includes_lm_head():
    tied, untied = tiny_model("llama-gqa"), tiny_model("llama-gqa", tie_word_embeddings=False)
    diff = ParameterCounter(untied).dense() - ParameterCounter(tied).dense()
    assert diff == tied.config.vocab_size * tied.config.hidden_size


def test_family_table_is_complete():
    assert set(FAMILIES) == {"llama-mha", "llama-gqa", "mistral", "qwen2"}


# ----- the end-of-search fit --------------------------------------------------------------------


def _ratios(masks):
    return {name: float(t.ratio) for name, t in masks.named_structures()}


@pytest.mark.parametrize("slack_channels", [1, 7, 1000])
def test_fit_fills_a_budget_the_search_left_unused_with_mlp_channels_only(slack_channels):
    from dms_llm.budget import fit_to_budget

    model = tiny_model("llama-gqa")
    masks = _structure_masks(model, "heads,channels,hidden,layers", method=EXACT)
    counter = ParameterCounter(model)
    before, start = counter.hard(masks), _ratios(masks)
    channel_cost = 3 * masks.hidden.kept()  # gate + up rows and a down column, at the kept hidden width
    target = before + slack_channels * channel_cost
    fit = fit_to_budget(masks, counter, target)
    after = _ratios(masks)

    assert fit["params_before"] == before and fit["params"] == counter.hard(masks) <= target
    # the widths scale together, so every layer gains its next channel at the same factor here
    grew = slack_channels >= len(masks.channels)
    assert fit["params"] > before if grew else fit["params"] == before
    assert fit["rescaled"] == ("mlp channels up" if grew else "none")
    # only the MLP widths grew; heads, hidden width and depth are what the search chose
    assert all(after[n] == start[n] for n in start if not n.startswith("channels."))
    assert all(after[n] >= start[n] for n in start if n.startswith("channels."))
    whole = all(t.kept() == t.n for n, t in masks.named_structures() if n.startswith("channels."))
    # what is left over is less than one more channel in each layer (or every MLP is already whole)
    assert whole or target - fit["params"] < len(masks.channels) * channel_cost


def test_fit_scales_down_to_the_target_and_leaves_an_exact_fit_alone():
    from dms_llm.budget import fit_to_budget

    model = tiny_model("llama-gqa")
    masks = _structure_masks(model, "heads,channels,hidden,layers", method=EXACT)
    counter = ParameterCounter(model)
    before = counter.hard(masks)
    fit = fit_to_budget(masks, counter, before - 500)
    assert fit["params"] <= before - 500 < fit["params_before"] == before and fit["rescaled"] == "mlp channels"
    exact = fit_to_budget(masks, counter, fit["params"])
    assert exact["rescaled"] == "none" and exact["params"] == fit["params"]


# ----- aligned widths -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,multiple", [(576, 32), (576, 128), (1536, 64), (40, 32), (48, 8)])
def test_aligned_counts_are_multiples_or_whole_and_monotone(n, multiple):
    counts = [kept_count(e / 200, n, 1, multiple) for e in range(201)]
    assert all(k % multiple == 0 or k == n for k in counts)
    assert counts == sorted(counts) and counts[-1] == n and counts[0] == min(multiple, n)
    # the nearest allowed count to e * N (ties to the smaller)
    allowed = sorted({*range(multiple, n + 1, multiple), n})
    for e in range(201):
        wanted = e / 200 * n
        best = min(allowed, key=lambda k: (abs(k - wanted), k))
        assert counts[e] == max(best, min(multiple, n)), (e, counts[e], best)
    assert kept_count(0.0, n, 0, multiple) == 0  # a structure that may vanish still can


def test_alignment_applies_to_channel_counts_only():
    method = DMSConfig(align=8)
    ch, head, layer = (DifferentiableTopK(n, kind, method) for n, kind in ((40, "channel"), (6, "head"), (7, "layer")))
    for topk in (ch, head, layer):
        topk.importance.copy_(torch.rand(topk.n, generator=torch.Generator().manual_seed(1)))
        topk.ratio.data.fill_(0.45)
    assert (ch.kept(), head.kept(), layer.kept()) == (16, 3, 3)
    assert int(ch.hard_mask().sum()) == 16 and float(ch.straight_through_count().detach()) == 16.0
    # the kept channels are still the most important ones
    assert ch.kept_indices() == sorted(torch.argsort(ch.importance, descending=True)[:16].tolist())


def test_aligned_masks_prune_to_aligned_widths_and_fit_the_budget():
    from dms_llm.budget import fit_to_budget

    model = tiny_model("llama-gqa")
    masks = _structure_masks(model, "heads,channels,hidden,layers", method=DMSConfig(align=8))
    counter = ParameterCounter(model)
    target = counter.hard(masks) - 3000
    fit = fit_to_budget(masks, counter, target)
    assert fit["params"] == counter.hard(masks) <= target
    plan = masks.to_plan(model.config)
    widths = [len(lp.mlp_channels) for lp in plan.layers] + [len(plan.hidden_channels)]
    assert all(w % 8 == 0 or w in (40, 48) for w in widths), widths
    assert plan.params_after == fit["params"]


def test_fit_with_coarse_aligned_widths_lands_near_the_target():
    """Aligned widths move in steps: the scale-down takes the MLP widths first and then gives back to
    them whatever a coarse step left unused, so the result sits within one MLP step of the target
    (layers whose kept ratios differ cross their steps one at a time)."""
    from dms_llm.budget import fit_to_budget

    model = tiny_model("llama-gqa", intermediate_size=64, num_hidden_layers=4)
    masks = _structure_masks(model, "heads,channels,hidden,layers", method=DMSConfig(align=8))
    for _, topk in masks.named_structures():
        topk.ratio.data.fill_(1.0)
    for topk, ratio in zip(masks.channels.values(), (0.97, 0.83, 0.9, 0.76)):  # widths a search left apart
        topk.ratio.data.fill_(ratio)
    counter = ParameterCounter(model)
    target = int(0.85 * counter.hard(masks))
    fit = fit_to_budget(masks, counter, target)
    assert fit["params"] == counter.hard(masks) <= target
    assert fit["rescaled"].startswith("mlp channels")
    one_mlp_step = 3 * 8 * masks.hidden.kept()  # 8 more channels in one layer
    whole = all(t.kept() == t.n for t in masks.channels.values())
    assert whole or target - fit["params"] < one_mlp_step, (target - fit["params"], one_mlp_step)
    assert masks.hidden.kept() == masks.hidden.n  # the coarse hidden width was not touched


# ----- per-token importance ---------------------------------------------------------------------


def _probe_contributions(model, masks, batches):
    """Reference for `importance="token"`, by another route: a ones tensor P multiplies every masked
    activation after its mask hook, so dL/dP is each token's y * dL/dy there (autograd of a multiplier,
    not a tensor hook). Returns each structure's sum over tokens of the squared per-element contribution
    (a hidden channel's contributions summed over its sites first), and its plain sum over tokens."""
    from dms_llm.arch import ModelParts

    parts, s = ModelParts(model), masks.shapes
    squares, sums = {}, {}
    for ids in batches:
        probes, handles = {}, []

        def multiply(name, x):
            p = torch.ones_like(x, requires_grad=True)
            probes.setdefault(name, []).append(p)
            return x * p

        for layer in range(s.num_layers):
            handles.append(parts.attn_proj(layer, "o").register_forward_pre_hook(
                lambda m, a, k=f"heads.{layer}": (multiply(k, a[0]),)))
            handles.append(parts.mlp_proj(layer, "down").register_forward_pre_hook(
                lambda m, a, k=f"channels.{layer}": (multiply(k, a[0]),)))
            handles.append(parts.attn(layer).register_forward_hook(
                lambda m, a, out: (multiply("hidden", out[0]), *out[1:])))
            handles.append(parts.mlp(layer).register_forward_hook(lambda m, a, out: multiply("hidden", out)))
        handles.append(parts.embed.register_forward_hook(lambda m, a, out: multiply("hidden", out)))
        model(ids, labels=ids).loss.backward()
        for handle in handles:
            handle.remove()
        for name, ps in probes.items():
            n = dict(masks.named_structures())[name].n
            per_token = sum(p.grad.reshape(-1, n, p.shape[-1] // n).sum(-1) for p in ps)  # y * dL/dy, as p == 1
            squares[name] = squares.get(name, 0) + per_token.pow(2).sum(0)
            sums[name] = sums.get(name, 0) + per_token.sum(0)
    return squares, sums


def test_token_importance_sums_each_tokens_squared_contribution():
    model = tiny_model("llama-gqa")
    model.requires_grad_(False)
    batches = [input_ids(seed=1), input_ids(seed=2)]  # two micro-batches: each squared on its own tokens

    def scores(mode):
        masks = _structure_masks(model, "heads,channels,hidden", method=DMSConfig(align=1, importance=mode))
        with MaskHooks(model, masks):
            for ids in batches:
                model(ids, labels=ids).loss.backward()
            summed = {name: acc.clone() for name, acc in masks._taylor.items()}  # block mode: m * dL/dm
            block_or_token = masks.take_scores()
            squares, sums = _probe_contributions(model, masks, batches)
        return masks, block_or_token, squares, sums, summed

    masks, token, squares, sums, _ = scores("token")
    _, block, _, _, summed = scores("block")
    assert set(token) == set(block) == set(squares)
    m = {name: topk.soft_mask().detach() for name, topk in masks.named_structures()}
    for name in token:
        torch.testing.assert_close(token[name], squares[name], rtol=1e-4, atol=1e-10)
        # the probes measure the paper's quantity: summed over tokens (and both micro-batches), the
        # contributions are m * dL/dm, whose square is the block score (the hidden mask also acts through
        # the RMSNorm statistic, a term m_i * K equal for every channel)
        torch.testing.assert_close(summed[name].pow(2), block[name])
        if name != "hidden":
            torch.testing.assert_close(sums[name], summed[name], rtol=1e-4, atol=1e-9)
        else:
            rest = (summed[name] - sums[name]) / m[name]
            assert float((rest - rest.mean()).abs().max()) < 1e-4 * float(sums[name].abs().mean())
    # ... and the two scores rank elements differently: the test can tell them apart
    assert any(not torch.equal(normalized_ranks(token[n]), normalized_ranks(block[n])) for n in token)
