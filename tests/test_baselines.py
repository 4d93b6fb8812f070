"""The one-shot baselines on tiny models: budgets as the shared formula counts them, plans that prune,
save and reload, FLAP's bias compensation, and each criterion picking what it should on hand-made cases."""

import copy
import json
import os

import pytest
import torch
from conftest import FAMILIES, input_ids, tiny_model, tiny_tokenizer

from dms_llm.baselines import METHODS, BudgetError
from dms_llm.baselines.common import output_proj_input_stats
from dms_llm.baselines.common import build_plan
from dms_llm.baselines.flap import compensation, fluctuation_scores, global_removal_order
from dms_llm.baselines.llm_pruner import default_layers, taylor_scores
from dms_llm.plan import PlanError, PrunePlan, count_plan_parameters
from dms_llm.prune import head_rows, prune_model

CALIB = input_ids(8, 16, seed=3)
X = input_ids(2, 12, seed=5)


def build(case: str, **kw):
    if case == "llama-bias":
        return tiny_model("llama-mha", num_hidden_layers=4, attention_bias=True, mlp_bias=True, **kw)
    return tiny_model(case, num_hidden_layers=4, **kw)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- budgets, pruning, saving -----------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(FAMILIES) + ["llama-bias"])
def test_budget_met_exactly_as_the_formula_counts(method, case):
    model = build(case)
    dense = n_params(model)
    for ratio in (0.8, 0.5):
        target = int(ratio * dense)
        plan = METHODS[method](model, CALIB, target, align=1)
        pruned = prune_model(model, plan)
        assert plan.params_after == count_plan_parameters(plan) == n_params(pruned) <= target
        assert plan.metadata["method"] == method and plan.metadata["target_params"] == target
        assert torch.isfinite(pruned(X).logits).all()


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.6, 0.45])
def test_uniform_methods_fill_the_budget_to_one_channel_per_layer(ratio):
    model = build("llama-gqa")
    target = int(ratio * n_params(model))
    s = PrunePlan.dense(model.config).shapes
    one_channel_everywhere = s.num_layers * 3 * s.hidden_size
    for method in ("magnitude", "wanda-sp", "llm-pruner"):
        plan = METHODS[method](model, CALIB, target, align=1)
        widths = {(len(lp.attention_groups), len(lp.mlp_channels)) for lp in plan.layers}
        assert len(widths) == 1, (method, widths)  # the same fraction in every (pruned) layer
        # KV groups come 3 per layer: the channels take up what a coarse head fraction leaves over
        assert target - plan.params_after < one_channel_everywhere
        h, c = plan.metadata["keep_fraction_heads"], plan.metadata["keep_fraction_channels"]
        assert abs(h - c) < 1 / 3, (h, c)  # as equal as 3 groups per layer allow


@pytest.mark.parametrize("method", sorted(METHODS))
def test_aligned_widths_meet_the_budget(method):
    """With `align`, every MLP keeps a multiple of it (or all its channels), still within the budget."""
    model = build("llama-gqa", intermediate_size=64)
    dense = n_params(model)
    for ratio in (0.8, 0.6):
        target = int(ratio * dense)
        plan = METHODS[method](model, CALIB, target, align=16)
        widths = [len(lp.mlp_channels) for lp in plan.layers]
        assert all(w % 16 == 0 for w in widths), (method, widths)
        assert plan.params_after == count_plan_parameters(plan) == n_params(prune_model(model, plan)) <= target
        if method != "shortgpt":  # whole layers: nothing to align, nothing changes
            assert any(0 < w < 64 for w in widths), (method, widths)


def test_aligned_flap_keeps_each_layers_best_scored_channels():
    model = build("llama-gqa", intermediate_size=64)
    target = int(0.7 * n_params(model))
    exact, aligned = METHODS["flap"](model, CALIB, target, align=1), METHODS["flap"](model, CALIB, target, align=16)
    stats = output_proj_input_stats(model, CALIB)
    _, chans = fluctuation_scores(model, stats)
    for i, (e, a) in enumerate(zip(exact.layers, aligned.layers)):
        assert len(a.mlp_channels) % 16 == 0
        best = sorted(torch.argsort(chans[i], descending=True)[: len(a.mlp_channels)].tolist())
        assert a.mlp_channels == best  # the aligned layer keeps its top channels by FLAP's score


@pytest.mark.parametrize("method", sorted(METHODS))
def test_plan_saves_and_reloads(method, tmp_path):
    from transformers import AutoModelForCausalLM

    from dms_llm.checkpoints import save_pruned

    model = build("qwen2")
    plan = METHODS[method](model, CALIB, int(0.6 * n_params(model)), align=1)
    pruned = prune_model(model, plan)
    out = save_pruned(pruned, tiny_tokenizer(), str(tmp_path / method), plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert n_params(reloaded) == plan.params_after
    again = PrunePlan.from_json(os.path.join(out, "dms_plan.json"))
    with torch.no_grad():
        ref = pruned(X).logits
        torch.testing.assert_close(reloaded(X).logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(prune_model(model, again)(X).logits, ref, atol=0, rtol=0)
    assert (method == "flap") == os.path.isfile(os.path.join(out, "dms_plan.bias.safetensors"))


def test_unreachable_budget_is_a_clear_error():
    model = build("llama-gqa")
    for method in METHODS:
        with pytest.raises(BudgetError):
            METHODS[method](model, CALIB, 1000, align=1)


def test_model_is_left_unchanged():
    model = build("llama-bias")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    for method in METHODS:
        METHODS[method](model, CALIB, int(0.6 * n_params(model)), align=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


# ----- FLAP: bias compensation --------------------------------------------------------------------------


def mean_substituted(model, plan, stats):
    """The dense model with every removed o_proj/down_proj input replaced by its calibration mean."""
    ref = copy.deepcopy(model)
    s = plan.shapes
    for i, lp in enumerate(plan.layers):
        layer = ref.model.layers[i]
        keep = torch.zeros(s.num_heads[i] * s.head_dim, dtype=torch.bool)
        keep[head_rows(lp.attention_groups, s.n_rep(i), s.head_dim)] = True
        keep_ch = torch.zeros(s.intermediate[i], dtype=torch.bool)
        keep_ch[lp.mlp_channels] = True
        for proj, k, key in ((layer.self_attn.o_proj, keep, f"{i}.attention"), (layer.mlp.down_proj, keep_ch, f"{i}.mlp")):
            mean = stats[key].mean.float()
            proj.register_forward_pre_hook(lambda m, a, k=k, mean=mean: (torch.where(k, a[0], mean),))
    return ref


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2", "llama-bias"])
def test_flap_compensation_equals_mean_substitution(case):
    model = build(case)
    dense = n_params(model)
    stats = output_proj_input_stats(model, CALIB)
    removed_sublayer = False
    for ratio in (0.75, 0.5, 0.3):
        plan = METHODS["flap"](model, CALIB, int(ratio * dense), align=1)
        removed_sublayer |= any(not lp.has_attention or not lp.has_mlp for lp in plan.layers)
        pruned = prune_model(model, plan)
        # the same structures without the compensation (no biases at all)
        plain = prune_model(model, PrunePlan.from_dict({k: v for k, v in plan.to_dict().items() if k != "output_bias"}))
        with torch.no_grad():
            ref = mean_substituted(model, plan, stats)(CALIB).logits
            dense_logits = model(CALIB).logits
            torch.testing.assert_close(pruned(CALIB).logits, ref, atol=2e-5, rtol=0)
            # on the calibration data, compensation brings the pruned model closer to the dense one
            err = (pruned(CALIB).logits - dense_logits).pow(2).mean()
            err_plain = (plain(CALIB).logits - dense_logits).pow(2).mean()
        assert err < err_plain
    if case == "llama-gqa":
        assert removed_sublayer  # the carry-back of a removed sublayer's constant output is exercised


def test_flap_counts_the_biases_it_adds():
    model = build("llama-gqa")
    target = int(0.7 * n_params(model))
    plan = METHODS["flap"](model, CALIB, target, align=1)
    present = sum(lp.has_attention for lp in plan.layers) + sum(lp.has_mlp for lp in plan.layers)
    no_bias = PrunePlan.from_dict({k: v for k, v in plan.to_dict().items() if k != "output_bias"})
    assert plan.params_after == count_plan_parameters(no_bias) + present * model.config.hidden_size
    pruned = prune_model(model, plan)
    assert pruned.config.model_type == "dms_llama"
    assert pruned.config.attention_out_bias and pruned.config.mlp_out_bias and not pruned.config.attention_bias
    assert n_params(pruned) == plan.params_after <= target


# ----- output biases in the plan format ----------------------------------------------------------------


def test_plan_json_without_output_bias_is_unchanged(tmp_path):
    model = build("llama-gqa")
    plan = METHODS["magnitude"](model, None, int(0.7 * n_params(model)), align=1)
    assert "output_bias" not in plan.to_dict()
    plan.to_json(str(tmp_path / "p.json"))
    assert "output_bias" not in json.load(open(tmp_path / "p.json"))
    assert os.listdir(tmp_path) == ["p.json"]


def test_uniform_plan_with_output_bias_and_its_errors(tmp_path):
    model = build("llama-gqa")
    s = PrunePlan.dense(model.config).shapes
    dense = PrunePlan.dense(model.config)
    values = {"1.mlp": torch.randn(s.hidden_size), "0.attention": torch.randn(s.hidden_size)}
    plan = PrunePlan.from_dict({**dense.to_dict(), "output_bias": {"attention": True, "mlp": True}})
    plan.output_bias_values = values
    plan.validate()
    # a uniform plan cannot be a stock Llama checkpoint once o/down biases exist without q/k/v/gate/up ones
    assert plan.is_uniform() and not plan.uses_stock_format()
    assert count_plan_parameters(plan) == count_plan_parameters(dense) + 2 * s.num_layers * s.hidden_size
    pruned = prune_model(model, plan)
    torch.testing.assert_close(pruned.model.layers[1].mlp.down_proj.bias, values["1.mlp"])
    assert not pruned.model.layers[2].mlp.down_proj.bias.any()  # no value: zero (the source had none)
    with torch.no_grad():  # zero biases everywhere but two sublayers: only those change the output
        pruned.model.layers[1].mlp.down_proj.bias.zero_()
        pruned.model.layers[0].self_attn.o_proj.bias.zero_()
        torch.testing.assert_close(pruned(X).logits, model(X).logits, atol=1e-5, rtol=0)

    plan.to_json(str(tmp_path / "p.json"))
    back = PrunePlan.from_json(str(tmp_path / "p.json"))
    assert back.output_bias == {"attention": True, "mlp": True}
    torch.testing.assert_close(back.output_bias_values["1.mlp"], values["1.mlp"])
    os.remove(tmp_path / "p.bias.safetensors")
    with pytest.raises(PlanError, match="missing"):
        PrunePlan.from_json(str(tmp_path / "p.json"))
    with pytest.raises(PlanError, match="bias values"):
        prune_model(model, PrunePlan.from_dict(plan.to_dict()))
    with pytest.raises(PlanError, match="shape"):
        PrunePlan.from_dict(plan.to_dict()).__class__(**{**plan.__dict__, "output_bias_values": {"0.mlp": torch.zeros(3)}})
    with pytest.raises(PlanError, match="bad key"):
        PrunePlan(**{**plan.__dict__, "output_bias_values": {"9.mlp": torch.zeros(s.hidden_size)}})


def test_output_bias_adds_to_an_existing_source_bias():
    model = build("llama-bias")  # Llama with attention_bias/mlp_bias: o/down biases exist already
    dense = PrunePlan.dense(model.config)
    delta = torch.randn(model.config.hidden_size)
    plan = PrunePlan(**{**dense.__dict__, "output_bias": {"attention": False, "mlp": True}, "output_bias_values": {"2.mlp": delta}})
    assert plan.uses_stock_format() and count_plan_parameters(plan) == count_plan_parameters(dense)
    pruned = prune_model(model, plan)
    assert pruned.config.model_type == "llama"
    torch.testing.assert_close(pruned.model.layers[2].mlp.down_proj.bias, model.model.layers[2].mlp.down_proj.bias + delta)


# ----- each criterion on a hand-made case --------------------------------------------------------------


def _zero_channel(model, layer, c):
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[c] = 0
        mlp.up_proj.weight[c] = 0
        mlp.down_proj.weight[:, c] = 0


def test_magnitude_removes_zero_weight_structures_first():
    model = build("llama-mha")  # 4 KV groups of head_dim 8
    d = model.config.head_dim
    with torch.no_grad():
        for i in range(4):
            _zero_channel(model, i, 7)
            attn = model.model.layers[i].self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[2 * d : 3 * d] = 0
            attn.o_proj.weight[:, 2 * d : 3 * d] = 0
    plan = METHODS["magnitude"](model, None, n_params(model) - 1, align=1)  # the smallest cut: one channel per layer
    for lp in plan.layers:
        assert 7 not in lp.mlp_channels and len(lp.mlp_channels) == 39 and len(lp.attention_groups) == 4
    plan = METHODS["magnitude"](model, None, int(0.75 * n_params(model)), align=1)  # 3 of 4 groups per layer
    for lp in plan.layers:
        assert lp.attention_groups == [0, 1, 3] and 7 not in lp.mlp_channels


def test_wanda_sp_keeps_a_huge_activation_channel_with_small_weights():
    def case(boost: float):
        model = build("llama-gqa")
        with torch.no_grad():
            mlp = model.model.layers[1].mlp
            mlp.down_proj.weight[:, 5] *= 0.01  # the smallest weights reading this channel...
            mlp.up_proj.weight[5] *= boost  # ...unless its activation is huge
        plan = METHODS["wanda-sp"](model, CALIB, int(0.6 * n_params(model)), align=1)
        return plan.layers[1].mlp_channels

    assert 5 in case(1e3)
    assert 5 not in case(1.0)


def test_llm_pruner_taylor_scores():
    model = build("llama-gqa")
    _zero_channel(model, 2, 11)  # w = 0: |w * dL/dw| = 0 whatever the gradient
    heads1, chans1 = taylor_scores(model, CALIB, [0, 1, 2, 3], batch_size=1)
    heads8, chans8 = taylor_scores(model, CALIB, [0, 1, 2, 3], batch_size=8)
    for i in range(4):  # the loss is the mean over all blocks, however they are batched
        torch.testing.assert_close(chans1[i], chans8[i], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(heads1[i], heads8[i], rtol=1e-4, atol=1e-9)
    assert chans1[2][11] == 0 and (chans1[2] > 0).sum() == 39
    # element-wise |w g| by hand for one channel: gate row + up row + down column
    ids = CALIB
    loss = model(input_ids=ids, labels=ids).loss
    mlp = model.model.layers[1].mlp
    g = torch.autograd.grad(loss, [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight])
    by_hand = ((mlp.gate_proj.weight * g[0])[4].abs().sum() + (mlp.up_proj.weight * g[1])[4].abs().sum()
               + (mlp.down_proj.weight * g[2])[:, 4].abs().sum())
    torch.testing.assert_close(chans8[1][4], by_hand.detach(), rtol=1e-4, atol=0)
    plan = METHODS["llm-pruner"](model, CALIB, n_params(model) - 1, align=1)
    assert 11 not in plan.layers[2].mlp_channels


def test_llm_pruner_spares_the_first_and_last_layers():
    assert default_layers(32) == (4, 30)  # LLM-Pruner's Llama-7B setting
    assert default_layers(30) == (4, 28)
    model = tiny_model("llama-gqa", num_hidden_layers=8)
    plan = METHODS["llm-pruner"](model, CALIB, int(0.8 * n_params(model)), align=1)
    start, end = default_layers(8)
    assert (start, end) == (1, 8)
    assert len(plan.layers[0].mlp_channels) == 40 and len(plan.layers[0].attention_groups) == 3
    assert all(len(plan.layers[i].mlp_channels) < 40 for i in range(start, end))
    plan = METHODS["llm-pruner"](model, CALIB, int(0.8 * n_params(model)), layer_start=2, layer_end=6, align=1)
    assert [len(lp.mlp_channels) < 40 for lp in plan.layers] == [False, False, True, True, True, True, False, False]


def test_shortgpt_removes_an_identity_layer_first():
    model = build("llama-gqa")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    plan = METHODS["shortgpt"](model, CALIB, n_params(model) - 1, align=1)
    assert plan.metadata["removed_layers"] == [2] and plan.kept_layers() == [0, 1, 3]
    assert plan.metadata["block_influence"][2] == pytest.approx(0, abs=1e-6)
    with torch.no_grad():  # removing an identity layer changes nothing
        torch.testing.assert_close(prune_model(model, plan)(X).logits, model(X).logits, atol=1e-5, rtol=0)


def test_flap_removes_a_constant_channel_first_and_compensates_it_exactly():
    model = build("llama-bias")  # gate/up biases let a channel be constant and non-zero
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[9] = 0
        mlp.up_proj.weight[9] = 0
        mlp.gate_proj.bias[9] = 3.0
        mlp.up_proj.bias[9] = 2.0  # activation silu(3) * 2 on every token: zero fluctuation
    stats = output_proj_input_stats(model, CALIB)
    heads, chans = fluctuation_scores(model, stats)
    assert chans[1][9] == pytest.approx(0, abs=1e-9)
    order = global_removal_order(heads, chans, model)
    assert [o for o in order if o[:2] == ("mlp", 1)][0] == ("mlp", 1, 9)  # first of its layer
    kept_heads = {i: list(range(4)) for i in range(4)}
    kept_chans = {i: [c for c in range(40) if (i, c) != (1, 9)] for i in range(4)}
    values, dropped = compensation(model, stats, kept_heads, kept_chans)
    assert not dropped
    plan = build_plan(model, kept_heads, kept_chans, "tiny", {}, output_bias={"attention": True, "mlp": True},
                      output_bias_values=values)
    with torch.no_grad():  # its constant output moved into down_proj's bias: the model is unchanged
        torch.testing.assert_close(prune_model(model, plan)(X).logits, model(X).logits, atol=1e-5, rtol=0)
    plan.output_bias_values = None
    plan.output_bias = None
    with torch.no_grad():
        assert (prune_model(model, plan)(X).logits - model(X).logits).abs().max() > 1e-2


def test_flap_ranks_scores_standardised_per_layer_globally():
    g = torch.Generator().manual_seed(0)
    heads = {i: torch.rand(3, generator=g, dtype=torch.float64) for i in range(3)}  # one score per group
    chans = {i: torch.rand(40, generator=g, dtype=torch.float64) + 1 for i in range(3)}
    order = global_removal_order(heads, chans)
    assert len(order) == 3 * 3 + 3 * 40
    # each layer and type is standardised on its own: rescaling one layer's scores changes nothing...
    assert global_removal_order({**heads, 1: heads[1] * 1e6}, chans) == order
    assert global_removal_order(heads, {**chans, 2: chans[2] * 1e-3 + 7}) == order
    # ...but its shape counts: a layer with a few far-off low channels loses those first, globally
    tail = chans[1].clone()
    tail[[3, 17, 30]] = 0.0
    first = global_removal_order(heads, {**chans, 1: tail})[:3]
    assert sorted(first) == [("mlp", 1, 3), ("mlp", 1, 17), ("mlp", 1, 30)]


def test_flap_head_score_is_the_mean_of_its_standardised_columns():
    model = build("llama-gqa")  # 3 groups x 2 query heads x head_dim 8 = 48 o_proj columns
    cols = {0: torch.arange(48, dtype=torch.float64)}
    order = global_removal_order(cols, {}, model)
    assert order == [("attention", 0, 0), ("attention", 0, 1), ("attention", 0, 2)]
    cols = {0: torch.cat([torch.full((16,), 5.0), torch.zeros(16), torch.full((16,), 1.0)]).double()}
    assert [j for _, _, j in global_removal_order(cols, {}, model)] == [1, 2, 0]
    # columns are standardised per layer before the group mean: a layer 1000x larger ranks alike
    cols = {0: torch.arange(48.0).double(), 1: torch.arange(48.0).double() * 1000 + 5}
    order = global_removal_order(cols, {}, model)
    assert set(order[:2]) == {("attention", 0, 0), ("attention", 1, 0)}
    assert set(order[2:4]) == {("attention", 0, 1), ("attention", 1, 1)}


def test_flap_fluctuation_is_weighted_input_variance():
    model = build("llama-gqa")
    seen = []
    model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    stats = output_proj_input_stats(model, CALIB, batch_size=3)
    x = torch.cat(seen).double()
    w = model.model.layers[2].self_attn.o_proj.weight.double()
    heads, _ = fluctuation_scores(model, stats)
    torch.testing.assert_close(heads[2], (x.var(0, unbiased=False) * w.pow(2).sum(0)).pow(2), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["2.attention"].mean, x.mean(0), rtol=1e-9, atol=1e-12)
