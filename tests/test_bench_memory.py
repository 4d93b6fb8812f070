"""eval/bench_memory.py (peak memory and step time per search-step kind, per-layer extrapolation) and the
shape/variant options of eval/bench_overhead.py, on a tiny Llama shape."""

import json
import os

import bench_memory as bm  # eval/, on the tests' path (pyproject.toml)
import pytest

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61,
        "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture
def tiny_shape(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate refuses a second mixed-precision setting in one process; a measuring process is fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_fit_linear_is_exact_on_a_line():
    a, b = bm.fit_linear([1, 2], [3.5 - 1.25, 3.5 - 2.5])
    assert a == pytest.approx(3.5) and b == pytest.approx(-1.25)
    a, b = bm.fit_linear([1, 2, 4], [10 + 7 * x for x in (1, 2, 4)])
    assert (a, b) == (pytest.approx(10), pytest.approx(7))
    with pytest.raises(ValueError):
        bm.fit_linear([2, 2], [1, 3])


def test_extrapolation_fits_two_depths_and_checks_the_third(tiny_shape):
    def cell(depth, peak, step):
        c = bm.make_cell(tiny_shape, "frozen", False, 1, 16, depth)
        return {**c, "peak_bytes": peak, "step_s": step, "layer_weight_bytes": 100, "outside_weight_bytes": 40,
                "load1_before_step": [0.5]}

    a, b, c, d = 1000.0, 250.0, 2.0, 3.0
    cells = {bm.cell_key(x): x for x in (cell(L, a + b * L, c + d * L) for L in (1, 2, 4))}
    cells["broken"] = {**bm.make_cell(tiny_shape, "frozen", False, 1, 16, 3), "error": "killed"}
    (row,) = bm.extrapolations(cells)
    assert row["fit_depths"] == [1, 2]
    assert (row["mem_a"], row["mem_b"], row["time_c"], row["time_d"]) == tuple(pytest.approx(x) for x in (a, b, c, d))
    (check,) = row["checks"]
    assert check["depth"] == 4 and check["peak_error"] == pytest.approx(0) and check["time_error"] == pytest.approx(0)
    assert check["full_peak_error"] == pytest.approx(0)
    # a third depth off the line: 100 bytes more at L4 is a slope 50 bytes/layer steeper, 200 more at L6
    cells[bm.cell_key(cell(4, 0, 0))]["peak_bytes"] = a + b * 4 + 100
    (check,) = bm.extrapolations(cells)[0]["checks"]
    assert check["peak_error"] == pytest.approx((a + b * 4) / (a + b * 4 + 100) - 1)
    assert check["full_peak_error"] == pytest.approx(-200 / (a + b * 6))
    assert row["full_depth"] == TINY["num_hidden_layers"]
    assert row["full_peak_bytes"] == pytest.approx(a + b * 6) and row["full_step_s"] == pytest.approx(c + d * 6)
    assert row["activation_bytes_per_layer"] == pytest.approx(b - 100)
    assert row["full_weight_bytes"] == 40 + 100 * 6


def test_gpu_plan_adds_margin_and_context_and_shards_weights():
    assert bm.gpu_bytes(10 * bm.GIB) == pytest.approx(10 * bm.GIB * (1 + bm.ALLOCATOR_MARGIN) + bm.CUDA_CONTEXT_GIB * bm.GIB)
    assert bm.smallest_gpu(30e9) == 40 and bm.smallest_gpu(500e9) is None
    row = {"full_peak_bytes": 150e9, "full_weight_bytes": 140e9, "layer_weight_bytes": 1e9, "outside_weight_bytes": 4e9}
    # the shard, the root unit gathered (3/4 of it lives elsewhere), two gathered layers, the rest unsharded
    assert bm.fsdp_per_gpu_bytes(row, 4) == pytest.approx(140e9 / 4 + 3e9 + 2e9 + 10e9)


def _row(shape, kind, ckpt, batch, seq, peak, weights, layer, outside):
    return {"group": bm.group_key(bm.make_cell(shape, kind, ckpt, batch, seq, 0)), "full_peak_bytes": peak,
            "full_weight_bytes": weights, "layer_weight_bytes": layer, "outside_weight_bytes": outside, "full_step_s": 60.0}


def test_recipe_plan_shards_only_frozen_recipes_and_counts_gpus():
    recipes = {
        "big-frozen": {"cell": bm.make_cell("llama-2-70b", "frozen_distill", True, 1, 512, 0), "structures": "heads",
                       "fsdp": True, "processes": 8},
        "big-lora": {"cell": bm.make_cell("llama-2-70b", "lora_distill", True, 1, 512, 0), "structures": "heads",
                     "fsdp": False, "processes": 1},
        "small": {"cell": bm.make_cell("llama-2-7b", "lora_distill", True, 4, 512, 0), "structures": "heads",
                  "fsdp": False, "processes": 1},
        "unmeasured": {"cell": bm.make_cell("llama-2-7b", "frozen", True, 4, 512, 0), "structures": "heads",
                       "fsdp": False, "processes": 1},
    }
    rows = [_row("llama-2-70b", "frozen_distill", True, 1, 512, 150e9, 140e9, 1e9, 4e9),
            _row("llama-2-70b", "lora_distill", True, 1, 512, 150e9, 140e9, 1e9, 4e9),
            _row("llama-2-7b", "lora_distill", True, 4, 512, 20e9, 14e9, 0.4e9, 1e9)]
    plans = {p["recipe"]: p for p in bm.recipe_plan(rows, recipes)}
    assert set(plans) == {"big-frozen", "big-lora", "small"}
    big = plans["big-frozen"]
    assert big["gpu_bytes"] == pytest.approx(bm.gpu_bytes(150e9)) and big["single_gpu_gb"] is None
    assert big["per_gpu_bytes"] == pytest.approx(bm.gpu_bytes(140e9 / 8 + 3.5e9 + 2e9 + 10e9))
    # 2 GPUs: 70 + 2 + 2 + 10 = 84 GB of tensors, too much for 80 GB; 3: 46.7 + 2.7 + 2 + 10 = 61.3 GB
    assert big["fewest_gpus"] == 3 and big["fewest_per_gpu_bytes"] == pytest.approx(bm.gpu_bytes(140e9 / 3 + 4e9 * 2 / 3 + 12e9))
    assert plans["big-lora"]["fewest_gpus"] is None  # LoRA cannot be sharded by --fsdp
    assert plans["small"]["fewest_gpus"] == 1 and plans["small"]["single_gpu_gb"] == 24
    assert "at least 3 GPUs of 80 GB" in bm.recipe_header(big) and "8 processes" in bm.recipe_header(big)
    assert "cannot shard" in bm.recipe_header(plans["big-lora"])
    assert "one GPU of 24 GB or more" in bm.recipe_header(plans["small"])


def test_every_large_recipe_is_planned_from_the_search_options():
    recipes = bm.large_recipes()
    large = {f[: -len(".yaml")] for f in os.listdir(bm.RECIPE_DIR) if f.startswith("llama") and f.endswith(".yaml")}
    assert set(recipes) == large and large
    for name, r in recipes.items():
        c = r["cell"]
        if name.startswith("llama-2-70b"):
            assert (c["shape"], c["kind"], r["fsdp"], r["processes"]) == ("llama-2-70b", "frozen_distill", True, 8)
        else:
            assert c["kind"] == "lora_distill" and not r["fsdp"] and r["processes"] == 1
        assert c["ckpt"] and c["seq"] == 512 and r["mixed_precision"] == "bf16"
    assert recipes["llama-7b-5.47b"]["cell"]["shape"] == "llama-2-7b" and recipes["llama-7b-5.47b"]["structures"] == "heads,channels"


def test_the_llama_7b_alias_has_the_measured_7b_shape():
    same = ("layer_params", "outside_params", "layers", "params")
    assert {k: bm.shape_facts("llama-7b")[k] for k in same} == {k: bm.shape_facts("llama-2-7b")[k] for k in same}


def test_every_large_recipe_header_states_the_plan_of_the_measured_cells():
    plans = bm.recipe_plan(bm.extrapolations(bm.load_results(bm.DEFAULT_RESULTS)["cells"]))
    assert {p["recipe"] for p in plans} == set(bm.large_recipes())
    for p in plans:
        with open(os.path.join(bm.RECIPE_DIR, p["recipe"] + ".yaml")) as f:
            header = "".join(line for line in f if line.startswith("#"))
        assert bm.recipe_header(p) + "\n" in header, (p["recipe"], bm.recipe_header(p))


def test_step_flops_grow_per_layer_and_with_the_kind(tiny_shape):
    f = [bm.step_flops(tiny_shape, "frozen", False, 1, 16, L) for L in (1, 2, 3)]
    assert f[2] - f[1] == pytest.approx(f[1] - f[0]) and f[1] > f[0]
    assert bm.step_flops(tiny_shape, "lora_distill", False, 1, 16, 2) > f[1]
    assert bm.step_flops(tiny_shape, "frozen", True, 1, 16, 2) > f[1]


def test_shape_facts_match_the_real_models():
    assert bm.shape_facts("llama-2-7b")["params"] == 6_738_415_616
    assert bm.shape_facts("llama-3-8b")["params"] == 8_030_261_248
    assert bm.shape_facts("llama-2-70b")["params"] == 68_976_648_192


@pytest.mark.parametrize("kind,ckpt", [("frozen", False), ("lora_distill", True), ("frozen_distill", False)])
def test_measure_cell_runs_each_step_kind(tiny_shape, kind, ckpt, fresh_accelerate_state):
    cell = bm.make_cell(tiny_shape, kind, ckpt, 2, 16, 2)
    r = bm.measure_cell(cell, steps=2)
    for field in ("peak_bytes", "setup_rss_bytes", "weight_bytes", "outside_weight_bytes", "layer_weight_bytes",
                  "trainable_params", "optimizer_state_bytes", "step_s", "step_s_all", "load1_before_step", "flops"):
        assert field in r, field
    assert r["depth"] == 2 and r["kind"] == kind and len(r["step_s_all"]) == 2 and r["step_s"] > 0
    assert r["peak_bytes"] >= 0 and r["peak_reset"] is True
    assert r["weight_bytes"] == r["outside_weight_bytes"] + 2 * r["layer_weight_bytes"]
    assert r["optimizer_state_bytes"] >= 8 * r["trainable_params"]  # AdamW: two fp32 moments per parameter
    ratios = len(bm.search_masks(bm.shape_config(tiny_shape, 2), bm.STRUCTURES, 0.9).ratio_parameters())
    lora = 2 * bm.shape_facts(tiny_shape)["lora_params_per_layer"] if kind == "lora_distill" else 0
    assert r["trainable_params"] == ratios + lora  # the search's LoRA: r=8 on all seven projections
    assert (r["saved_activation_bytes"] is None) == ckpt
    if not ckpt:
        assert r["saved_activation_bytes"] > 0
    json.dumps(r)  # what the worker prints must be JSON


def test_run_caches_cells_and_reports(tiny_shape, tmp_path, capsys):
    results = str(tmp_path / "results.json")
    args = ["run", "--shapes", tiny_shape, "--kinds", "frozen", "--ckpt", "off", "--seq-lens", "16", "--depths", "1",
            "--results", results]
    assert bm.main(args) == 0  # one fresh measuring process
    data = json.load(open(results))
    (key,) = data["cells"]
    cell = data["cells"][key]
    assert "error" not in cell, cell
    assert cell["depth"] == 1 and cell["threads"] == 1 and len(cell["time_runs"]) == 1
    capsys.readouterr()
    assert bm.main(args) == 0  # cached: nothing to measure
    assert "0 of 1 cells to measure" in capsys.readouterr().out
    assert bm.main(["report", "--results", results]) == 0
    printed = capsys.readouterr().out
    assert "| frozen | off | 1x16 | 1 |" in printed
    output = tmp_path / "reports" / "memory.md"  # a folder that does not exist yet
    assert bm.main(["report", "--results", results, "--output", str(output)]) == 0
    assert output.read_text() + "\n" == capsys.readouterr().out  # the same Markdown as printed (print adds a newline)


def test_merge_timing_keeps_every_run_and_reports_the_fastest():
    old = {"step_s": 5.0, "time_runs": [{"step_s": 5.0, "load1": [3.0], "at": "t0"}]}
    new = {"step_s": 4.0, "step_cpu_s": 3.0, "load1_before_step": [1.0], "measured_at": "t1", "peak_bytes": 7}
    merged = bm.merge_timing(old, new)
    assert merged["step_s"] == 4.0 and merged["step_cpu_s"] == 3.0 and len(merged["time_runs"]) == 2
    assert merged["peak_bytes"] == 7 and merged["best_load1"] == [1.0]
    # a run with less wall time but more CPU time (a quieter machine, a slower step) does not replace it
    slower = bm.merge_timing(merged, {**new, "step_s": 3.5, "step_cpu_s": 3.2, "measured_at": "t2"})
    assert (slower["step_s"], slower["step_cpu_s"], slower["step_s_newest"]) == (4.0, 3.0, 3.5)
    assert len(slower["time_runs"]) == 3


def test_bench_overhead_frozen_variant_at_a_reduced_depth(tiny_shape):
    import bench_overhead

    row = bench_overhead.bench(None, "float32", 1, 16, 2, "heads,channels,hidden,layers", "cpu", tiny_shape, layers=2,
                               variants=("train", "frozen", "search"))
    assert row["layers"] == 2
    for key in ("plain_s", "masked_s", "ratio", "plain_frozen_s", "masked_frozen_s", "frozen_ratio", "search_step_s",
                "search_throughput_ratio"):
        assert row[key] > 0, key
    assert set(row["times_s"]) == {"plain", "masked", "plain_frozen", "masked_frozen", "search"}


def test_bench_overhead_frozen_plain_step_backpropagates_through_every_layer(tiny_shape):
    import torch

    import bench_overhead

    model = bench_overhead.load(None, tiny_shape, "float32", torch.device("cpu"), layers=2)
    model.requires_grad_(True)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_full_backward_hook(lambda m, gi, go: seen.append(True))
    bench_overhead.frozen_step_timer(model, ids)()
    handle.remove()
    assert seen  # the first layer got an input gradient
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def test_named_shapes_resolve_and_unknown_ones_fail():
    import bench_overhead

    assert bench_overhead.shape_config("llama-3-8b", layers=2).num_hidden_layers == 2
    with pytest.raises(SystemExit, match="known: .*llama-2-70b"):
        bench_overhead.shape_path("llama-9b")


def test_overhead_rows_extrapolate_to_the_full_depth():
    def row(layers, plain, masked):
        return {"shape": "llama-2-7b", "layers": layers, "batch": 1, "seq_len": 512, "reps": 3, "plain_cpu_s": plain,
                "masked_cpu_s": masked, "ratio_cpu": masked / plain, "ratio": 1.0, "load1_before": 1, "load1_after": 1}

    # plain = 4 + 10 L, masked = 4 + 11 L: per layer 1.1, at 32 layers (4 + 352) / (4 + 320)
    over = {"a": row(1, 14.0, 15.0), "b": row(2, 24.0, 26.0)}
    (line,) = bm.overhead_extrapolation(over)
    assert f"train {356 / 324:.3f} (per layer 1.100)" in line
    text = bm.report({"cells": {}, "overhead": over})
    assert "| llama-2-7b | 2 | 1x512 | 3 |" in text
    assert "**1.083** | - | - | - | no | - |" in text and "**1.071** | - | - | - | no | - |" in text  # over the 1.05 goal
    over["b"]["cpu_times_s"] = {"plain": [24.0, 23.0, 25.0], "masked": [26.0, 26.0, 26.0]}
    assert "| no | 8.3% |" in bm.report({"cells": {}, "overhead": over})  # (25 - 23) / 24
    over["a"] = row(1, 14.0, 14.5)
    assert "**1.036** | - | - | - | yes | - |" in bm.report({"cells": {}, "overhead": over})
