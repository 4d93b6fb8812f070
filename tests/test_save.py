"""save_pruned / update_model_card / push_to_hub: checkpoint format, both loading paths, folder safety.

The Hub is unreachable here: push_to_hub is checked with recording fakes of huggingface_hub's
create_repo/upload_folder (arguments) and with the real functions offline (the clear error).
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import input_ids, tiny_model
from test_prune import make_plan

import dms_llm.checkpoints.save as save_mod
from dms_llm.files import replace_folder
from dms_llm.modeling import register_auto_classes
from dms_llm.plan import PrunePlan
from dms_llm.prune import prune_model
from dms_llm.checkpoints import push_to_hub, save_pruned, update_model_card

HUB_ID = "HuggingFaceTB/SmolLM2-135M"


def tiny_tokenizer():
    """A character-level fast tokenizer inside the tiny models' 97-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789 .,?!'-:;":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def pruned_pair(family: str, kind: str):
    model = tiny_model(family, num_hidden_layers=4)
    plan = make_plan(model, kind)
    plan.source_model = HUB_ID
    return prune_model(model, plan), plan


def folder_digest(path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One non-uniform (dms_llama) and one uniform (stock) checkpoint, saved once for the module."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, family, kind in (("dms", "llama-gqa", "all"), ("stock", "qwen2", "uniform")):
        model, plan = pruned_pair(family, kind)
        info = {"license": "apache-2.0", "results": {"perplexity": {"wikitext2": 25.5}}}
        path = save_pruned(model, tiny_tokenizer(), str(root / name), plan, model_card_info=info)
        out[name] = (path, model, plan)
    return out


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids() if x is None else x).logits


# ----- format -------------------------------------------------------------------------------------------


def test_uniform_plan_saves_a_stock_checkpoint(saved):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    path, model, plan = saved["stock"]
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["model_type"] == "qwen2" and "auto_map" not in config
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 32 and config["head_dim"] == 8
    assert not [f for f in os.listdir(path) if f.endswith(".py")]
    files = set(os.listdir(path))
    assert {"model.safetensors", "generation_config.json", "dms_plan.json", "README.md", "tokenizer.json"} <= files
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert type(reloaded) is Qwen2ForCausalLM
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert PrunePlan.from_json(os.path.join(path, "dms_plan.json")).to_dict()["layers"] == plan.to_dict()["layers"]
    # (AutoTokenizer would pick Qwen2Tokenizer from model_type: a transformers rule, not a saving issue)
    from transformers import PreTrainedTokenizerFast

    assert PreTrainedTokenizerFast.from_pretrained(path)("Ab c")["input_ids"] == [4, 5, 40, 6]  # a, b, space, c


def test_non_uniform_plan_saves_dms_llama_with_remote_code(saved):
    from transformers import AutoModelForCausalLM

    path, model, plan = saved["dms"]
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["model_type"] == "dms_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dms_llama.DMSLlamaForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_dms_llama.DMSLlamaConfig"
    assert {"modeling_dms_llama.py", "configuration_dms_llama.py"} <= set(os.listdir(path))
    saved_plan = json.loads(open(os.path.join(path, "dms_plan.json")).read())
    assert saved_plan["params_after"] == sum(p.numel() for p in model.parameters())

    register_auto_classes()  # the local classes: no remote code, no trust prompt
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert type(reloaded).__module__.startswith("dms_llm.modeling")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path)("Ab c")["input_ids"] == [4, 5, 40, 6]
    assert reloaded.config.layer_num_key_value_heads == model.config.layer_num_key_value_heads
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)

    prompt = input_ids(batch=1, seq=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = reloaded.generate(prompt, use_cache=True, **kwargs)
    without_cache = reloaded.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape[1] == 13 and torch.equal(with_cache, without_cache)


def test_remote_code_loads_where_dms_llm_is_not_importable(saved, tmp_path):
    path, model, _ = saved["dms"]
    x = input_ids()
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dms_llm"] = None  # in case dms_llm is installed: the checkpoint alone must suffice
        try:
            import dms_llm
        except ImportError:
            pass
        else:
            raise SystemExit("dms_llm importable")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True, attn_implementation="eager")
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        tok = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)
        assert tok("Ab c")["input_ids"] == [4, 5, 40, 6]
        x = torch.load("x.pt")
        with torch.no_grad():
            torch.save(m(x).logits, "logits.pt")
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(m.generate(x[:1, :5], use_cache=True, **kw), m.generate(x[:1, :5], use_cache=False, **kw))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,  # a trust prompt would fail instead of hanging
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(model, x), rtol=0, atol=0)


def test_saved_tokenizer_carries_no_loader_arguments_and_a_stock_folder_needs_no_remote_code(tmp_path):
    from dms_llm.checkpoints.loading import load_tokenizer
    from dms_llm.hub import LOADER_ARGUMENTS

    tiny_tokenizer().save_pretrained(tmp_path / "source")
    tokenizer = load_tokenizer(str(tmp_path / "source"), local_files_only=True)  # as the commands load it offline
    assert {"local_files_only", "is_local"} <= set(tokenizer.init_kwargs)  # what transformers would save
    for name, family, kind in (("dms", "llama-gqa", "all"), ("stock", "llama-gqa", "uniform")):
        model, plan = pruned_pair(family, kind)
        path = save_pruned(model, tokenizer, str(tmp_path / name), plan)
        config = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
        assert not LOADER_ARGUMENTS & set(config), name
    assert {"local_files_only", "is_local"} <= set(tokenizer.init_kwargs)  # the caller's tokenizer is unchanged
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dms_llm"] = None
        from transformers import AutoTokenizer
        assert AutoTokenizer.from_pretrained({str(tmp_path / "stock")!r})("Ab c")["input_ids"] == [4, 5, 40, 6]
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "custom code" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_sharded_save_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = pruned_pair("mistral", "sublayers")
    path = save_pruned(model, None, str(tmp_path / "out"), plan, max_shard_size="20KB")
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(path)
    register_auto_classes()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")), logits(model), rtol=0, atol=0)


def test_saved_counts_are_the_true_ones(tmp_path):
    model, plan = pruned_pair("qwen2", "all")
    true_after = plan.params_after
    plan.params_after = 123
    with pytest.warns(UserWarning, match="params_after = 123"):
        path = save_pruned(model, None, str(tmp_path / "out"), plan)
    saved_plan = PrunePlan.from_json(os.path.join(path, "dms_plan.json"))
    assert saved_plan.params_after == true_after == sum(p.numel() for p in model.parameters())
    assert saved_plan.params_before == sum(p.numel() for p in tiny_model("qwen2", num_hidden_layers=4).parameters())


def test_save_refuses_a_model_that_does_not_match_the_plan(tmp_path):
    model, plan = pruned_pair("llama-mha", "all")
    other = make_plan(tiny_model("llama-mha", num_hidden_layers=4), "channels")
    with pytest.raises(ValueError, match="pruned with this plan"):
        save_pruned(model, None, str(tmp_path / "out"), other)
    assert not os.path.exists(tmp_path / "out")


# ----- model card ---------------------------------------------------------------------------------------


def front_matter(path):
    text = open(os.path.join(path, "README.md")).read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_model_card_metadata_tables_and_loading(saved):
    path, model, plan = saved["dms"]
    meta, text = front_matter(path)
    assert meta["base_model"] == HUB_ID and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"dms_llm", "pruned", "structured-pruning", "llama"} <= set(meta["tags"])
    assert f"{plan.params_after:,}" in text and f"{plan.params_before:,}" in text
    assert f"{plan.params_after / plan.params_before:.2%}" in text
    assert "trust_remote_code=True" in text and "import dms_llm" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(table) == 4  # one row per source layer
    assert "| 1 | removed | removed |" in text
    assert "| wikitext2 | 25.5 |" in text

    stock_meta, stock_text = front_matter(saved["stock"][0])
    assert "trust_remote_code" not in stock_text and "qwen2" in stock_meta["tags"]


def test_model_card_license_from_source_card_and_local_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# source\n")
    model, plan = pruned_pair("llama-gqa", "channels")
    plan.source_model = str(src)  # a local folder: no base_model can be claimed
    path = save_pruned(model, None, str(tmp_path / "out"), plan, source_dir=str(src))
    meta, _ = front_matter(path)
    assert meta["license"] == "mit" and "base_model" not in meta


def test_update_model_card_adds_then_replaces_evaluation(tmp_path):
    model, plan = pruned_pair("qwen2", "heads")
    path = save_pruned(model, None, str(tmp_path / "out"), plan)
    assert "Not evaluated yet." in open(os.path.join(path, "README.md")).read()
    update_model_card(path, {"perplexity": {"wikitext2": 30.0}})
    results = {
        "perplexity": {"wikitext2": 21.25, "ptb": 40.5},
        "zero_shot": {"arc_easy": {"acc": 0.5, "acc_norm": 0.625}, "boolq": {"acc": 0.75}},
    }
    update_model_card(path, results)
    text = open(os.path.join(path, "README.md")).read()
    assert text.count("## Evaluation") == 1 and "30.0" not in text
    assert "| wikitext2 | 21.25 |" in text and "| arc_easy | 0.5 | 0.625 |" in text and "| boolq | 0.75 |  |" in text
    assert not [f for f in os.listdir(path) if f.startswith(".")]  # no temp file left by the atomic rewrite


def test_model_card_renders_dms_eval_results_with_baseline(tmp_path):
    from dms_llm.evaluation import results_markdown

    model, plan = pruned_pair("llama-gqa", "heads")
    path = save_pruned(model, None, str(tmp_path / "out"), plan)
    dense = {"format": "dms_eval/1", "model": "dense", "params": 55776, "ppl": {"wikitext2": {"llm-pruner": 20.0}},
             "zero_shot": {}, "zero_shot_avg": None}  # fmt: skip
    pruned = dict(dense, model=path, params=plan.params_after, ppl={"wikitext2": {"llm-pruner": 23.5}})
    update_model_card(path, dict(pruned, baseline=dense))
    text = open(os.path.join(path, "README.md")).read()
    assert results_markdown([dense, pruned]).strip() in text and "23.50" in text
    assert '"versions"' not in text  # not the generic dump


# ----- output-folder safety -----------------------------------------------------------------------------


def test_refuses_non_empty_out_dir_without_overwrite(tmp_path):
    model, plan = pruned_pair("llama-mha", "heads")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pruned(model, None, str(out), plan)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "empty").mkdir()
    save_pruned(model, None, str(tmp_path / "empty"), plan)  # an empty folder is fine
    assert os.path.isfile(tmp_path / "empty" / "config.json")


def test_refuses_the_source_folder(tmp_path):
    source = tiny_model("llama-mha", num_hidden_layers=4)
    src = tmp_path / "models" / "src"
    source.save_pretrained(src)
    before = folder_digest(src)
    plan = make_plan(source, "heads")
    plan.source_model = str(src)
    model = prune_model(source, plan)
    for target in (src, src / "pruned", tmp_path / "models"):
        with pytest.raises(ValueError, match="source model folder"):
            save_pruned(model, None, str(target), plan, overwrite=True)
    # also through source_dir when the plan names a Hub id
    plan.source_model = HUB_ID
    with pytest.raises(ValueError, match="source model folder"):
        save_pruned(model, None, str(src), plan, overwrite=True, source_dir=str(src))
    assert folder_digest(src) == before
    assert sorted(os.listdir(tmp_path / "models")) == ["src"]


def old_checkpoint(out):
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "old.txt").write_text("old")


def test_overwrite_replaces_the_old_checkpoint(tmp_path):
    model, plan = pruned_pair("llama-mha", "heads")
    out = tmp_path / "out"
    old_checkpoint(out)
    save_pruned(model, None, str(out), plan, overwrite=True)
    assert "old.txt" not in os.listdir(out) and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or moved-aside folder left


def test_overwrite_never_deletes_a_folder_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    model, plan = pruned_pair("llama-mha", "heads")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not look like a model checkpoint"):
        save_pruned(model, None, str(tmp_path / "home"), plan, overwrite=True)
    old_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt" / "sub")
    with pytest.raises(FileExistsError, match="current working directory"):
        save_pruned(model, None, str(tmp_path / "ckpt"), plan, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine" and (tmp_path / "ckpt" / "old.txt").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_save_leaves_nothing_half_written(tmp_path, monkeypatch, overwrite):
    model, plan = pruned_pair("llama-mha", "all")
    out = tmp_path / "out"
    if overwrite:
        old_checkpoint(out)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing the model card")

    monkeypatch.setattr(save_mod, "render_model_card", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, None, str(out), plan, overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])
    if overwrite:
        assert sorted(os.listdir(out)) == ["config.json", "old.txt"]


def _fail_the_swap(monkeypatch):
    """The rename that moves the finished staging folder into place fails."""
    real_replace = os.replace

    def flaky(src, dst):
        if str(src).endswith(".saving"):
            raise OSError("simulated: the swap failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)


def test_failed_final_rename_restores_the_old_checkpoint(tmp_path, monkeypatch):
    model, plan = pruned_pair("llama-mha", "all")
    out = tmp_path / "out"
    old_checkpoint(out)
    _fail_the_swap(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_pruned(model, None, str(out), plan, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["config.json", "old.txt"]


def _run_folder(path, text):
    path.mkdir()
    (path / "log.txt").write_text(text)


def _fill_with(text):
    return lambda staging: _run_folder(Path(staging), text)


def test_replace_folder_swaps_and_puts_the_old_folder_back_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run_folder(out, "old")
    replace_folder(str(out), _fill_with("new"))
    assert sorted(os.listdir(tmp_path)) == ["run"] and (out / "log.txt").read_text() == "new"
    _fail_the_swap(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        replace_folder(str(out), _fill_with("newer"))
    monkeypatch.undo()
    assert (out / "log.txt").read_text() == "new" and not (tmp_path / "run.old").exists()


def test_replace_folder_recovers_a_run_killed_between_its_renames(tmp_path):
    """Only `run.old` left (the process died between the two renames): it is the run and must survive."""
    _run_folder(tmp_path / "run.old", "the only copy")
    _run_folder(tmp_path / "run.saving", "half written")
    seen = []
    replace_folder(str(tmp_path / "run"), lambda staging: (seen.append(
        (tmp_path / "run" / "log.txt").read_text()), _run_folder(Path(staging), "new")))
    assert seen == ["the only copy"]  # fill() saw the restored run
    assert sorted(os.listdir(tmp_path)) == ["run"] and (tmp_path / "run" / "log.txt").read_text() == "new"


# ----- Hub ----------------------------------------------------------------------------------------------


def test_push_to_hub_calls_create_repo_and_upload_folder(saved, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def fake_upload_folder(**kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    path = saved["dms"][0]
    assert push_to_hub(path, "me/tiny", private=True, token="hf_x") == "https://huggingface.co/me/tiny/commit/abc"
    (c_name, c_repo, c_kw), (u_name, u_repo, u_kw) = calls
    assert (c_name, c_repo, c_kw["private"], c_kw["exist_ok"], c_kw["token"]) == ("create_repo", "me/tiny", True, True, "hf_x")
    assert (u_name, u_repo, u_kw["folder_path"], u_kw["token"]) == ("upload_folder", "me/tiny", path, "hf_x")


@pytest.mark.parametrize("repo_id", ["me/tiny", "not a valid//repo id"])
def test_push_to_hub_offline_raises_clear_error_and_keeps_folder(saved, monkeypatch, repo_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = saved["dms"][0]
    before = folder_digest(path)
    with pytest.raises(RuntimeError, match="local checkpoint is kept") as err:
        push_to_hub(path, repo_id, token="hf_fake")
    assert path in str(err.value) and repo_id in str(err.value)
    assert folder_digest(path) == before


def test_push_to_hub_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="not a saved checkpoint"):
        push_to_hub(str(tmp_path), "me/tiny")


# ----- lm-eval on a saved non-uniform checkpoint (slow: a subprocess running the harness) --------------


@pytest.mark.slow
def test_lm_eval_cli_runs_on_a_saved_dms_llama_checkpoint(tmp_path):
    model, plan = pruned_pair("llama-gqa", "all")
    path = save_pruned(model, tiny_tokenizer(), str(tmp_path / "ckpt"), plan)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [
        {"question": "the cat sat on the", "choices": ["mat", "sky"], "label": 0},
        {"question": "one plus one is", "choices": ["two", "blue"], "label": 0},
        {"question": "water is", "choices": ["dry", "wet"], "label": 1},
        {"question": "fire is", "choices": ["hot", "cold"], "label": 0},
        {"question": "ice is", "choices": ["warm", "cold"], "label": 1},
    ]
    (tasks / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tasks / "tiny.yaml").write_text(
        textwrap.dedent(
            f"""
            task: dms_tiny_mc
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {tasks / 'tiny.jsonl'}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: "{{{{label}}}}"
            metric_list:
              - metric: acc
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))  # fmt: skip
    cmd = [
        "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={path},trust_remote_code=True,dtype=float32",
        "--include_path", str(tasks), "--tasks", "dms_tiny_mc", "--limit", "4",
        "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    found = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "results") for f in fs if f.endswith(".json")]
    assert found, proc.stdout[-2000:]
    results = json.loads(open(found[0]).read())["results"]["dms_tiny_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0
    n = json.loads(open(found[0]).read())["n-samples"]["dms_tiny_mc"]
    assert n["effective"] == 4
