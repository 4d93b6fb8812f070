"""The least-squares refit of pruned output projections (dms_llm.refit) on tiny real models."""

import pytest
import torch
from conftest import input_ids, tiny_model

from dms_llm.arch import ModelParts
from dms_llm.plan import PrunePlan, count_plan_parameters
from dms_llm.prune import head_rows, prune_model
from dms_llm.refit import refit_output_projections


def _duplicate_a_channel_and_a_group(model, layers: list[int]):
    """Make MLP channel 5 a copy of channel 3 and KV group 1 (with its query heads) a copy of group 0 in
    `layers`: their outputs are then equal to the copied ones, so after pruning the copies the right output
    projection rebuilds the source sublayers exactly."""
    for layer in layers:
        _duplicate_in(ModelParts(model), layer)
    return model


def _duplicate_in(parts: ModelParts, layer: int) -> None:
    rep, hd = parts.shapes.n_rep(layer), parts.shapes.head_dim
    with torch.no_grad():
        for which in ("gate", "up"):
            parts.mlp_proj(layer, which).weight[5] = parts.mlp_proj(layer, which).weight[3]
        pairs = {"q": (head_rows([1], rep, hd), head_rows([0], rep, hd)),
                 "k": (head_rows([1], 1, hd), head_rows([0], 1, hd)), "v": (head_rows([1], 1, hd), head_rows([0], 1, hd))}
        for which, (copy, original) in pairs.items():
            proj = parts.attn_proj(layer, which)
            proj.weight[copy] = proj.weight[original]
            if proj.bias is not None:
                proj.bias[copy] = proj.bias[original]


def _without_the_copies(model, layers: list[int]) -> PrunePlan:
    plan = PrunePlan.dense(model.config)
    for layer in layers:
        lp = plan.layers[layer]
        lp.attention_groups = [g for g in lp.attention_groups if g != 1]
        lp.mlp_channels = [c for c in lp.mlp_channels if c != 5]
    return _checked(plan)


def _checked(plan: PrunePlan) -> PrunePlan:
    plan = PrunePlan.from_dict(plan.to_dict())  # validates the edited indices
    plan.params_after = count_plan_parameters(plan)
    return plan


def _max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("layers", [[1], [0, 1, 2]])  # a per-layer (dms_llama) or a uniform (stock) pruned model
def test_refit_rebuilds_pruned_copies_exactly(family, layers):
    source = _duplicate_a_channel_and_a_group(tiny_model(family), layers)
    plan = _without_the_copies(source, layers)
    pruned = prune_model(source, plan)
    assert (pruned.config.model_type == "dms_llama") == (len(layers) == 1)
    held_out = input_ids(batch=2, seq=16, seed=7)
    assert _max_logit_diff(pruned, source, held_out) > 1e-2  # the copies mattered
    info = refit_output_projections(pruned, source, plan, input_ids(batch=16, seq=16, seed=3), alpha=1e-10)
    assert _max_logit_diff(pruned, source, held_out) < 1e-4
    assert info["relative_error_after"] < 1e-8 < info["relative_error_before"]
    assert info["units_changed"] == 0


@pytest.mark.parametrize("layers", [[1], [0, 1, 2]])
def test_reconstruction_selection_finds_the_removable_copies(family, layers):
    """The plan drops MLP channel 7 and KV group 2, which the source needs; keeping as many, the selection
    must drop a copy instead (channel 3 or 5, group 0 or 1), after which the refit rebuilds the source."""
    groups = dict(num_attention_heads=6, num_key_value_heads=3) if family in ("mistral", "qwen2") else {}  # >= 3 groups
    source = _duplicate_a_channel_and_a_group(tiny_model(family, **groups), layers)
    plan = PrunePlan.dense(source.config)
    for layer in layers:
        plan.layers[layer].attention_groups = [g for g in plan.layers[layer].attention_groups if g != 2]
        plan.layers[layer].mlp_channels = [c for c in plan.layers[layer].mlp_channels if c != 7]
    plan = _checked(plan)
    pruned = prune_model(source, plan)
    held_out = input_ids(batch=2, seq=16, seed=7)
    as_planned = prune_model(source, plan)
    refit_output_projections(as_planned, source, PrunePlan.from_dict(plan.to_dict()), input_ids(batch=16, seq=16, seed=3),
                             alpha=1e-10)
    assert _max_logit_diff(as_planned, source, held_out) > 1e-3  # the plan's choice cannot be rebuilt
    info = refit_output_projections(pruned, source, plan, input_ids(batch=16, seq=16, seed=3), alpha=1e-10,
                                    select="reconstruction")
    for layer in layers:
        groups = plan.layers[layer].attention_groups
        assert 2 in groups and len(set(groups) & {0, 1}) == 1 and len(groups) == source.config.num_key_value_heads - 1
        assert 7 in plan.layers[layer].mlp_channels and len(set(plan.layers[layer].mlp_channels) & {3, 5}) == 1
    assert info["units_changed"] == 2 * len(layers)
    assert _max_logit_diff(pruned, source, held_out) < 1e-4
    # The model is what the updated plan and refit weights describe: its inputs are the new plan's slices.
    fresh = prune_model(source, plan)
    for name, p in fresh.named_parameters():
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(p, dict(pruned.named_parameters())[name]), name


def test_refit_brings_a_heavily_pruned_model_closer_to_its_source():
    source = tiny_model("llama-gqa", num_hidden_layers=4)
    plan = PrunePlan.dense(source.config)
    plan.hidden_channels = plan.hidden_channels[::2] + plan.hidden_channels[1:8:2]  # a sorted subset below
    plan.hidden_channels = sorted(plan.hidden_channels)
    plan.layers[0].attention_groups = []  # a layer without attention
    plan.layers[1].attention_groups = [0, 2]
    plan.layers[2].mlp_channels = list(range(0, 40, 3))
    plan.layers[3].mlp_channels = []  # and one without MLP
    plan = _checked(plan)
    pruned = prune_model(source, plan)
    sliced = {n: p.clone() for n, p in pruned.named_parameters()}
    calibration, held_out = input_ids(batch=32, seq=16, seed=3), input_ids(batch=8, seq=16, seed=9)

    def distance() -> float:  # KL(source || pruned) on held-out text: an independent measure of the fit
        with torch.no_grad():
            p = torch.log_softmax(source(held_out).logits, -1)
            q = torch.log_softmax(pruned(held_out).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    before = distance()
    info = refit_output_projections(pruned, source, plan, calibration)
    assert distance() < before
    # random tiny models have nearly independent channels, so less is rebuilt than in a trained model
    assert info["relative_error_after"] < 0.8 * info["relative_error_before"]
    assert info["sublayers"] == 6  # 3 attention + 3 MLP sublayers kept; removed ones are not rebuilt
    changed = {n for n, p in pruned.named_parameters() if not torch.equal(p, sliced[n])}
    assert changed and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in changed), changed


def test_refit_builds_no_autograd_graph():
    """The refit's passes run without autograd (a graph through every calibration block would hold every
    activation), even when the caller has it on."""
    source = tiny_model("llama-gqa", num_hidden_layers=2)
    plan = PrunePlan.dense(source.config)
    plan.layers[0].mlp_channels = list(range(0, 40, 2))
    plan = _checked(plan)
    pruned = prune_model(source, plan)
    seen = []
    hooks = [m.register_forward_hook(lambda *a: seen.append(torch.is_grad_enabled()))
             for model in (source, pruned) for name, m in model.named_modules() if name.endswith(("self_attn", "mlp"))]
    with torch.enable_grad():
        refit_output_projections(pruned, source, plan, input_ids(batch=4, seq=16, seed=3))
    for hook in hooks:
        hook.remove()
    assert seen and not any(seen)


def test_refit_rejects_bad_input():
    source = tiny_model("llama-gqa")
    plan = _without_the_copies(source, [1])
    pruned = prune_model(source, plan)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        refit_output_projections(pruned, source, plan, input_ids(), alpha=0)
    with pytest.raises(ValueError, match="calibration blocks must be"):
        refit_output_projections(pruned, source, plan, input_ids()[0])  # one sequence, not [n, seq_len]
    with pytest.raises(ValueError, match="pass the model the plan pruned"):
        refit_output_projections(pruned, tiny_model("llama-gqa", num_hidden_layers=4), plan, input_ids())
    with pytest.raises(ValueError, match="select must be one of"):
        refit_output_projections(pruned, source, plan, input_ids(), select="taylor")


@pytest.mark.parametrize("select", ["plan", "reconstruction"])
def test_refit_with_the_source_read_from_its_files_matches_the_one_in_memory(family, select, tmp_path):
    """--prune-from-files: the source is structure only and each pass reads its own sublayers' tensors."""
    from dms_llm.checkpoints.stream_prune import source_structure

    source = tiny_model(family, num_hidden_layers=4)
    source.save_pretrained(tmp_path)
    plan = PrunePlan.dense(source.config)
    plan.layers[1].attention_groups = plan.layers[1].attention_groups[:-1]
    plan.layers[2].mlp_channels = list(range(0, 40, 3))
    plan.layers[3].mlp_channels = []
    plan = _checked(plan)
    calibration = input_ids(batch=8, seq=16, seed=3)
    in_memory, streamed = prune_model(source, plan), prune_model(source, plan)
    sliced = {n: p.clone() for n, p in in_memory.named_parameters()}
    memory_plan, files_plan = PrunePlan.from_dict(plan.to_dict()), PrunePlan.from_dict(plan.to_dict())
    refit_output_projections(in_memory, source, memory_plan, calibration, select=select)
    structure, files = source_structure(str(tmp_path), torch.float32)
    structure.config._attn_implementation = source.config._attn_implementation  # the same kernel: equal sums
    reads, passes = [], []

    def read(name):
        resident = {n for n, p in structure.named_parameters() if p.device.type != "meta"}
        if not reads or reads[-1] not in resident:  # a new pass: the last one's sublayers were dropped
            passes.append(set())
        passes[-1].add(name)
        reads.append(name)
        return files.read(name)

    info = refit_output_projections(streamed, structure, files_plan, calibration, select=select, read_source=read)
    assert memory_plan.to_dict() == files_plan.to_dict()
    changed = [n for n, p in in_memory.named_parameters() if not torch.equal(p, sliced[n])]
    assert changed  # the refit moved weights, so equal results are not equal slices
    for name, p in in_memory.named_parameters():
        assert torch.equal(p, dict(streamed.named_parameters())[name]), name
    assert len(reads) == len(set(reads))  # every source tensor is read once
    assert all(".layers." in n and (".self_attn." in n or ".mlp." in n) for n in reads)  # never embeddings or norms
    assert len(passes) == info["sublayers"]  # one sublayer's weights at a time
    assert all(p.device.type == "meta" for p in structure.parameters())  # nothing of the source stays
    with pytest.raises(ValueError, match="meta device"):
        refit_output_projections(prune_model(source, plan), source, plan, calibration, read_source=read)


@pytest.mark.parametrize("select", ["plan", "reconstruction"])
def test_the_kept_inputs_carry_the_stream_as_the_pruned_sublayers_would(family, select, monkeypatch):
    """The stream is carried past each refit sublayer by its projection applied to the kept columns of the
    source's input to it, not by a pass of the pruned sublayer: the two give the same refit (heads, channels
    and hidden channels pruned, every later fit reading the carried stream), while dropping what is carried
    changes the later fits, so the comparison can fail."""
    import dms_llm.refit as refit

    source = tiny_model(family, num_hidden_layers=3)
    plan = PrunePlan.dense(source.config)
    plan.hidden_channels = [c for c in plan.hidden_channels if c % 5 != 2]
    plan.layers[0].mlp_channels = list(range(0, 40, 3))
    plan.layers[1].attention_groups = plan.layers[1].attention_groups[:-1]
    plan.layers[2].mlp_channels = list(range(1, 40, 2))
    plan = _checked(plan)
    calibration = input_ids(batch=8, seq=16, seed=3)

    def refit_with(max_bytes, carry=None):
        pruned, own_plan = prune_model(source, plan), PrunePlan.from_dict(plan.to_dict())
        monkeypatch.setattr(refit, "KEPT_INPUTS_MAX_BYTES", max_bytes)
        if carry is not None:
            original = refit._refit_sublayer
            monkeypatch.setattr(refit, "_refit_sublayer", lambda *a, **k: carry(original(*a, **k)))
        refit_output_projections(pruned, source, own_plan, calibration, select=select)
        monkeypatch.undo()
        return pruned, own_plan

    kept, kept_plan = refit_with(1 << 40)
    rerun, rerun_plan = refit_with(0)  # every carry recomputed by the pruned sublayer
    dropped, _ = refit_with(1 << 40, carry=lambda r: (*r[:3], [torch.zeros_like(z) for z in r[3]]))
    assert kept_plan.to_dict() == rerun_plan.to_dict()
    # logits, not weights: the tiny solves are ill-conditioned, so float sums taken in another order move
    # single weights by up to 2e-3 of their range while the refit models' outputs stay equal
    held_out = input_ids(batch=4, seq=16, seed=9)
    assert _max_logit_diff(kept, rerun, held_out) < 1e-4
    assert _max_logit_diff(kept, dropped, held_out) > 1e-2  # the carried stream decides the later fits


def _hidden_in_a_subspace(model, removed: list[int], seed: int = 0) -> torch.Tensor:
    """Make the `removed` hidden channels of every residual stream a fixed linear map M of the others: the
    embedding's columns and every o_proj/down_proj's rows there are M times the kept ones, so each sublayer
    adds to the stream within that subspace. Returns M ([removed, kept])."""
    parts, width = ModelParts(model), model.config.hidden_size
    kept = [c for c in range(width) if c not in removed]
    m = torch.randn(len(removed), len(kept), generator=torch.Generator().manual_seed(seed)) / len(kept) ** 0.5
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, removed] = embed[:, kept] @ m.T
        for layer in range(len(parts.layers)):
            for proj in (parts.attn_proj(layer, "o"), parts.mlp_proj(layer, "down")):
                proj.weight[removed] = m @ proj.weight[kept]
                if proj.bias is not None:
                    proj.bias[removed] = m @ proj.bias[kept]
    return m


def test_the_hidden_fill_predicts_removed_channels_that_are_linear_in_the_kept_ones(family):
    """In a model whose removed hidden channels are M times the kept ones everywhere, each sublayer's fill map
    is exactly diag(g_D) M diag(g_H)^-1 (g: the norm in front of it), recovered from the dense passes alone."""
    from dms_llm.refit import _hidden_fill_maps, _sublayers

    source = tiny_model(family, num_hidden_layers=3)
    removed = [c for c in range(source.config.hidden_size) if c % 4 == 1]
    m = _hidden_in_a_subspace(source, removed)
    plan = PrunePlan.dense(source.config)
    plan.hidden_channels = [c for c in plan.hidden_channels if c not in removed]
    plan = _checked(plan)
    hidden = torch.as_tensor(plan.hidden_channels)
    subs = _sublayers(prune_model(source, plan), source, plan)
    maps = _hidden_fill_maps(source, subs, input_ids(batch=16, seq=16, seed=3), hidden, alpha=1e-12, batch_size=4)
    parts = ModelParts(source)
    assert len(maps) == 6
    for (layer, kind), b in maps.items():
        g = parts.norm(layer, "attn_norm" if kind == "attention" else "mlp_norm").weight.double()
        expected = g[removed, None] * m.double() / g[hidden][None, :]
        assert torch.allclose(b, expected, atol=1e-6), (layer, kind, (b - expected).abs().max())


def _without_hidden_channels(family):
    """A source whose every fourth hidden channel (from 1) is a linear map of the others, with an lm_head
    that does not read them (the refit leaves the head alone), and the plan that removes them."""
    source = tiny_model(family, num_hidden_layers=3, tie_word_embeddings=False)
    removed = [c for c in range(source.config.hidden_size) if c % 4 == 1]
    _hidden_in_a_subspace(source, removed)
    with torch.no_grad():
        source.lm_head.weight[:, removed] = 0
    plan = PrunePlan.dense(source.config)
    plan.hidden_channels = [c for c in plan.hidden_channels if c not in removed]
    return source, _checked(plan)


def _kl(source, pruned, ids) -> float:
    """KL(source || pruned) of the next-token distributions, averaged over the tokens of `ids`."""
    with torch.no_grad():
        p = torch.log_softmax(source(ids).logits.double(), -1)
        q = torch.log_softmax(pruned(ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_hidden_fill_rebuilds_a_model_without_hidden_channels_the_kept_ones_predict(family):
    """Removing a quarter of the hidden channels, which the kept ones predict: the refit with the fill is
    nearly the source (KL on held-out ids), the refit without it is not; only projections differ between the two."""
    source, plan = _without_hidden_channels(family)
    calibration, held_out = input_ids(batch=32, seq=16, seed=3), input_ids(batch=8, seq=16, seed=9)
    plain, filled = prune_model(source, plan), prune_model(source, plan)
    assert not refit_output_projections(plain, source, plan, calibration, alpha=1e-10)["fill_hidden"]
    assert refit_output_projections(filled, source, plan, calibration, alpha=1e-10, fill_hidden=True)["fill_hidden"]
    assert _kl(source, filled, held_out) < 0.1 * _kl(source, plain, held_out), (_kl(source, filled, held_out), _kl(source, plain, held_out))
    differ = {n for (n, a), b in zip(plain.named_parameters(), filled.parameters()) if not torch.equal(a, b)}
    assert differ and all(n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
                          for n in differ), differ
    with pytest.raises(ValueError, match="needs the source in memory"):
        refit_output_projections(prune_model(source, plan), source, plan, calibration, fill_hidden=True,
                                 read_source=lambda name: None)
