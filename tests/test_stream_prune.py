"""`dms-llm prune`: pruning a checkpoint from its files, tensor by tensor, against the in-memory path.

The reference for every case of the parity table (every family of conftest.FAMILIES plus Llama with
biases, times every structure kind of test_prune) is what the library did before this module existed:
`from_pretrained` -> `prune_model` -> `save_pruned`. The streamed folder must be that folder, byte for byte
(every tensor's dtype, shape and bytes, then every file), and reload to the same logits.
"""

import hashlib
import json
import os
import weakref

import pytest
import torch
from conftest import input_ids, tiny_model, tiny_tokenizer
from test_prune import CASES, KINDS, build, make_plan

import dms_llm.checkpoints.stream_prune as sp
from dms_llm.commands import main as dms_llm
from dms_llm.checkpoints.loading import load_tokenizer
from dms_llm.modeling import register_auto_classes
from dms_llm.plan import LayerPlan, PrunePlan, count_plan_parameters
from dms_llm.prune import prune_model
from dms_llm.checkpoints import save_pruned
from dms_llm.checkpoints.stream_prune import prune_checkpoint
from dms_llm.checkpoints.weights import WEIGHTS_NAME, WeightFiles


def write_source(folder, model, dtype=torch.float32, max_shard_size="5GB", tokenizer=True):
    model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def in_memory(plan, source, out, dtype=None, **save_kwargs):
    """The reference: load, prune in memory, save (what the search and the baselines do)."""
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", attn_implementation="eager")
    pruned = prune_model(model, plan)
    save_pruned(pruned, load_tokenizer(source), str(out), plan, source_dir=source, **save_kwargs)
    return pruned


def tensors(folder):
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in f.keys():
                    out[key] = (name, f.get_tensor(key))
    return out


def digests(folder):
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def assert_same_checkpoint(got, want):
    """Every tensor identical (file, dtype, shape, bytes), then every file identical."""
    a, b = tensors(got), tensors(want)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for key, (file_b, tb) in b.items():
        file_a, ta = a[key]
        assert (file_a, ta.dtype, ta.shape) == (file_b, tb.dtype, tb.shape), key
        assert ta.contiguous().view(torch.uint8).equal(tb.contiguous().view(torch.uint8)), f"{key}: bytes differ"
    assert digests(got) == digests(want)


def reload_logits(folder, x):
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        return model(x).logits


# ----- equivalence with prune_model + save_pruned -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_streamed_checkpoint_is_the_in_memory_one_byte_for_byte(tmp_path, case, kind):
    model = build(case)
    plan = make_plan(model, kind)
    source = write_source(tmp_path / "src", model)
    pruned = in_memory(plan, source, tmp_path / "ref")
    out = prune_checkpoint(plan, source, str(tmp_path / "out"))
    assert_same_checkpoint(out, tmp_path / "ref")
    x = input_ids()
    with torch.no_grad():
        want = pruned(x).logits
    torch.testing.assert_close(reload_logits(out, x), want, rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["out", "ref", "src"]  # no temporary folder left


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2"])
def test_sharded_bf16_source_and_output(tmp_path, case, monkeypatch):
    """Sharded in, sharded out (same shard layout and index as save_pretrained), bf16 stays bf16, and at
    most one source tensor is alive at a time."""
    model = build(case)
    plan = make_plan(model, "all")
    source = write_source(tmp_path / "src", model, torch.bfloat16, max_shard_size="12KB")
    assert os.path.isfile(os.path.join(source, sp.INDEX_NAME))
    in_memory(plan, source, tmp_path / "ref", max_shard_size="10KB")

    alive, peak = [0], [0]
    real_read = WeightFiles.read

    def counting_read(self, name):
        t = real_read(self, name)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
        return t

    monkeypatch.setattr(WeightFiles, "read", counting_read)
    out = prune_checkpoint(plan, source, str(tmp_path / "out"), max_shard_size="10KB")
    assert peak[0] == 1 and alive[0] == 0
    index = json.load(open(os.path.join(out, sp.INDEX_NAME)))
    assert len(set(index["weight_map"].values())) > 2
    assert {t.dtype for _, t in tensors(out).values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    assert_same_checkpoint(out, tmp_path / "ref")


def test_dtype_option_casts_like_from_pretrained(tmp_path):
    model = build("llama-bias")
    plan = make_plan(model, "hidden")
    source = write_source(tmp_path / "src", model, torch.bfloat16)
    in_memory(plan, source, tmp_path / "ref", dtype=torch.float32)
    out = prune_checkpoint(plan, source, str(tmp_path / "out"), dtype="float32")
    assert {t.dtype for _, t in tensors(out).values()} == {torch.float32}
    assert_same_checkpoint(out, tmp_path / "ref")


@pytest.mark.parametrize("case", ["llama-gqa", "llama-bias"])
def test_plan_with_output_biases_from_its_sidecar_file(tmp_path, case):
    """FLAP-style plans add o_proj/down_proj biases (llama-gqa has none; llama-bias adds to its own)."""
    model = build(case)
    plan = make_plan(model, "all")
    g = torch.Generator().manual_seed(3)
    values = {f"{i}.{k}": torch.randn(model.config.hidden_size, generator=g) for i in (0, 2, 3) for k in ("attention", "mlp")}
    plan.output_bias, plan.output_bias_values = {"attention": True, "mlp": True}, values
    plan.params_after = count_plan_parameters(plan)
    plan.to_json(str(tmp_path / "dms_plan.json"))
    plan = PrunePlan.from_json(str(tmp_path / "dms_plan.json"))  # values from the sidecar file
    source = write_source(tmp_path / "src", model)
    in_memory(plan, source, tmp_path / "ref")
    out = prune_checkpoint(plan, source, str(tmp_path / "out"))
    assert any(k.endswith("down_proj.bias") for k in tensors(out))
    assert_same_checkpoint(out, tmp_path / "ref")


def test_tied_source_that_also_stores_lm_head_and_has_no_generation_config(tmp_path):
    """Some tied checkpoints carry lm_head.weight anyway; from_pretrained ignores it, so must pruning.
    Without generation_config.json, both paths derive the generation config from config.json."""
    from safetensors.torch import load_file, save_file

    model = build("llama-gqa")  # tied
    plan = make_plan(model, "uniform")
    source = write_source(tmp_path / "src", model)
    os.remove(os.path.join(source, "generation_config.json"))
    in_memory(plan, source, tmp_path / "ref")
    path = os.path.join(source, WEIGHTS_NAME)
    state = load_file(path)
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    save_file(state, path, metadata={"format": "pt"})
    out = prune_checkpoint(plan, source, str(tmp_path / "out"))
    assert "lm_head.weight" not in tensors(out)
    assert_same_checkpoint(out, tmp_path / "ref")


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    """A Hub id resolves to its snapshot in the Hugging Face cache (no network: the cache is built here)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    source = write_source(repo / "snapshots" / commit, build("mistral"), max_shard_size="20KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    plan = make_plan(build("mistral"), "sublayers")
    plan.source_model = "tiny-org/tiny-llama"
    in_memory(plan, source, tmp_path / "ref")
    prune_checkpoint(plan, "tiny-org/tiny-llama", str(tmp_path / "out"), max_shard_size="5GB")
    assert_same_checkpoint(tmp_path / "out", tmp_path / "ref")
    card = open(tmp_path / "out" / "README.md").read()
    assert "base_model: tiny-org/tiny-llama" in card


def dms_llm_prune(tmp_path, plan, model, *extra, out=None):
    path = tmp_path / "cli_plan.json"
    plan.to_json(str(path))
    return dms_llm(["prune", "--plan", str(path), "--model", model, "--output-dir", str(out or tmp_path / "out"), *extra])


def test_command_line_prints_the_counts_and_records_the_command(tmp_path, capsys):
    model = build("qwen2")
    plan = make_plan(model, "channels")
    source = write_source(tmp_path / "src", model)
    assert dms_llm_prune(tmp_path, plan, source) == 0
    printed = capsys.readouterr().out
    saved = PrunePlan.from_json(str(tmp_path / "out" / "dms_plan.json"))
    assert f"{saved.params_before:,} -> {saved.params_after:,}" in printed
    assert "dms-llm prune --plan" in open(tmp_path / "out" / "README.md").read()
    # --overwrite replaces a previous checkpoint
    assert dms_llm_prune(tmp_path, plan, source, "--overwrite") == 0


# ----- bad input: one line, nothing written -------------------------------------------------------------


BAD = ["other-model", "other-model-type", "missing-shard", "files-disagree-with-config", "output-taken",
       "output-inside-source", "missing-plan", "no-weights", "not-cached", "mixed-dtypes"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, capsys):
    model = tiny_model("llama-mha", num_hidden_layers=4)
    source = write_source(tmp_path / "src", model, max_shard_size="20KB")
    plan, out, name = make_plan(model, "all"), tmp_path / "out", source
    if case == "other-model":
        plan = make_plan(tiny_model("llama-mha", num_hidden_layers=4, intermediate_size=44), "all")
    elif case == "other-model-type":
        plan = make_plan(tiny_model("mistral", num_hidden_layers=4), "all")
    elif case == "missing-shard":
        index = json.load(open(os.path.join(source, sp.INDEX_NAME)))
        os.remove(os.path.join(source, sorted(set(index["weight_map"].values()))[1]))
    elif case == "files-disagree-with-config":  # config.json (and the plan made from it) say 44 channels
        config = json.load(open(os.path.join(source, "config.json")))
        config["intermediate_size"] = 44
        json.dump(config, open(os.path.join(source, "config.json"), "w"))
        plan = make_plan(tiny_model("llama-mha", num_hidden_layers=4, intermediate_size=44), "all")
    elif case == "output-taken":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "output-inside-source":
        out = tmp_path / "src" / "pruned"
    elif case == "no-weights":
        for f in os.listdir(source):
            if f.endswith((".safetensors", ".json")) and f != "config.json":
                os.remove(os.path.join(source, f))
    elif case == "not-cached":
        name = "nobody/nothing-here"
    elif case == "mixed-dtypes":  # which dtype would the pruned model have? --dtype says
        from safetensors.torch import load_file, save_file

        shard = os.path.join(source, json.load(open(os.path.join(source, sp.INDEX_NAME)))["weight_map"]["model.norm.weight"])
        state = load_file(shard)
        save_file({k: v.half() for k, v in state.items()}, shard, metadata={"format": "pt"})
    plan_path = tmp_path / "plan.json"
    plan.to_json(str(plan_path))
    if case == "missing-plan":
        os.remove(plan_path)
    before = digests(tmp_path)
    capsys.readouterr()
    code = dms_llm(["prune", "--plan", str(plan_path), "--model", name, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert digests(tmp_path) == before  # nothing written, no temporary folder left
    expected = {"other-model": "different model", "other-model-type": "plan is for", "missing-shard": "missing",
                "files-disagree-with-config": "do not match their config", "output-taken": "not empty",
                "output-inside-source": "source model folder", "missing-plan": "no such file",
                "no-weights": "no safetensors weights", "not-cached": "local Hugging Face cache",
                "mixed-dtypes": "mix dtypes ['F16', 'F32']; choose one with --dtype"}[case]
    assert expected in err, err


def test_plan_removing_layers_renumbers_them(tmp_path):
    model = build("llama-mha")
    plan = PrunePlan.dense(model.config)
    plan.layers[0] = LayerPlan([], [])
    plan.layers[2] = LayerPlan([], [])
    plan.params_after = count_plan_parameters(plan)
    source = write_source(tmp_path / "src", model)
    out = prune_checkpoint(plan, source, str(tmp_path / "out"))
    names = tensors(out)
    assert {k.split(".")[2] for k in names if k.startswith("model.layers.")} == {"0", "1"}
    assert torch.equal(names["model.layers.1.mlp.up_proj.weight"][1], model.model.layers[3].mlp.up_proj.weight)


def test_synthetic_checkpoint_script_and_its_plan(tmp_path):
    """eval/make_synthetic_checkpoint.py (the measurement's source) on a tiny shape: a sharded checkpoint
    that loads, a non-uniform plan at 80% of it, and the two pruning paths agree on it."""
    import make_synthetic_checkpoint as script  # eval/, on the tests' path (pyproject.toml)

    source, plan_path = str(tmp_path / "src"), str(tmp_path / "plan.json")
    assert script.main([source, "--shape", "tiny", "--max-shard-size", "100KB", "--plan", plan_path]) == 0
    assert len(json.load(open(os.path.join(source, sp.INDEX_NAME)))["weight_map"]) == 4 * 9 + 3
    plan = PrunePlan.from_json(plan_path)
    assert 0.79 < plan.params_after / plan.params_before <= 0.8 and not plan.is_uniform()
    in_memory(plan, source, tmp_path / "ref", max_shard_size="100KB")
    assert_same_checkpoint(prune_checkpoint(plan, source, str(tmp_path / "out"), max_shard_size="100KB"), tmp_path / "ref")


def test_a_dms_llama_checkpoint_is_pruned_again_from_its_files(tmp_path):
    """The per-layer format as the source (a pruned checkpoint pruned further), its remote-code classes
    registered locally, as a second search would do."""
    model = build("qwen2")
    first = prune_model(model, make_plan(model, "sublayers"))
    source = str(tmp_path / "src")
    save_pruned(first, tiny_tokenizer(), source, make_plan(model, "sublayers"))
    plan = PrunePlan.dense(first.config, source_model=source)
    plan.layers[2].mlp_channels = plan.layers[2].mlp_channels[:5]
    plan.hidden_channels = plan.hidden_channels[2:]
    plan.params_after = count_plan_parameters(plan)
    assert plan.source_model_type == "dms_llama"
    in_memory(plan, source, tmp_path / "ref")
    assert_same_checkpoint(prune_checkpoint(plan, source, str(tmp_path / "out")), tmp_path / "ref")


@pytest.mark.parametrize("select", ["plan", "reconstruction"])
def test_prune_with_refit_equals_the_in_memory_refit(tmp_path, select):
    from dms_llm.refit import refit_output_projections

    model = build("llama-gqa")
    plan = make_plan(model, "all")
    source = write_source(tmp_path / "src", model)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and {i}" for i in range(3000)))
    extra = ["--refit", "--refit-select", select, "--dataset", str(text), "--seq-len", "16", "--refit-samples", "8"]
    assert dms_llm_prune(tmp_path, plan, source, *extra) == 0
    from transformers import AutoModelForCausalLM

    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    saved_plan = PrunePlan.from_json(str(tmp_path / "out" / "dms_plan.json"))
    assert saved_plan.metadata["refit"]["select"] == select
    # the same refit in memory, on the same blocks
    from dms_llm.data import load_calibration

    blocks = load_calibration(str(text), load_tokenizer(str(tmp_path / "out")), 16, 8, seed=0, cache_dir=str(tmp_path / "cache"))
    reference_plan = PrunePlan.from_dict(plan.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(source).eval()  # the attention kernel the command loads with
    reference = prune_model(loaded, reference_plan)
    refit_output_projections(reference, loaded, reference_plan, blocks, select=select)
    assert [lp.mlp_channels for lp in saved_plan.layers] == [lp.mlp_channels for lp in reference_plan.layers]
    sliced = prune_model(model, plan)
    ids = input_ids()
    with torch.no_grad():
        got, want, plain = written(ids).logits, reference(ids).logits, sliced(ids).logits
    assert (got - plain).abs().max() > 1e-3  # the refit changed the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
