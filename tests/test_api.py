"""The library's front door: prepare / step / plan / convert, search, DMSConfig, calibration from memory, and
the README's API section run as written (on a tiny model instead of SmolLM2)."""

import json
import os
import re

import pytest
import torch
from conftest import WORDS, save_tiny_checkpoint, tiny_model, tiny_tokenizer, write_corpus

import dms_llm
from dms_llm import DMSConfig, MinKept, RunSettings, Temperatures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(tmp_path, n=24, seq_len=32):
    corpus = write_corpus(tmp_path / "calib.jsonl")
    return dms_llm.load_calibration(corpus, tiny_tokenizer(), seq_len, n, cache_dir=str(tmp_path / "cache"))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----- DMSConfig -----------------------------------------------------------------------------------------


def _recipe(name: str) -> dict:
    """recipes/NAME.yaml as its raw keys and values."""
    import yaml

    with open(os.path.join(REPO, "recipes", name + ".yaml")) as f:
        return yaml.safe_load(f)


def test_config_defaults_are_the_recommended_recipes():
    """DMSConfig's defaults are the widths recipe (any model, any budget); the SmolLM2 default recipe differs only
    in searching the MLP widths alone (its heads are too coarse to search at 80%: docs/RESULTS.md 19) and in
    refitting on all 256 of its blocks (chosen on validation for its MLP-only plans, RESULTS 19)."""
    config, widths, default = DMSConfig(), _recipe("smollm2-135m-widths"), _recipe("smollm2-135m-default")
    assert config.structures == tuple(widths["prune"].split(",")) == ("heads", "channels", "hidden")
    assert default["prune"] == "channels"
    differ = ("prune", "target-ratio", "refit-samples")
    assert {k: v for k, v in default.items() if k not in differ} == {k: v for k, v in widths.items() if k not in differ}
    from dms_llm.refit import DEFAULT_BLOCKS

    assert default["refit-samples"] == default["num-samples"] > widths.get("refit-samples", DEFAULT_BLOCKS)
    assert (config.steps, config.align, config.ratio_lr, config.budget_weight, config.train_weights) == (
        widths["steps"], widths["align"], widths["ratio-lr"], widths["budget-weight"], widths["train-weights"])


def test_the_50_percent_recipe_is_the_widths_recipe_with_every_head_kept():
    """The benchmark's 50% search (recipes/smollm2-135m-heads-kept.yaml) differs from the widths recipe only in
    keeping the heads, in its 960 steps and in its refit's ridge term (docs/RESULTS.md 23, 28 and 29): a change to
    one recipe must reach the other."""
    widths, kept = _recipe("smollm2-135m-widths"), _recipe("smollm2-135m-heads-kept")
    assert kept["prune"] == "channels,hidden" and kept["steps"] == 960 and kept["target-ratio"] == 0.5
    assert kept["refit-alpha"] == 1e-5 and "refit-alpha" not in widths
    differ = ("prune", "steps", "refit-alpha")
    assert {k: v for k, v in kept.items() if k not in differ} == {k: v for k, v in widths.items() if k not in differ}


def test_baselines_align_as_the_search_does_by_default():
    import inspect

    from dms_llm.baselines import METHODS

    assert {name: inspect.signature(fn).parameters["align"].default for name, fn in METHODS.items()} == {
        name: DMSConfig().align for name in METHODS}


def test_config_round_trips_through_a_dict_and_json():
    changed = DMSConfig(target_params=12345, structures=("layers", "heads"), depth="block", spare_first=1, spare_last=2,
                        steps=7, ratio_lr=0.5, budget_weight=3.0, schedule_fraction=0.5, hold_budget=True,
                        fit_budget=False, warmup_blocks=3, train_weights="lora", weight_lr=0.1, lora_r=4, lora_alpha=9,
                        distill=True, distill_weight=0.3, distill_temperature=2.0, ema_decay=0.5,
                        temperature=Temperatures(2.0, 3.0, 5.0), single_element_temperature=7.0,
                        min_kept=MinKept(2, 1, 1), align=8)
    assert changed != DMSConfig()
    assert changed.structures == ("heads", "layers")  # canonical order
    assert DMSConfig.from_dict(changed.to_dict()) == changed
    assert DMSConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    assert DMSConfig.from_dict({"steps": 9}) == DMSConfig(steps=9)


# What dms_plan.json recorded as metadata["method"] before the config was typed: at 7e65a2f (comma text,
# all four structures, 200 steps) and at 45acd26 (no align, warm-up or hold_budget; align_to_budget).
OLD_RECORDS = {
    "7e65a2f": {"structures": "heads,channels,hidden,layers", "depth": "sublayer", "spare_first": 0, "spare_last": 0,
                "steps": 200, "ratio_lr": 0.01, "budget_weight": 2.0, "schedule_fraction": 0.8, "hold_budget": False,
                "fit_budget": True, "warmup_blocks": 0, "train_weights": "none", "weight_lr": 0.0001, "lora_r": 8,
                "lora_alpha": 16, "distill": False, "distill_weight": 1.0, "distill_temperature": 1.0,
                "ema_decay": 0.99, "temperature": {"channel": 1.0, "head": 4.0, "layer": 4.0},
                "single_element_temperature": 8.0, "min_kept": {"channel": 1, "head": 0, "layer": 0}, "align": 32},
    "45acd26": {"structures": "heads,channels", "depth": "block", "spare_first": 0, "spare_last": 1, "steps": 50,
                "ratio_lr": 0.01, "budget_weight": 2.0, "schedule_fraction": 0.8, "align_to_budget": False,
                "train_weights": "lora", "weight_lr": 0.0001, "lora_r": 8, "lora_alpha": 16, "distill": True,
                "distill_weight": 1.0, "distill_temperature": 1.0, "ema_decay": 0.99,
                "temperature": {"channel": 1.0, "head": 4.0, "layer": 4.0}, "single_element_temperature": 8.0,
                "min_kept": {"channel": 1, "head": 0, "layer": 0}},
}


@pytest.mark.parametrize("commit", sorted(OLD_RECORDS))
def test_plans_written_before_the_typed_config_still_load(tmp_path, commit):
    plan = dms_llm.PrunePlan.dense(tiny_model().config, source_model="tiny")
    plan.metadata = {"method": OLD_RECORDS[commit], "target_params": 1000}
    plan.to_json(str(tmp_path / "dms_plan.json"))
    config = DMSConfig.from_plan(dms_llm.PrunePlan.from_json(str(tmp_path / "dms_plan.json")))
    old = OLD_RECORDS[commit]
    assert config.structures == tuple(old["structures"].split(","))
    assert (config.steps, config.depth, config.train_weights) == (old["steps"], old["depth"], old["train_weights"])
    assert config.fit_budget is old.get("fit_budget", old.get("align_to_budget"))
    assert config.align == old.get("align", 1)  # a plan from before alignment kept exact widths
    assert config.temperature == Temperatures(**old["temperature"])


def test_a_plan_without_a_search_record_says_so():
    plan = dms_llm.PrunePlan.dense(tiny_model().config, source_model="tiny")
    plan.metadata = {"method": "flap"}
    with pytest.raises(ValueError, match="records no DMS method"):
        DMSConfig.from_plan(plan)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(structures="heads,channels"), TypeError, "tuple"),
    (dict(structures=("heads", "widths")), ValueError, "widths"),
    (dict(temperature={"channel": 1.0, "head": 4.0, "layer": 4.0}), TypeError, "Temperatures"),
    (dict(target_ratio=0.8, target_params=100), ValueError, "one of"),
    (dict(target_ratio=1.2), ValueError, "target_ratio"),
    (dict(target_params=0.5), ValueError, "target_params"),
    (dict(align=0), ValueError, "align"),
])
def test_bad_config_fails_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        DMSConfig(**kwargs)


def test_unknown_keys_fail_to_load():
    with pytest.raises(ValueError, match="stepz"):
        DMSConfig.from_dict({"stepz": 3})


# ----- prepare / step / plan / convert -------------------------------------------------------------------


def test_a_custom_loop_searches_to_the_budget_and_leaves_the_model_as_it_was(tmp_path):
    model, blocks = tiny_model(), _blocks(tmp_path)
    before = _state(model)
    searcher = dms_llm.prepare(model, DMSConfig(target_ratio=0.6, steps=12, align=1))
    assert any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    seen = [searcher.step(blocks[i : i + 2]) for i in range(0, 24, 2)]
    assert [m["step"] for m in seen] == list(range(1, 13)) and seen[-1]["phase"] == "refine"
    assert seen[-1]["params"] < seen[0]["params"]  # the budget term pulls the architecture down
    plan = searcher.plan()
    assert searcher.plan() is plan
    dense = sum(p.numel() for p in model.parameters())
    assert plan.params_after <= plan.metadata["target_params"] == int(0.6 * dense)
    assert plan.metadata["method"] == DMSConfig(target_ratio=0.6, steps=12, align=1).to_dict()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(RuntimeError, match="ended"):
        searcher.step(blocks[:1])
    pruned = dms_llm.convert(model, plan)
    assert dms_llm.plan_of(pruned) is plan and sum(p.numel() for p in pruned.parameters()) == plan.params_after
    out = dms_llm.save_pruned(pruned, tiny_tokenizer(), str(tmp_path / "out"))
    assert dms_llm.PrunePlan.from_json(os.path.join(out, "dms_plan.json")).layers == plan.layers


def test_steps_in_your_loop_are_the_search_loop_given_the_same_batches(tmp_path):
    """`step(batch)` is the search's own step: fed the blocks `search` draws (a function of seed and step),
    it reaches the same plan with the same loss at every step; fed another order, the losses differ."""
    blocks = _blocks(tmp_path)
    config = DMSConfig(target_ratio=0.5, steps=8, align=1, structures=("heads", "channels", "hidden", "layers"))
    model = tiny_model()
    with dms_llm.prepare(model, config, RunSettings(batch_size=2), run_dir=str(tmp_path / "run")) as searcher:
        searcher.run(blocks)
        reference = searcher.plan()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["task_loss"] for line in f]

    def custom(order):
        searcher = dms_llm.prepare(tiny_model(), config, RunSettings(batch_size=2))
        return [searcher.step(blocks[order(searcher, step)])["task_loss"] for step in range(8)], searcher.plan()

    same, plan = custom(lambda s, step: s.engine.batch_indices(step, 0, len(blocks)))
    assert same == losses and plan.layers == reference.layers and plan.hidden_channels == reference.hidden_channels
    other, _ = custom(lambda s, step: [2 * step, 2 * step + 1])
    assert other != losses


def test_search_changes_nothing_global_and_checks_the_plan_only_when_asked(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    import dms_llm.training.searcher as searcher_module

    blocks = _blocks(tmp_path)
    model = tiny_model()  # seeds the global generator itself: the state to keep is the one after it
    state, rng = AcceleratorState._shared_state, torch.get_rng_state()
    built = []
    # the check slices the pruned layers from the model as they run (no pruned copy): count the readers made
    real_reader = searcher_module.pruned_tensor_reader
    monkeypatch.setattr(searcher_module, "pruned_tensor_reader", lambda *a: built.append(a) or real_reader(*a))
    config = DMSConfig(target_ratio=0.6, steps=4, align=1, train_weights="lora")
    plan = dms_llm.search(model, blocks, config, verbose=False)
    assert built == [] and "masked_vs_pruned_max_abs_logit_diff" not in plan.metadata
    assert torch.equal(torch.get_rng_state(), rng)  # LoRA was initialised on a forked generator
    assert AcceleratorState._shared_state is state
    checked = dms_llm.search(tiny_model(), blocks, config, check=True, verbose=False)
    assert len(built) == 1 and checked.metadata["masked_vs_pruned_max_abs_logit_diff"] < 1e-4
    assert checked.layers == plan.layers  # the same seed, the same LoRA start, the same search


def test_lora_starts_from_the_run_seed():
    """The search does not read the caller's generator: the same RunSettings.seed gives the same LoRA start
    whatever the global seed, another seed another one."""
    from dms_llm.training.searcher import Searcher

    def lora_a(global_seed, seed):
        torch.manual_seed(global_seed)
        s = Searcher(tiny_model(), DMSConfig(target_ratio=0.8, train_weights="lora", align=1), RunSettings(seed=seed))
        weights = [p.detach().clone() for n, p in s.model.named_parameters() if "lora_A" in n]
        s.close()
        return torch.cat([w.flatten() for w in weights])

    assert torch.equal(lora_a(1, 0), lora_a(2, 0)) and not torch.equal(lora_a(1, 0), lora_a(1, 1))


@pytest.mark.parametrize("batch, message", [
    (torch.arange(10), "1-d"),
    ({"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])},
     "padded"),
    (torch.ones(2, 8), "float"),
])
def test_bad_batches_fail_before_any_step(batch, message):
    with dms_llm.prepare(tiny_model(), DMSConfig(target_ratio=0.8, align=1)) as searcher:
        with pytest.raises(ValueError, match=message):
            searcher.step(batch)
        assert searcher.steps_done == 0


def test_a_mapping_batch_is_its_input_ids():
    ids = torch.randint(3, 90, (2, 8))
    metrics = []
    for batch in (ids, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        with dms_llm.prepare(tiny_model(), DMSConfig(target_ratio=0.8, align=1)) as searcher:
            metrics.append(searcher.step(batch)["task_loss"])
    assert metrics[0] == metrics[1]


def test_prepare_needs_a_budget_and_close_restores_the_model():
    model = tiny_model()
    with pytest.raises(ValueError, match="no budget"):
        dms_llm.prepare(model, DMSConfig())
    before = _state(model)
    with dms_llm.prepare(model, DMSConfig(target_ratio=0.8, train_weights="lora", align=1)) as searcher:
        searcher.step(torch.randint(3, 90, (1, 8)))
        assert any("lora" in n for n, _ in model.named_modules())
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_save_pruned_without_a_plan_needs_a_model_that_carries_one(tmp_path):
    with pytest.raises(ValueError, match="carries no plan"):
        dms_llm.save_pruned(tiny_model(), tiny_tokenizer(), str(tmp_path / "out"))


def test_convert_reads_a_plan_file(tmp_path):
    model = tiny_model()
    plan = dms_llm.PrunePlan.dense(model.config)
    plan.layers[0].mlp_channels = plan.layers[0].mlp_channels[:8]
    plan.params_after = None
    plan.to_json(str(tmp_path / "dms_plan.json"))
    pruned = dms_llm.convert(model, str(tmp_path / "dms_plan.json"))
    assert pruned.model.layers[0].mlp.down_proj.weight.shape[1] == 8
    with pytest.raises(TypeError, match="PrunePlan"):
        dms_llm.convert(model, {"layers": []})


# ----- calibration from memory ---------------------------------------------------------------------------


def _texts(n=30, words=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=g)) for _ in range(n)]


def test_calibration_from_a_list_a_dataset_and_a_file_agree(tmp_path):
    import datasets

    texts, tok = _texts(), tiny_tokenizer()
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    from_list = dms_llm.load_calibration(texts, tok, 16, 20, seed=3)
    from_dataset = dms_llm.load_calibration(datasets.Dataset.from_dict({"body": texts}), tok, 16, 20, seed=3,
                                            text_field="body")
    from_file = dms_llm.load_calibration(path, tok, 16, 20, seed=3, text_field="body", cache_dir=str(tmp_path / "c"))
    assert from_list.shape == (20, 16) and torch.equal(from_list, from_dataset) and torch.equal(from_list, from_file)
    assert not torch.equal(from_list, dms_llm.load_calibration(texts, tok, 16, 20, seed=4))


@pytest.mark.parametrize("data, kwargs, error, message", [
    (["fine", 3], {}, TypeError, "strings"),
    ([], {}, ValueError, "no text"),
    (["w1 w2"] * 3, {}, ValueError, "num_samples"),
])
def test_bad_texts_fail_clearly(data, kwargs, error, message):
    with pytest.raises(error, match=message):
        dms_llm.load_calibration(data, tiny_tokenizer(), 16, 20, **kwargs)


def test_a_dataset_without_the_text_column_fails_clearly():
    import datasets

    with pytest.raises(ValueError, match="no 'text' column"):
        dms_llm.load_calibration(datasets.Dataset.from_dict({"body": _texts()}), tiny_tokenizer(), 16, 4)


# ----- the README's API section, as written ---------------------------------------------------------------


def _readme_api_blocks() -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_api_runs_as_documented(tmp_path, monkeypatch, shared_data):
    """The six-line path, then the custom loop, exactly as the README shows them; only the model is a tiny
    one (loading SmolLM2 and 240 of its steps take minutes). The six lines refit what they save."""
    model_dir = save_tiny_checkpoint(tmp_path / "model", "llama-gqa")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load_tiny(name):
        assert name == "smollm2-135m"
        return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)

    monkeypatch.setattr(dms_llm, "load_model_and_tokenizer", load_tiny)
    monkeypatch.setenv("DMS_DATA_DIR", shared_data)
    monkeypatch.setenv("DMS_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    six_lines, custom_loop = _readme_api_blocks()[:2]
    assert len([line for line in six_lines.splitlines() if line and not line.startswith("import")]) == 6
    scope = {}
    exec(six_lines, scope)
    plan, dense = scope["plan"], sum(p.numel() for p in scope["model"].parameters())
    assert plan.metadata["method"]["steps"] == 240 and plan.params_after <= int(0.8 * dense)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "smol80")
    assert sum(p.numel() for p in saved.parameters()) == plan.params_after
    sliced = dms_llm.convert(scope["model"], plan).state_dict()
    refit = {name for name, w in saved.state_dict().items() if not torch.equal(w, sliced[name])}
    assert refit and {name.rsplit(".", 2)[-2] for name in refit} <= {"o_proj", "down_proj"}  # what was saved, refit
    exec(custom_loop, scope)
    assert scope["plan"] is not plan and scope["plan"].params_after <= int(0.8 * dense)
    assert dms_llm.plan_of(scope["pruned"]) is scope["plan"]
