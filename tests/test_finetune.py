"""The fine-tuning command end to end on tiny pruned checkpoints made by the real pipeline (masks ->
plan -> prune_model -> save_pruned), through its command-line entry point."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SHARED_DATA, WORDS, input_ids, save_tiny_checkpoint, tiny_model, tiny_tokenizer, write_corpus

from dms_llm.cli.finetune import main, parse_config
from dms_llm.runs.finetune import FinetuneConfig, load_recipe, resolve_steps, reusable_results
from dms_llm.training.engine import distillation_loss, has_checkpoint
from dms_llm.training.recovery import RecoveryConfig, lr_at, recover

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prune_and_save(dense_dir, out, uniform: bool, seed: int):
    from transformers import AutoModelForCausalLM

    from dms_llm.masks import ModelMasks
    from dms_llm.prune import prune_model
    from dms_llm.checkpoints import save_pruned

    model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    structures = ("heads", "channels", "hidden") if uniform else ("heads", "channels", "hidden", "layers")
    masks = ModelMasks(model.config, structures=structures)
    g = torch.Generator().manual_seed(seed)
    for name, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        if uniform:  # the same kept counts everywhere, hidden a multiple of the heads: a stock config
            topk.ratio.data.fill_(0.6 if topk.kind == "channel" and name != "hidden" else 0.67)
        else:
            topk.ratio.data.fill_(0.67 if topk.kind == "layer" else float(torch.rand((), generator=g)) * 0.7 + 0.3)
    plan = masks.to_plan(model.config, source_model=dense_dir)
    assert plan.uses_stock_format() == uniform
    if not uniform:  # some layer lacks a sublayer, so LoRA must cope with missing projections
        assert any(lp.removed or not (lp.attention_groups and lp.mlp_channels) for lp in plan.layers)
    return save_pruned(prune_model(model, plan), tiny_tokenizer(), str(out), plan)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    dense = save_tiny_checkpoint(root / "dense", "llama-gqa")
    return {
        "root": root,
        "dense": dense,
        "dms": _prune_and_save(dense, root / "dms", uniform=False, seed=3),
        "stock": _prune_and_save(dense, root / "stock", uniform=True, seed=4),
        "corpus": write_corpus(root / "corpus.jsonl"),
    }


def _args(model, out, corpus, *extra, steps=6):
    length = ["--steps", str(steps)] if steps is not None else []  # None: the length comes from `extra`
    return ["--model", str(model), "--dataset", corpus, "--output-dir", str(out), "--seq-len", "32",
            "--num-samples", "8", *length, "--checkpoint-every", "2", "--no-eval", *extra]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


@pytest.fixture(scope="module")
def lora_runs(ckpts):
    """One LoRA run per checkpoint format on a single fixed block (the loss must fall on it)."""
    runs = {}
    for kind in ("dms", "stock"):
        out = ckpts["root"] / f"lora-{kind}"
        args = _args(ckpts[kind], out, ckpts["corpus"], "--num-samples", "1", "--lr", "1e-2", "--lora-dropout", "0",
                     "--warmup-steps", "0", "--distill-weight", "0", steps=12)
        assert main(args) == 0
        runs[kind] = str(out)
    return runs


@pytest.mark.parametrize("kind", ["dms", "stock"])
def test_lora_loss_falls_on_a_fixed_batch(lora_runs, kind):
    losses = [m["task_loss"] for m in _metrics(lora_runs[kind])]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.2, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses  # falling nearly every step
    summary = json.load(open(os.path.join(lora_runs[kind], "finetune_summary.json")))
    assert summary["method"] == "lora" and summary["teacher"] is None and summary["steps"] == 12
    assert not os.path.exists(os.path.join(lora_runs[kind], "finetune_state"))  # gone once the run is done


@pytest.mark.parametrize("kind", ["dms", "stock"])
def test_merged_model_keeps_the_format_and_equals_the_lora_model(ckpts, lora_runs, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, pruned = lora_runs[kind], ckpts[kind]
    summary = json.load(open(os.path.join(out, "finetune_summary.json")))
    assert summary["merge_max_abs_diff"] < 1e-5
    # same format and plan as the pruned checkpoint
    cfg_out, cfg_in = (json.load(open(os.path.join(d, "config.json"))) for d in (out, pruned))
    assert cfg_out["model_type"] == cfg_in["model_type"] == ("dms_llama" if kind == "dms" else "llama")
    assert ("auto_map" in cfg_out) == (kind == "dms")
    plan_out, plan_in = (json.load(open(os.path.join(d, "dms_plan.json"))) for d in (out, pruned))
    assert plan_out["layers"] == plan_in["layers"] and plan_out["hidden_channels"] == plan_in["hidden_channels"]
    assert plan_out["metadata"]["finetune"]["method"] == "lora"
    card = open(os.path.join(out, "README.md")).read()
    assert "## Fine-tuning" in card and "LoRA" in card and "12 (" in card

    # the merged, saved, reloaded model == the pruned base + the (unmerged) saved adapter
    x = input_ids(vocab=90)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(pruned).eval()
    before = _logits(base, x)
    lora = PeftModel.from_pretrained(base, os.path.join(out, "lora_adapter")).eval()
    torch.testing.assert_close(_logits(merged, x), _logits(lora, x), rtol=0, atol=1e-5)
    assert (_logits(merged, x) - before).abs().max() > 1e-3  # training changed the model
    assert sum(p.numel() for p in merged.parameters()) == plan_in["params_after"]


def test_remote_code_reload_where_dms_llm_is_not_importable(lora_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    path = lora_runs["dms"]
    x = input_ids(vocab=90)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dms_llm"] = None  # the checkpoint alone must suffice
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        with torch.no_grad():
            torch.save(m(torch.load("x.pt")).logits, "logits.pt")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    here = _logits(AutoModelForCausalLM.from_pretrained(path).eval(), x)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt").float(), here, rtol=0, atol=1e-6)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state and refuses a second mixed-precision setting in the same
    process (a command-line run is a fresh process); reset it as accelerate's own test case does."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_mixed_precision_trains_in_autocast_but_merges_and_saves_at_full_precision(ckpts, tmp_path, fresh_accelerate_state):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(_args(ckpts["dms"], out, ckpts["corpus"], "--mixed-precision", "bf16", "--lr", "1e-2", steps=2)) == 0
    summary = json.load(open(out / "finetune_summary.json"))
    assert summary["merge_max_abs_diff"] < 1e-5  # both sides in fp32, not autocast against fp32
    x = input_ids(vocab=90)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(merged.parameters()).dtype == torch.float32
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpts["dms"]).eval(), str(out / "lora_adapter")).eval()
    torch.testing.assert_close(_logits(merged, x), _logits(lora, x), rtol=0, atol=1e-5)


def test_full_finetuning_with_distillation_and_before_after_evaluation(ckpts, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    args = _args(ckpts["stock"], out, ckpts["corpus"], "--method", "full", "--lr", "1e-3", "--gradient-checkpointing", steps=3)
    if os.path.isdir(SHARED_DATA):
        args = [a for a in args if a != "--no-eval"] + ["--eval-ppl", "wikitext2", "--eval-max-windows", "2", "--data-dir", SHARED_DATA]
    assert main(args) == 0
    summary = json.load(open(out / "finetune_summary.json"))
    assert summary["method"] == "full" and summary["teacher"] == ckpts["dense"] and summary["merge_max_abs_diff"] is None
    assert summary["trainable_params"] == summary["params"]
    assert all(m["distill_loss"] > 0 for m in _metrics(out))
    assert not (out / "lora_adapter").exists()
    new, old = load_file(out / "model.safetensors"), load_file(os.path.join(ckpts["stock"], "model.safetensors"))
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.model_type == "llama" and torch.isfinite(_logits(reloaded, input_ids(vocab=90))).all()
    if os.path.isdir(SHARED_DATA):
        results = json.load(open(out / "results.json"))
        assert results["baseline"]["params"] == results["params"] == summary["params"]  # before/after, same model size
        assert results["ppl"]["wikitext2"]["llm-pruner"] != results["baseline"]["ppl"]["wikitext2"]["llm-pruner"]
        assert "Evaluation" in open(out / "README.md").read() and (out / "results.md").exists()
        assert summary["results"]["ppl"] == results["ppl"]


def test_distillation_term_is_zero_for_the_same_model_and_positive_otherwise(ckpts, tmp_path):
    x = torch.randn(2, 7, 97)
    assert distillation_loss(x, x.clone(), 2.0).item() == 0.0
    assert distillation_loss(x, x + torch.randn(2, 7, 97), 2.0).item() > 0
    # through the command: the pruned model as its own teacher, then the dense model as the teacher
    assert main(_args(ckpts["dms"], tmp_path / "self", ckpts["corpus"], "--teacher", ckpts["dms"], steps=2)) == 0
    kd = [m["distill_loss"] for m in _metrics(tmp_path / "self")]
    assert kd[0] == 0.0 and kd[1] > 0  # identical before the first update, different after it
    assert main(_args(ckpts["dms"], tmp_path / "dense", ckpts["corpus"], steps=1)) == 0  # teacher: the plan's source
    assert _metrics(tmp_path / "dense")[0]["distill_loss"] > 1e-4


def test_resume_after_stop_equals_an_uninterrupted_run(ckpts, tmp_path):
    from safetensors.torch import load_file

    common = ("--lora-dropout", "0.1", "--lr", "5e-3", "--grad-accum", "2")  # dropout: the RNG must be restored too
    assert main(_args(ckpts["dms"], tmp_path / "a", ckpts["corpus"], *common)) == 0
    assert main(_args(ckpts["dms"], tmp_path / "b", ckpts["corpus"], *common, "--stop-after", "3")) == 3
    assert len(_metrics(tmp_path / "b")) == 3 and has_checkpoint(tmp_path / "b" / "finetune_state")
    assert not (tmp_path / "b" / "config.json").exists()
    # a changed setting that the checkpoint depends on is refused, and leaves the checkpoint alone
    assert main(_args(ckpts["dms"], tmp_path / "b", ckpts["corpus"], *common, "--lora-r", "4", "--resume")) == 2
    assert main(_args(ckpts["dms"], tmp_path / "b", ckpts["corpus"], *common, "--resume")) == 0
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(_metrics(tmp_path / "a")) == strip(_metrics(tmp_path / "b"))
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_continue_from_a_shorter_run_equals_the_longer_run(ckpts, tmp_path, capsys):
    """A 6-step run, and a 3-step run kept with --keep-state then continued to 6 steps: the same metrics and
    bit-identical weights (the 3-step weights differ, so the continuation trained). A run that cannot be
    continued is refused before anything is written."""
    from safetensors.torch import load_file

    common = ("--lora-dropout", "0.1", "--lr", "5e-3", "--grad-accum", "2", "--warmup-steps", "2")  # dropout: the RNG too
    assert main(_args(ckpts["dms"], tmp_path / "whole", ckpts["corpus"], *common)) == 0
    assert main(_args(ckpts["dms"], tmp_path / "short", ckpts["corpus"], *common, "--keep-state", steps=3)) == 0
    assert has_checkpoint(tmp_path / "short" / "finetune_state") and not (tmp_path / "whole" / "finetune_state").exists()
    assert main(_args(ckpts["dms"], tmp_path / "cont", ckpts["corpus"], *common, "--continue-from", str(tmp_path / "short"))) == 0
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert len(_metrics(tmp_path / "cont")) == 6 and strip(_metrics(tmp_path / "cont")) == strip(_metrics(tmp_path / "whole"))
    whole, short, cont = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "short", "cont"))
    assert any(not torch.equal(whole[k], short[k]) for k in whole)
    assert whole.keys() == cont.keys() and all(torch.equal(whole[k], cont[k]) for k in whole)
    summary, first = (json.load(open(tmp_path / d / "finetune_summary.json")) for d in ("cont", "short"))
    assert summary["continued_at_step"] == 3 and summary["train_time_s"] > first["train_time_s"]
    assert summary["loss_first"] == pytest.approx(json.load(open(tmp_path / "whole" / "finetune_summary.json"))["loss_first"])
    capsys.readouterr()
    refused = {"not kept": (tmp_path / "whole", ()), "another lr": (tmp_path / "short", ("--lr", "1e-3")),
               "another warmup": (tmp_path / "short", ("--warmup-steps", "1")),
               "cosine": (tmp_path / "short", ("--schedule", "cosine")), "longer source": (tmp_path / "short", ("--steps", "2"))}
    says = {"not kept": "kept no training state", "another lr": "--lr 0.005 (now 0.001)", "another warmup": "--warmup-resolved 2 (now 1)",
            "cosine": "--schedule constant in both runs", "longer source": "trained 3 steps, more than this run's 2"}
    for case, (source, extra) in refused.items():
        out = tmp_path / case.replace(" ", "-")
        assert main(_args(ckpts["dms"], out, ckpts["corpus"], *common, *extra, "--continue-from", str(source))) == 2, case
        assert says[case] in capsys.readouterr().err and not out.exists(), case


def _shuffled_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(reversed(WORDS))})  # same tokens, other ids
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tree(*folders):
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                found[path] = os.path.getmtime(path)
    return found


CASES = {
    "missing-model": "does not exist",
    "no-plan": "dms_plan.json",
    "vocab-size-mismatch": "vocab_size",
    "tokenizer-mismatch": "tokenizers of the teacher",
    "missing-data": "nope.jsonl",
    "empty-data": "empty",
    "existing-output": "--overwrite",
    "overwrite-foreign-folder": "refusing to --overwrite",
    "output-inside-pruned": "inside the pruned checkpoint folder",
    "output-inside-teacher": "inside the teacher folder",
    "output-contains-pruned": "contains the pruned checkpoint folder",
    "resume-without-checkpoint": "no checkpoint",
    "steps-and-epochs": "not both",
    "steps-and-max-tokens": "not both --steps and --max-tokens",
    "ce-weight-0-without-teacher": "--ce-weight 0",
    "bad-schedule": "--schedule must be constant or cosine",
    "bad-recipe-key": "learning_rate",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_early_error_and_writes_nothing(ckpts, tmp_path, case, capsys):
    model, corpus, out = ckpts["dms"], ckpts["corpus"], tmp_path / "out"
    extra = []
    if case == "missing-model":
        model = str(tmp_path / "no-such-model")
    elif case == "no-plan":
        model = ckpts["dense"]
    elif case == "vocab-size-mismatch":
        extra = ["--teacher", save_tiny_checkpoint(tmp_path / "teacher", "llama-gqa", vocab_size=120)]
    elif case == "tokenizer-mismatch":
        teacher = str(tmp_path / "teacher")
        shutil.copytree(ckpts["dense"], teacher)
        _shuffled_tokenizer().save_pretrained(teacher)
        extra = ["--teacher", teacher]
    elif case == "missing-data":
        corpus = str(tmp_path / "nope.jsonl")
    elif case == "empty-data":
        corpus = str(tmp_path / "empty.jsonl")
        open(corpus, "w").close()
    elif case in ("existing-output", "overwrite-foreign-folder"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        extra = ["--overwrite"] if case == "overwrite-foreign-folder" else []
    elif case == "output-inside-pruned":
        out = os.path.join(model, "ft")
    elif case == "output-inside-teacher":
        out = os.path.join(ckpts["dense"], "ft")
    elif case == "output-contains-pruned":
        out = ckpts["root"]
    elif case == "resume-without-checkpoint":
        extra = ["--resume"]
    elif case == "steps-and-epochs":
        extra = ["--epochs", "1"]
    elif case == "steps-and-max-tokens":
        extra = ["--max-tokens", "1000"]
    elif case == "ce-weight-0-without-teacher":
        extra = ["--ce-weight", "0", "--distill-weight", "0"]
    elif case == "bad-schedule":
        extra = ["--schedule", "linear"]
    elif case == "bad-recipe-key":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("steps: 3\nlearning_rate: 1\n")
        extra = ["--config", str(recipe)]
    before = _tree(tmp_path, ckpts["root"])
    assert main(_args(model, out, corpus, *extra)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert CASES[case] in err.strip().splitlines()[-1]
    assert _tree(tmp_path, ckpts["root"]) == before  # nothing created, changed or removed
    if case in ("existing-output", "overwrite-foreign-folder"):
        assert os.listdir(out) == ["keep.txt"]


def test_overwrite_replaces_a_previous_run(ckpts, tmp_path):
    out = tmp_path / "out"
    assert main(_args(ckpts["stock"], out, ckpts["corpus"], "--distill-weight", "0", steps=2)) == 0
    (out / "stale.txt").write_text("old")
    assert main(_args(ckpts["stock"], out, ckpts["corpus"], "--distill-weight", "0", "--overwrite", steps=3)) == 0
    assert not (out / "stale.txt").exists() and len(_metrics(out)) == 3


def test_options_recipe_and_epochs():
    recipe = os.path.join(REPO, "recipes", "finetune", "smollm2-135m-recover.yaml")
    values = load_recipe(recipe)
    cfg = FinetuneConfig(**{"model": "/tmp/pruned", "output_dir": "/tmp/out", **values})
    assert cfg.method == "lora" and cfg.distill_weight > 0 and cfg.dataset == "default"
    cfg = parse_config(["--config", recipe, "--model", "/tmp/p", "--output-dir", "/tmp/o", "--epochs", "0.5"])
    assert cfg.steps is None and cfg.epochs == 0.5  # the command line's length replaces the recipe's
    assert resolve_steps(cfg, 1) == -(-cfg.num_samples // (2 * cfg.batch_size * cfg.grad_accum))
    cfg = parse_config(["--model", "p", "--output-dir", "o", "--num-samples", "8", "--batch-size", "2", "--epochs", "2"])
    assert resolve_steps(cfg, 1) == 8 and resolve_steps(cfg, 2) == 4 and cfg.lr == 2e-4
    assert parse_config(["--model", "p", "--output-dir", "o", "--method", "full"]).lr == 2e-5


def test_pruned_results_are_reused_as_the_before_row_only_when_comparable(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = tmp_path / "pruned"
    shutil.copytree(ckpts["stock"], pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned)
    params = sum(p.numel() for p in model.parameters())
    results = {"model": str(pruned), "params": params, "dtype": "float32", "max_windows": 320, "limit": None,
               "ppl": {"wikitext2": {"llm-pruner": 80.0}}, "zero_shot": {}, "baseline": {"params": 10**6}}
    (pruned / "results.json").write_text(json.dumps(results))
    base = ["--model", str(pruned), "--output-dir", "o", "--eval-max-windows", "320"]
    reused = reusable_results(str(pruned), parse_config(base), model)
    assert reused["ppl"] == results["ppl"] and "baseline" not in reused and reused["reused_from"].endswith("results.json")
    for other in (["--eval-max-windows", "100"], ["--eval-ppl", "wikitext2,ptb"], ["--eval-protocol", "sparsegpt"],
                  ["--eval-tasks", "boolq"]):
        assert reusable_results(str(pruned), parse_config(base + other), model) is None, other


@pytest.mark.slow
def test_two_processes_through_the_script(ckpts, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "dms_llm", "finetune.py"), *_args(ckpts["dms"], out, ckpts["corpus"], steps=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(out / "finetune_summary.json"))
    assert summary["num_processes"] == 2 and summary["merge_max_abs_diff"] < 1e-5
    assert len(_metrics(out)) == 4  # one writer: each step logged once


def test_the_card_tells_the_command_the_plan_records_then_this_one(ckpts, tmp_path):
    """The pruning command comes from the pruned checkpoint's plan (`PlanRecord.command`), not from its README:
    a card edited by hand changes nothing."""
    pruned = tmp_path / "pruned"
    shutil.copytree(ckpts["stock"], pruned)
    plan = json.load(open(pruned / "dms_plan.json"))
    plan["metadata"]["command"] = "dms-llm search --target-ratio 0.6 --output-dir runs/a"
    (pruned / "dms_plan.json").write_text(json.dumps(plan))
    card = (pruned / "README.md").read_text()
    (pruned / "README.md").write_text(card + "\n## How it was made\n\n```bash\ndms-llm search --edited-by-hand\n```\n")
    out = tmp_path / "out"
    assert main(_args(pruned, out, ckpts["corpus"], "--distill-weight", "0", steps=2)) == 0
    command = json.load(open(out / "dms_plan.json"))["metadata"]["command"]
    first, then, this = command.split("\n")
    assert first == "dms-llm search --target-ratio 0.6 --output-dir runs/a" and then == "# then"
    assert this.startswith("dms-llm finetune --model " + str(pruned))
    card = (out / "README.md").read_text()
    assert command in card and "--edited-by-hand" not in card


def test_lr_at_warmup_then_constant_or_cosine_to_the_floor():
    constant = RecoveryConfig(steps=50, lr=1e-3, warmup_steps=4)
    assert [lr_at(constant, s) for s in range(6)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3])
    assert lr_at(constant, 49) == 1e-3  # constant to the end, as before the schedule existed
    cosine = RecoveryConfig(steps=50, lr=1e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.2)
    lrs = [lr_at(cosine, s) for s in range(50)]
    assert lrs[:4] == [lr_at(constant, s) for s in range(4)]  # the same warmup ramp
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.2e-3)  # peak after the warmup, floor at the end
    assert all(b < a for a, b in zip(lrs[4:], lrs[5:]))  # strictly decreasing after the warmup
    no_warmup = RecoveryConfig(steps=3, lr=1.0, schedule="cosine", min_lr_ratio=0.0)
    assert [lr_at(no_warmup, s) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])


def test_max_tokens_sets_the_steps_and_replaces_the_recipe_length():
    cfg = parse_config(["--model", "p", "--output-dir", "o", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "3",
                        "--max-tokens", "1000"])
    assert resolve_steps(cfg, 1) == 6 and resolve_steps(cfg, 2) == 3  # ceil(1000 / 192), ceil(1000 / 384)
    cfg.max_tokens = 192 * 5
    assert resolve_steps(cfg, 1) == 5  # an exact multiple: no extra step
    recipe = os.path.join(REPO, "recipes", "finetune", "smollm2-135m-recover.yaml")
    cfg = parse_config(["--config", recipe, "--model", "p", "--output-dir", "o", "--max-tokens", "512"])
    assert cfg.steps is None and resolve_steps(cfg, 1) == 2  # the command line's length replaces the recipe's steps
    for bad in (["--max-tokens", "0"], ["--epochs", "1", "--max-tokens", "9"], ["--min-lr-ratio", "1.5"], ["--ce-weight", "-1"]):
        with pytest.raises(ValueError):
            parse_config(["--model", "p", "--output-dir", "o", *bad])


def test_max_tokens_with_cosine_schedule_resumes_exactly(ckpts, tmp_path):
    """--max-tokens 300 with 2 x 32-token micro-batches a step: 5 steps (320 tokens), the last at the cosine floor;
    stopped after 2 and resumed, the same run; another budget (other steps) cannot resume it."""
    common = ("--max-tokens", "300", "--grad-accum", "2", "--schedule", "cosine", "--warmup-steps", "1", "--lr", "1e-3",
              "--lora-dropout", "0", "--distill-weight", "0")
    assert main(_args(ckpts["stock"], tmp_path / "a", ckpts["corpus"], *common, steps=None)) == 0
    summary = json.load(open(tmp_path / "a" / "finetune_summary.json"))
    assert summary["steps"] == 5 and summary["tokens"] == 320 and summary["max_tokens"] == 300
    assert [m["lr"] for m in _metrics(tmp_path / "a")] == pytest.approx([5e-4, 1e-3, 7.75e-4, 3.25e-4, 1e-4])
    card = (tmp_path / "a" / "README.md").read_text()
    assert "cosine decay to 0.1" in card and "320 tokens" in card
    assert main(_args(ckpts["stock"], tmp_path / "b", ckpts["corpus"], *common, "--stop-after", "2", steps=None)) == 3
    for changed in (("--max-tokens", "500"), ("--schedule", "constant"), ("--ce-weight", "0.5")):  # refused: another run
        assert main(_args(ckpts["stock"], tmp_path / "b", ckpts["corpus"], *common, *changed, "--resume", steps=None)) == 2
    assert main(_args(ckpts["stock"], tmp_path / "b", ckpts["corpus"], *common, "--resume", steps=None)) == 0
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(_metrics(tmp_path / "a")) == strip(_metrics(tmp_path / "b"))


def test_ce_weight_reaches_the_loss(ckpts, tmp_path):
    """The pruned model as its own teacher: with --ce-weight 0 the loss is KL between identical distributions,
    so the first step's gradient is zero (up to rounding: the KL's gradient is a difference of two equal
    softmaxes); with the default weight 1 the cross-entropy gives one."""
    norms = {}
    for weight in ("0", "1"):
        out = tmp_path / weight
        assert main(_args(ckpts["dms"], out, ckpts["corpus"], "--teacher", ckpts["dms"], "--ce-weight", weight,
                          "--method", "full", steps=1)) == 0
        (m,) = _metrics(out)
        assert m["distill_loss"] == 0.0 and m["task_loss"] > 1  # the task loss is still reported, unweighted
        norms[weight] = m["grad_norm"]
        assert m["loss"] == (0.0 if weight == "0" else m["task_loss"])
    assert norms["0"] < 1e-6 * norms["1"] and norms["1"] > 0.1, norms
    with pytest.raises(ValueError, match="ce_weight 0"):  # the library call refuses a loss of nothing, too
        recover(tiny_model(), input_ids(2, 8), RecoveryConfig(steps=1, ce_weight=0.0))
