"""PrunePlan and prune_model on tiny real models of every family.

The reference for every structure is the *source* model with the removed structures switched off by
hand (weights zeroed, no slicing), so a wrong index, a wrong bias, a wrong norm slice or a wrong layer
mapping in `prune_model` shows up as a logits difference:

| structure          | reference in the unpruned copy                                                    |
|--------------------|-----------------------------------------------------------------------------------|
| KV groups          | zero the o_proj input columns of the removed groups' query heads                  |
| MLP channels       | zero the down_proj input columns of the removed channels                          |
| sublayer / layer   | zero o_proj / down_proj weight (and output bias) of the removed sublayer          |
| hidden channels    | zero the removed channels of the residual stream at every writer (embedding        |
|                    | columns, o/down output rows and biases) AND make every RMSNorm take its statistic |
|                    | over the kept channels only                                                        |

Why the hidden reference is sound: once the removed channels are zero at every writer of the residual
stream, they stay zero everywhere (norm outputs there are weight * 0), so every reader (q/k/v/gate/up
input columns, lm_head columns) gets nothing from them. The only remaining difference from a model that
never had those channels is RMSNorm's mean over D instead of over k channels; replacing the norm with
one whose statistic runs over the kept channels is exactly DMS's definition of a hidden mask (docs/DESIGN.md),
and it is implemented here independently of the slicing code.
"""

import copy

import pytest
import torch
from conftest import FAMILIES, input_ids, tiny_model

from dms_llm.plan import LayerPlan, PlanError, PrunePlan, count_plan_parameters
from dms_llm.prune import head_rows, prune_model, slice_linear, slice_norm

CASES = sorted(FAMILIES) + ["llama-bias"]  # llama-bias: Llama with q/k/v/o and MLP biases
KINDS = ["heads", "channels", "hidden", "sublayers", "all", "uniform"]
ATOL = 1e-5


def build(case: str, **overrides):
    if case == "llama-bias":
        return tiny_model("llama-mha", num_hidden_layers=4, attention_bias=True, mlp_bias=True, **overrides)
    return tiny_model(case, num_hidden_layers=4, **overrides)


def subset(n: int, k: int, gen: torch.Generator) -> list[int]:
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def make_plan(model, kind: str, seed: int = 0) -> PrunePlan:
    plan = PrunePlan.dense(model.config, source_model="tiny")
    s, g = plan.shapes, torch.Generator().manual_seed(seed)
    layers = plan.layers

    def heads(i, k=None):
        n = s.num_kv_heads[i]
        return subset(n, k if k is not None else max(1, n - 1 - i % 2), g)

    if kind in ("heads", "all"):
        for i, lp in enumerate(layers):
            lp.attention_groups = heads(i)
    if kind in ("channels", "all"):
        for i, lp in enumerate(layers):
            lp.mlp_channels = subset(s.intermediate[i], [25, 17, 31, 9][i], g)
    if kind in ("hidden", "all"):
        plan.hidden_channels = subset(s.hidden_size, 37, g)
    if kind == "sublayers":
        layers[0].attention_groups = []
        layers[1] = LayerPlan([], [])
        layers[2].mlp_channels = []
    if kind == "all":
        layers[1] = LayerPlan([], [])
        layers[2].attention_groups = []
        layers[3].mlp_channels = []
    if kind == "uniform":
        for i, lp in enumerate(layers):
            lp.attention_groups = heads(i, max(1, s.num_kv_heads[i] // 2))
            lp.mlp_channels = subset(s.intermediate[i], 24, g)
        layers[2] = LayerPlan([], [])
        plan.hidden_channels = subset(s.hidden_size, 32, g)
    plan.validate()
    plan.params_after = count_plan_parameters(plan)  # what the search sets from its budget formula
    return plan


def _masked_rmsnorm(norm, kept: torch.Tensor):
    def forward(hidden_states):
        x = hidden_states.to(torch.float32)
        var = x[..., kept].pow(2).mean(-1, keepdim=True)
        return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon)).to(hidden_states.dtype)

    return forward


@torch.no_grad()
def reference_model(model, plan: PrunePlan):
    """The unpruned model with everything the plan removes switched off by zeroing (see module doc)."""
    ref = copy.deepcopy(model)
    s, d = plan.shapes, plan.shapes.head_dim
    removed_hidden = sorted(set(range(s.hidden_size)) - set(plan.hidden_channels))
    kept_hidden = torch.tensor(plan.hidden_channels)
    ref.model.embed_tokens.weight[:, removed_hidden] = 0
    for i, lp in enumerate(plan.layers):
        layer = ref.model.layers[i]
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        n_rep = s.num_heads[i] // s.num_kv_heads[i]
        for group in set(range(s.num_kv_heads[i])) - set(lp.attention_groups):
            for r in range(n_rep):
                head = group * n_rep + r
                o.weight[:, head * d : (head + 1) * d] = 0
        removed_channels = sorted(set(range(s.intermediate[i])) - set(lp.mlp_channels))
        down.weight[:, removed_channels] = 0
        for proj, present in ((o, lp.has_attention), (down, lp.has_mlp)):
            if not present:
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
            proj.weight[removed_hidden, :] = 0
            if proj.bias is not None:
                proj.bias[removed_hidden] = 0
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = _masked_rmsnorm(norm, kept_hidden)
    ref.model.norm.forward = _masked_rmsnorm(ref.model.norm, kept_hidden)
    return ref


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- primitives ---------------------------------------------------------------------------------------


def test_primitives_slice_rows_cols_and_bias_without_aliasing():
    w, b = torch.arange(12.0).reshape(3, 4), torch.tensor([10.0, 11.0, 12.0])
    w2, b2 = slice_linear(w, b, rows=torch.tensor([0, 2]), cols=torch.tensor([1, 3]))
    assert w2.tolist() == [[1.0, 3.0], [9.0, 11.0]] and b2.tolist() == [10.0, 12.0]
    w3, b3 = slice_linear(w, b)
    w3.zero_(), b3.zero_()
    assert w.sum() == 66 and b.sum() == 33  # a full slice is still a copy
    assert slice_linear(w, None, cols=torch.tensor([3]))[0].flatten().tolist() == [3.0, 7.0, 11.0]  # embedding columns
    assert slice_norm(b, torch.tensor([1])).tolist() == [11.0]
    # group 1 of 2 with n_rep=2, head_dim=3 -> query heads 2 and 3 -> rows 6..11
    assert head_rows([1], 2, 3).tolist() == list(range(6, 12))
    assert head_rows([0, 2], 1, 2).tolist() == [0, 1, 4, 5]


# ----- prune_model against the references ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_dense_plan_is_identity(case):
    model = build(case)
    pruned = prune_model(model, PrunePlan.dense(model.config))
    assert type(pruned) is type(model)
    x = input_ids()
    torch.testing.assert_close(pruned(x).logits, model(x).logits, rtol=0, atol=0)
    assert n_params(pruned) == n_params(model) == count_plan_parameters(PrunePlan.dense(model.config))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_pruned_matches_zeroed_reference(case, kind):
    model = build(case)
    plan = make_plan(model, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_model(model, plan)

    assert n_params(pruned) == count_plan_parameters(plan)
    assert n_params(pruned) < n_params(model)
    expected_type = model.config.model_type if plan.uses_stock_format() else "dms_llama"
    assert pruned.config.model_type == expected_type
    if kind == "uniform":
        assert pruned.config.model_type == model.config.model_type
    if kind in ("sublayers", "all"):
        assert pruned.config.model_type == "dms_llama"
    assert pruned.config.num_hidden_layers == len(plan.kept_layers())
    layer_idx = [getattr(layer.self_attn, "layer_idx", j) for j, layer in enumerate(pruned.model.layers) if layer.self_attn is not None]
    assert layer_idx == list(range(len(layer_idx)))  # KV-cache slots: one per attention layer, in order

    x = input_ids()
    got, want = pruned(x).logits, reference_model(model, plan)(x).logits
    assert (got - want).abs().max().item() <= ATOL, (case, kind)

    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if model.config.tie_word_embeddings:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert not any(p.data_ptr() == q.data_ptr() for p in pruned.parameters() for q in model.parameters())


def test_a_pruned_dms_llama_model_can_be_pruned_again():
    model = build("qwen2")
    first = prune_model(model, make_plan(model, "sublayers"))
    dense = PrunePlan.dense(first.config)
    assert dense.source_model_type == "dms_llama" and not dense.uses_stock_format()
    x = input_ids()
    torch.testing.assert_close(prune_model(first, dense)(x).logits, first(x).logits, rtol=0, atol=0)
    dense.layers[2].mlp_channels = dense.layers[2].mlp_channels[:5]
    dense.hidden_channels = dense.hidden_channels[2:]
    assert n_params(prune_model(first, dense)) == count_plan_parameters(dense)


def test_llama_hidden_not_divisible_by_heads_falls_back_to_dms_llama():
    # LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim.
    model = build("llama-gqa")
    plan = make_plan(model, "hidden")  # 37 of 48 hidden channels, 6 heads
    assert plan.is_uniform() and not plan.uses_stock_format()
    assert plan.pruned_config().model_type == "dms_llama"


def test_a_bug_while_building_the_stock_config_surfaces(monkeypatch):
    # Only the config validator's refusal selects dms_llama; any other error is raised, not taken as a refusal.
    model = build("llama-gqa")
    plan = make_plan(model, "uniform")
    assert plan.uses_stock_format()

    def broken(self):
        raise TypeError("a bug")

    monkeypatch.setattr(PrunePlan, "_stock_config", broken)
    with pytest.raises(TypeError, match="a bug"):
        plan.uses_stock_format()


def test_bf16_prune_copies_exact_values():
    model = build("qwen2")
    plan = make_plan(model, "all")
    want = {k: v.to(torch.bfloat16) for k, v in prune_model(model, plan).state_dict().items()}
    pruned = prune_model(model.to(torch.bfloat16), plan)
    assert pruned.dtype == torch.bfloat16
    got = pruned.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    dense = prune_model(model, PrunePlan.dense(model.config))
    x = input_ids()
    assert torch.equal(dense(x).logits, model(x).logits)


# ----- per-layer attention types (sliding windows) ------------------------------------------------------


def test_qwen2_layer_types_follow_the_kept_layers():
    # Layers 0-1 full, 2-3 sliding with a window of 4 tokens, so a wrongly sliced layer_types changes logits.
    model = build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    plan = PrunePlan.dense(model.config)
    plan.layers[1] = LayerPlan([], [])
    config = plan.pruned_config()
    assert config.model_type == "qwen2"
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config.max_window_layers == 1
    x = input_ids(seq=16)
    got = prune_model(model, plan)(x).logits
    torch.testing.assert_close(got, reference_model(model, plan)(x).logits, rtol=0, atol=ATOL)

    plan.layers[3].mlp_channels = []  # non-uniform: dms_llama has one window for all layers
    with pytest.raises(PlanError, match="mix attention types"):
        plan.pruned_config()
    plan.layers[0].attention_groups = []  # only sliding layers keep attention: expressible again
    assert plan.pruned_config().sliding_window == 4


def test_mistral_sliding_window_survives_in_dms_llama():
    model = build("mistral", sliding_window=4)
    plan = make_plan(model, "sublayers")
    assert plan.pruned_config().sliding_window == 4
    x = input_ids(seq=16)
    got = prune_model(model, plan)(x).logits
    torch.testing.assert_close(got, reference_model(model, plan)(x).logits, rtol=0, atol=ATOL)


# ----- plan: config derivation, uniformity, JSON, validation --------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_pruned_config_is_derived_from_the_plan(case):
    model = build(case)
    plan = make_plan(model, "uniform")
    cfg = plan.pruned_config()
    assert type(cfg) is type(model.config)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.head_dim) == (32, 3, 24, 8)
    groups = len(plan.layers[0].attention_groups)
    n_rep = model.config.num_attention_heads // model.config.num_key_value_heads
    assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (groups, groups * n_rep)
    assert "auto_map" not in cfg.to_dict()

    plan = make_plan(model, "all")
    cfg = plan.pruned_config()
    assert cfg.model_type == "dms_llama"
    assert cfg.layer_intermediate_sizes == [len(plan.layers[i].mlp_channels) for i in plan.kept_layers()]
    assert cfg.layer_num_key_value_heads == [len(plan.layers[i].attention_groups) for i in plan.kept_layers()]
    assert cfg.layer_num_attention_heads == [n_rep * k for k in cfg.layer_num_key_value_heads]
    qwen = case == "qwen2"
    bias = case == "llama-bias"
    assert (cfg.attention_bias, cfg.attention_out_bias) == (qwen or bias, bias)
    assert (cfg.mlp_bias, cfg.mlp_out_bias) == (bias, bias)


def test_is_uniform_rules():
    model = build("llama-gqa")
    plan = PrunePlan.dense(model.config)
    assert plan.is_uniform()
    plan.layers[1] = LayerPlan([], [])  # a whole layer removed: still a stock model
    assert plan.is_uniform()
    plan.layers[2].mlp_channels = []  # one sublayer missing: needs dms_llama
    assert not plan.is_uniform()
    plan = PrunePlan.dense(model.config)
    plan.layers[0].mlp_channels = plan.layers[0].mlp_channels[:-1]
    assert not plan.is_uniform()
    plan = PrunePlan.dense(model.config)
    plan.layers[3].attention_groups = [0]
    assert not plan.is_uniform()


def test_plan_json_round_trip(tmp_path):
    model = build("qwen2")
    plan = make_plan(model, "all")
    plan.params_after, plan.metadata = count_plan_parameters(plan), {"target_ratio": 0.8}
    path = tmp_path / "dms_plan.json"
    plan.to_json(str(path))
    again = PrunePlan.from_json(str(path))
    assert again.to_dict() == plan.to_dict()
    assert again.pruned_config().to_dict() == plan.pruned_config().to_dict()
    text = path.read_text()
    assert text.count("\n") < 20 + len(plan.layers)  # one line per layer, not per index
    assert [p.name for p in tmp_path.iterdir()] == ["dms_plan.json"]
    summary = plan.summary()
    assert [r["sublayers"] for r in summary] == ["attention+mlp", "removed", "mlp", "attention"]
    assert [r["layer"] for r in summary] == [0, None, 1, 2]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["hidden_channels"].reverse(), "sorted ascending"),
        (lambda d: d["hidden_channels"].insert(1, 0), "appears twice"),
        (lambda d: d["hidden_channels"].append(48), "out of range"),
        (lambda d: d.update(hidden_channels=[]), "at least one"),
        (lambda d: d["layers"][0]["mlp_channels"].append(40), r"layers\[0\].mlp_channels: index 40 out of range"),
        (lambda d: d["layers"][2].update(attention_groups=[3]), r"layers\[2\].attention_groups: index 3"),
        (lambda d: d["layers"][1].update(attention_groups=[-1, 0]), "out of range"),
        (lambda d: d["layers"].pop(), "one entry per source layer"),
        (lambda d: d.update(layers=[{"attention_groups": [], "mlp_channels": []}] * 4), "removes every layer"),
        (lambda d: d.update(source_model_type="gpt2"), "differs from source_config"),
        (lambda d: d.update(format="dms_plan/9"), "unknown plan format"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("hidden_channels"), "missing hidden_channels"),
        (lambda d: d["layers"][0].update(heads=[0]), "exactly the keys"),
        (lambda d: d["layers"][0].update(mlp_channels="0,1"), "list of integers"),
    ],
)
def test_plan_validation_errors(tmp_path, edit, message):
    model = build("llama-gqa")
    d = PrunePlan.dense(model.config).to_dict()
    edit(d)
    path = tmp_path / "plan.json"
    import json

    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=message):
        PrunePlan.from_json(str(path))


def test_plan_errors_on_bad_json_and_wrong_model(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        PrunePlan.from_json(str(path))
    plan = PrunePlan.dense(build("llama-gqa").config)
    with pytest.raises(PlanError, match="different model"):
        prune_model(build("llama-gqa", hidden_size=60), plan)
    with pytest.raises(PlanError, match="plan is for"):
        prune_model(build("qwen2"), plan)
