"""The search command end to end on a tiny saved checkpoint, through its command-line entry point."""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import SHARED_DATA, input_ids, save_tiny_checkpoint, write_corpus

from dms_llm.cli.search import main
from dms_llm.training.engine import has_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model", "llama-gqa")
    corpus = write_corpus(tmp_path / "calib.jsonl")
    return model_dir, corpus, tmp_path


def _args(model_dir, corpus, out, *extra, steps=6):
    return ["--model", model_dir, "--dataset", corpus, "--output-dir", str(out), "--seq-len", "32",
            "--num-samples", "16", "--steps", str(steps), "--checkpoint-every", "2", "--no-eval", "--align", "1", *extra]


def _read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_search_prunes_to_budget_saves_and_reloads(setup):
    from transformers import AutoModelForCausalLM

    model_dir, corpus, tmp = setup
    out = tmp / "out"
    eval_args = ["--eval-ppl", "wikitext2", "--eval-max-windows", "2", "--data-dir", SHARED_DATA]
    args = [a for a in _args(model_dir, corpus, out, "--target-ratio", "0.6") if a != "--no-eval"]
    assert main(args + (eval_args if os.path.isdir(SHARED_DATA) else ["--no-eval"])) == 0
    summary = json.load(open(out / "search_summary.json"))
    plan = json.load(open(out / "dms_plan.json"))
    assert summary["params"] <= summary["target_params"] == int(0.6 * summary["dense_params"])
    assert summary["params"] == plan["params_after"]
    assert summary["parity_max_abs_diff"] < 1e-4  # binarised masks == physically pruned model
    metrics = _read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all({"loss", "params", "task_loss", "budget_loss"} <= set(m) for m in metrics)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == summary["params"]
    assert torch.isfinite(reloaded(input_ids(vocab=90)).logits).all()
    assert not os.path.exists(out / "search_state")  # the resume checkpoint goes once the run is done
    if importlib.util.find_spec("tensorboard"):  # optional: logged when installed (the dev extra installs it)
        assert glob.glob(str(out / "tensorboard" / "events.out.tfevents*"))
    if os.path.isdir(SHARED_DATA):
        results = json.load(open(out / "results.json"))
        assert results["params"] == summary["params"] and "wikitext2" in results["ppl"]
        assert results["baseline"]["params"] == summary["dense_params"]


def test_a_search_that_misses_its_budget_warns_before_the_final_cut(setup, capsys):
    model_dir, corpus, tmp = setup
    out = tmp / "out"
    # a budget weight of ~0 leaves the ratios where the task loss wants them: the final fit must cut it all
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.5", "--budget-weight", "1e-9")) == 0
    summary = json.load(open(out / "search_summary.json"))
    assert summary["params"] <= summary["target_params"] < summary["params_before_fit"]
    assert "WARNING: the search ended" in capsys.readouterr().out

    out2 = tmp / "out2"  # a search that follows its schedule ends at the target: no warning
    assert main(_args(model_dir, corpus, out2, "--target-ratio", "0.9", "--budget-weight", "5")) == 0
    summary = json.load(open(out2 / "search_summary.json"))
    assert summary["params_before_fit"] - summary["target_params"] <= 0.02 * summary["dense_params"]
    assert "WARNING: the search ended" not in capsys.readouterr().out


def test_hold_budget_freezes_the_hidden_width_and_pulls_the_count_back_up_in_the_refine_phase(setup):
    model_dir, corpus, tmp = setup
    # a heavy budget term drives the tiny model far under its target before the refine phase (the last 8 of 40
    # steps); the one-sided term then lets it drift further down
    args = ["--target-ratio", "0.6", "--budget-weight", "20", "--ratio-lr", "0.05"]
    refine = {}
    for hold in (False, True):
        out = tmp / f"hold-{hold}"
        assert main(_args(model_dir, corpus, out, *args, *(["--hold-budget"] if hold else []), steps=40)) == 0
        metrics = _read_metrics(out)
        refine[hold] = [m for m in metrics if m["phase"] == "refine"]
        target = metrics[0]["target_params"]
        assert len(refine[hold]) == 8 and refine[hold][0]["params"] < target
    assert refine[False][-1]["params"] < refine[False][0]["params"]
    counts = [m["params"] for m in refine[True]]
    assert counts == sorted(counts) and counts[-1] > counts[0]  # back up towards the budget, never away from it
    assert len({m["hidden_kept"] for m in refine[True]}) == 1  # the coarse hidden width no longer moves


def test_resume_equals_uninterrupted_run(setup):
    model_dir, corpus, tmp = setup
    common = ("--target-ratio", "0.5", "--train-weights", "lora", "--distill")
    assert main(_args(model_dir, corpus, tmp / "a", *common)) == 0
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--stop-after", "3")) == 3
    assert len(_read_metrics(tmp / "b")) == 3 and has_checkpoint(tmp / "b" / "search_state")
    with open(tmp / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a process killed in the middle of a line
    config_path = tmp / "b" / "search_config.json"
    config = json.load(open(config_path))
    del config["align"]  # a run that did not record align searched exact widths (align 1, as these runs do)
    config_path.write_text(json.dumps(config))
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--resume")) == 0
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(_read_metrics(tmp / "a")) == strip(_read_metrics(tmp / "b"))
    plan_a, plan_b = (json.load(open(tmp / d / "dms_plan.json")) for d in "ab")
    assert plan_a["layers"] == plan_b["layers"] and plan_a["hidden_channels"] == plan_b["hidden_channels"]


def test_seed_makes_runs_repeatable_and_seeds_differ(setup):
    model_dir, corpus, tmp = setup
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(_args(model_dir, corpus, tmp / name, "--target-ratio", "0.5", "--seed", seed)) == 0
    losses = {n: [m["task_loss"] for m in _read_metrics(tmp / n)] for n in "abc"}
    assert losses["a"] == losses["b"] and losses["a"] != losses["c"]


@pytest.mark.parametrize("case", ["existing-output", "budget-too-small", "budget-above-dense", "missing-data",
                                  "empty-data", "unsupported-architecture", "missing-model", "bad-recipe-key",
                                  "bad-recipe-yaml", "bad-recipe-type", "all-layers-spared"])
def test_bad_input_is_a_clear_early_error_and_writes_nothing(setup, case, capsys):
    import transformers

    model_dir, corpus, tmp = setup
    out = tmp / "out"
    extra = ["--target-ratio", "0.5"]
    if case == "existing-output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "budget-too-small":
        extra = ["--target-params", "10", "--prune", "channels"]
    elif case == "budget-above-dense":
        extra = ["--target-params", "1e9"]
    elif case == "missing-data":
        corpus = str(tmp / "nope.jsonl")
    elif case == "empty-data":
        corpus = str(tmp / "empty.jsonl")
        open(corpus, "w").close()
    elif case == "unsupported-architecture":
        model_dir = str(tmp / "gpt2")
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=94)).save_pretrained(model_dir)
        from conftest import tiny_tokenizer

        tiny_tokenizer().save_pretrained(model_dir)
    elif case == "missing-model":
        model_dir = str(tmp / "no-such-model")
    elif case == "bad-recipe-key":
        recipe = tmp / "r.yaml"
        recipe.write_text("target-ratio: 0.5\nsteps: 3\nlearning_rate: 1\n")
        extra = ["--config", str(recipe)]
    elif case in ("bad-recipe-yaml", "bad-recipe-type"):
        recipe = tmp / "r.yaml"
        recipe.write_text("target-ratio: 0.5\nsteps: [3\n" if case == "bad-recipe-yaml" else "target-ratio: 0.5\nsteps: many\n")
        extra = ["--config", str(recipe)]
    elif case == "all-layers-spared":
        extra += ["--spare-first", "2", "--spare-last", "1"]  # the tiny model has 3 layers
    before = sorted(os.listdir(tmp))
    assert main(_args(model_dir, corpus, out, *extra)) == 2
    err = capsys.readouterr().err
    # progress bars may precede it; the error itself is one line, without a traceback
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    expected = {"existing-output": "--overwrite", "budget-too-small": "smallest model", "budget-above-dense": "not below",
                "missing-data": "nope.jsonl", "empty-data": "empty", "unsupported-architecture": "gpt2",
                "missing-model": "no-such-model", "bad-recipe-key": "learning_rate",
                "bad-recipe-yaml": "not valid YAML", "bad-recipe-type": "steps: expected int",
                "all-layers-spared": "spare fewer than 3"}[case]
    assert expected in err
    assert sorted(os.listdir(tmp)) == before  # nothing created or removed
    if case == "existing-output":
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_an_existing_output(setup):
    model_dir, corpus, tmp = setup
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    # a folder that holds no checkpoint and no search run is not this command's to delete
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.6", "--overwrite")) == 2
    assert os.listdir(out) == ["old.txt"]
    (out / "search_config.json").write_text("{}")
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.6", "--overwrite")) == 0
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


def test_source_folder_is_never_written(setup):
    model_dir, corpus, tmp = setup
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(model_dir, "*"))}
    assert main(_args(model_dir, corpus, os.path.join(model_dir, "pruned"), "--target-ratio", "0.6")) == 2
    assert main(_args(model_dir, corpus, tmp / "out", "--target-ratio", "0.6")) == 0
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(model_dir, "*"))} == before


def _torchrun(args, timeout=300, script=os.path.join(REPO, "dms_llm", "search.py"), env=None):
    """`script` with `args` in two processes (torchrun, gloo on CPU), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    # A session of its own, so that a timeout ends the workers too, not only torchrun (they would run on)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_agree_on_the_plan(setup):
    model_dir, corpus, tmp = setup
    out = tmp / "ddp"
    proc = _torchrun(_args(model_dir, corpus, out, "--target-ratio", "0.5", steps=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(out / "search_summary.json"))
    assert summary["num_processes"] == 2
    assert len(set(summary["plan_sha256_per_rank"])) == 1
    assert len(_read_metrics(out)) == 4  # one writer: each step logged once


def test_the_process_group_waits_for_the_main_process_hours_not_minutes(tmp_path):
    """The other ranks wait at barriers while the main process alone evaluates, writes and refits: the
    process group (created by the search's Accelerate engine when nothing made it first) has a timeout
    of hours; NCCL's default is 10 minutes."""
    from dms_llm.training.engine import BARRIER_TIMEOUT

    script = tmp_path / "timeout.py"
    # each rank writes its own file: two processes printing to one pipe at once can lose or merge a line
    script.write_text("import sys, torch\nimport torch.distributed as dist\nfrom dms_llm import RunSettings\n"
                      "from dms_llm.training.engine import Engine\nEngine(RunSettings(), verbose=False)\n"
                      "backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
                      "with open(f'{sys.argv[1]}/timeout-{dist.get_rank()}.txt', 'w') as f:\n"
                      "    f.write(str(backend.options._timeout.total_seconds()))\n")
    proc = _torchrun([str(tmp_path)], script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = [float((tmp_path / f"timeout-{rank}.txt").read_text()) for rank in (0, 1)]
    assert seconds == [BARRIER_TIMEOUT.total_seconds()] * 2
    assert BARRIER_TIMEOUT.total_seconds() >= 3600


def test_sharded_search_equals_data_parallel_and_resumes_exactly(setup):
    """FSDP (the weights sharded over two gloo processes) against DDP (replicated) with the same seed and
    global batch: the same losses and counts at every step, the same plan; and an FSDP search stopped and
    resumed equals the uninterrupted one."""
    model_dir, corpus, tmp = setup
    # 3 warm-up blocks over 2 processes: both must run the same number of backward passes (one each)
    common = ("--target-ratio", "0.5", "--warmup-blocks", "3")
    runs = {"ddp": (), "fsdp": ("--fsdp",)}
    for name, extra in runs.items():
        proc = _torchrun(_args(model_dir, corpus, tmp / name, *common, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = _torchrun(_args(model_dir, corpus, tmp / "resumed", *common, "--fsdp", "--stop-after", "3"))
    assert stopped.returncode != 0 and "stopped at step 3/" in stopped.stdout, stopped.stderr[-3000:]
    assert (tmp / "resumed" / "search_state").is_dir() and not (tmp / "resumed" / "dms_plan.json").exists()
    proc = _torchrun(_args(model_dir, corpus, tmp / "resumed", *common, "--fsdp", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics = {name: _read_metrics(tmp / name) for name in ("ddp", "fsdp", "resumed")}
    keys = ("step", "task_loss", "params", "budget_loss")
    assert [[m[k] for k in keys] for m in metrics["fsdp"]] == [[m[k] for k in keys] for m in metrics["ddp"]]
    assert [[m[k] for k in keys] for m in metrics["resumed"]] == [[m[k] for k in keys] for m in metrics["fsdp"]]
    plans = {name: json.load(open(tmp / name / "dms_plan.json")) for name in metrics}
    for name in ("fsdp", "resumed"):
        assert plans[name]["layers"] == plans["ddp"]["layers"]
        assert plans[name]["hidden_channels"] == plans["ddp"]["hidden_channels"]
    summaries = {name: json.load(open(tmp / name / "search_summary.json")) for name in metrics}
    assert summaries["fsdp"]["params"] == summaries["ddp"]["params"] == summaries["resumed"]["params"]
    assert summaries["fsdp"]["num_processes"] == 2 and summaries["fsdp"]["pruned_from_files"]
    assert summaries["fsdp"]["parity_max_abs_diff"] < 1e-5  # the checkpoint written from the files


def test_sharded_search_with_checkpointing_and_distillation_equals_data_parallel(setup):
    """The 70B recipe's settings (gradient checkpointing, distillation from the same sharded weights with the
    masks off, perplexity before and after) on the sharded model, each process loading only its shard: the
    same steps as DDP, and the same evaluation, run by both processes on the shards."""
    model_dir, corpus, tmp = setup
    common = ("--target-ratio", "0.5", "--gradient-checkpointing", "--distill")
    evaluation = ("--eval-ppl", "wikitext2", "--eval-max-windows", "3", "--data-dir", SHARED_DATA)
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    for name, extra in {"ddp": (), "fsdp": ("--fsdp",)}.items():
        args = [a for a in _args(model_dir, corpus, tmp / name, *common, *extra, *evaluation, steps=4) if a != "--no-eval"]
        # each run its own cache: the sharded one must compute the dense evaluation, not read the other's
        proc = _torchrun(args, env={"DMS_LLM_CACHE": str(tmp / f"cache-{name}")})
        assert proc.returncode == 0, proc.stderr[-3000:]
    results = {name: json.load(open(tmp / name / "results.json")) for name in ("ddp", "fsdp")}
    for row in (lambda r: r, lambda r: r["baseline"]):  # the pruned model, the dense one
        ddp, fsdp = row(results["ddp"]), row(results["fsdp"])
        assert fsdp["params"] == ddp["params"] and fsdp["ppl"] and fsdp["ppl"].keys() == ddp["ppl"].keys()
        for dataset, cells in ddp["ppl"].items():
            for protocol, value in cells.items():
                assert fsdp["ppl"][dataset][protocol] == pytest.approx(value, rel=1e-5)
    assert results["fsdp"]["params"] < results["fsdp"]["baseline"]["params"]
    metrics = {name: _read_metrics(tmp / name) for name in ("ddp", "fsdp")}
    # masks start at one (the teacher's model); later the student differs from it
    assert metrics["fsdp"][0]["distill_loss"] == 0 and metrics["fsdp"][-1]["distill_loss"] > 1e-6
    for a, b in zip(metrics["fsdp"], metrics["ddp"]):
        assert (a["step"], a["params"]) == (b["step"], b["params"])
        for key in ("task_loss", "distill_loss", "budget_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    plans = {name: json.load(open(tmp / name / "dms_plan.json")) for name in metrics}
    assert plans["fsdp"]["layers"] == plans["ddp"]["layers"]
    assert json.load(open(tmp / "fsdp" / "search_summary.json"))["parity_max_abs_diff"] < 1e-5


def test_fsdp_needs_processes_and_frozen_weights(setup, capsys):
    model_dir, corpus, tmp = setup
    assert main(_args(model_dir, corpus, tmp / "a", "--target-ratio", "0.5", "--fsdp", "--train-weights", "lora")) == 2
    assert "--fsdp shards frozen weights" in capsys.readouterr().err
    assert main(_args(model_dir, corpus, tmp / "b", "--target-ratio", "0.5", "--fsdp")) == 2
    assert "two or more" in capsys.readouterr().err
    assert not (tmp / "a").exists() and not (tmp / "b").exists()


def test_spared_layers_come_out_whole(setup):
    from transformers import AutoModelForCausalLM

    model_dir, corpus, tmp = setup
    assert main(_args(model_dir, corpus, tmp / "out", "--target-ratio", "0.5", "--spare-first", "1", "--spare-last", "1")) == 0
    plan = json.load(open(tmp / "out" / "dms_plan.json"))
    config = json.load(open(os.path.join(model_dir, "config.json")))
    whole = {"attention_groups": list(range(config["num_key_value_heads"])),
             "mlp_channels": list(range(config["intermediate_size"]))}
    assert plan["layers"][0] == whole and plan["layers"][-1] == whole
    assert plan["layers"][1] != whole  # the budget was met by cutting the middle layer (and the hidden width)
    summary = json.load(open(tmp / "out" / "search_summary.json"))
    assert summary["params"] <= summary["target_params"] and summary["parity_max_abs_diff"] < 1e-4
    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp / "out").parameters()) == summary["params"]


def test_resuming_with_other_structures_is_a_clear_error(setup, capsys):
    model_dir, corpus, tmp = setup
    assert main(_args(model_dir, corpus, tmp / "out", "--target-ratio", "0.5", "--stop-after", "2")) == 3
    capsys.readouterr()
    assert main(_args(model_dir, corpus, tmp / "out", "--target-ratio", "0.5", "--resume", "--spare-first", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--spare-first 0" in err[-1] and "Traceback" not in "".join(err)
    assert json.load(open(tmp / "out" / "search_config.json"))["spare_first"] == 0  # the run's record is unchanged
    assert os.path.isdir(tmp / "out" / "search_state")  # and so is the checkpoint: a correct --resume still works
    assert main(_args(model_dir, corpus, tmp / "out", "--target-ratio", "0.5", "--resume")) == 0


@pytest.mark.slow
def test_real_smollm2_short_search(tmp_path):
    out = tmp_path / "smol"
    rc = main(["--target-ratio", "0.8", "--steps", "4", "--seq-len", "64", "--num-samples", "8", "--output-dir", str(out),
               "--eval-max-windows", "4", "--data-dir", SHARED_DATA])
    assert rc == 0
    summary = json.load(open(out / "search_summary.json"))
    assert summary["params"] <= summary["target_params"]
    assert summary["target_params"] - summary["params"] < 0.005 * summary["target_params"]
    results = json.load(open(out / "results.json"))
    assert results["ppl"]["wikitext2"]["llm-pruner"] > 1


def _heldout_blocks(model_dir, corpus, n_search, n_heldout):
    from transformers import AutoTokenizer

    from dms_llm.data import load_calibration

    return load_calibration(corpus, AutoTokenizer.from_pretrained(model_dir), 32, n_search + n_heldout, seed=0)[n_search:]


def test_heldout_blocks_score_the_search_without_changing_it(setup):
    from transformers import AutoModelForCausalLM

    model_dir, corpus, tmp = setup
    assert main(_args(model_dir, corpus, tmp / "a", "--target-ratio", "0.5")) == 0
    assert main(_args(model_dir, corpus, tmp / "b", "--target-ratio", "0.5", "--heldout-samples", "8")) == 0
    plan_a, plan_b = (json.load(open(tmp / d / "dms_plan.json")) for d in "ab")
    assert plan_a["layers"] == plan_b["layers"]  # the searched blocks are the same; 8 more are only scored
    summary = json.load(open(tmp / "b" / "search_summary.json"))
    assert "heldout_loss" not in json.load(open(tmp / "a" / "search_summary.json"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "b")
    blocks = _heldout_blocks(model_dir, corpus, 16, 8)
    with torch.no_grad():  # all 8 blocks in one forward: independent of how the search batches them
        logits = reloaded(input_ids=blocks).logits
    expected = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()))
    assert summary["heldout_loss"] == pytest.approx(expected, rel=1e-4)


def test_restarts_keep_the_search_with_the_lowest_heldout_loss(setup, capsys):
    model_dir, corpus, tmp = setup
    common = ("--target-ratio", "0.5", "--heldout-samples", "8")
    out = tmp / "best"
    assert main(_args(model_dir, corpus, out, *common, "--restarts", "3", "--seed", "5")) == 0
    record = json.load(open(out / "restarts.json"))
    searches = record["searches"]
    assert [s["seed"] for s in searches] == [5, 6, 7]
    assert len({s["heldout_loss"] for s in searches}) == 3  # the seeds reach different architectures
    best = min(searches, key=lambda s: s["heldout_loss"])
    assert record["chosen_seed"] == best["seed"]
    assert f"seed {best['seed']}: held-out loss" in capsys.readouterr().out
    summary = json.load(open(out / "search_summary.json"))
    assert summary["heldout_loss"] == best["heldout_loss"] and summary["chosen_seed"] == best["seed"]
    assert summary["search_time_s"] == pytest.approx(sum(s["search_time_s"] for s in searches))
    # the kept checkpoint is exactly what an ordinary search with that seed (same calibration blocks) makes
    single = tmp / "single"
    assert main(_args(model_dir, corpus, single, *common, "--seed", str(best["seed"]), "--data-seed", "5")) == 0
    assert json.load(open(single / "dms_plan.json"))["layers"] == json.load(open(out / "dms_plan.json"))["layers"]
    assert json.load(open(single / "search_summary.json"))["heldout_loss"] == pytest.approx(best["heldout_loss"])
    from transformers import AutoModelForCausalLM

    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()) == summary["params"]
    # every search keeps its record; only the top level holds weights
    for s in searches:
        folder = out / "restarts" / f"seed-{s['seed']}"
        assert (folder / "dms_plan.json").exists() and (folder / "metrics.jsonl").exists()
        assert not list(folder.glob("*.safetensors"))
    assert not (tmp / "best.saving").exists() and not (tmp / "best.old").exists()


def test_restarts_with_refit_rank_the_plain_slices_and_keep_the_refit_model(setup):
    from transformers import AutoModelForCausalLM

    _, corpus, tmp = setup
    # larger weights than the default initialisation, so the refit model's held-out loss differs from the slice's
    model_dir = save_tiny_checkpoint(tmp / "peaky", "llama-gqa", initializer_range=0.2)
    out = tmp / "refit-best"
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.5", "--heldout-samples", "8", "--restarts", "2",
                      "--refit", "--refit-samples", "8")) == 0
    record = json.load(open(out / "restarts.json"))
    searches = record["searches"]
    best = min(searches, key=lambda s: s["heldout_loss"])
    assert record["chosen_seed"] == best["seed"] and all("heldout_loss_after_refit" in s for s in searches)
    heldout = _heldout_blocks(model_dir, corpus, 16, 8)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=heldout).logits
    kept = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), heldout[:, 1:].flatten()))
    assert abs(best["heldout_loss_after_refit"] - best["heldout_loss"]) > 1e-3  # the two scores can be told apart
    assert best["heldout_loss_after_refit"] == pytest.approx(kept, rel=1e-4)  # the kept weights are the refit ones


def test_interrupted_restarts_resume_to_the_same_result(setup):
    model_dir, corpus, tmp = setup
    common = ("--target-ratio", "0.5", "--heldout-samples", "8", "--restarts", "2")
    assert main(_args(model_dir, corpus, tmp / "a", *common)) == 0
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--stop-after", "3")) == 3
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--stop-after", "3")) == 2  # exists: resume or overwrite
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--resume")) == 0
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--resume")) == 2  # finished: nothing to resume
    assert list((tmp / "b").glob("model*.safetensors"))  # and nothing was lost
    a, b = (json.load(open(tmp / d / "restarts.json")) for d in "ab")
    assert a["chosen_seed"] == b["chosen_seed"]
    assert [s["heldout_loss"] for s in a["searches"]] == [s["heldout_loss"] for s in b["searches"]]
    assert json.load(open(tmp / "a" / "dms_plan.json"))["layers"] == json.load(open(tmp / "b" / "dms_plan.json"))["layers"]


@pytest.mark.parametrize("extra, message", [(("--restarts", "0"), "--restarts"),
                                            (("--restarts", "2", "--heldout-samples", "0"), "--heldout-samples")])
def test_bad_restart_settings_fail_early(setup, capsys, extra, message):
    model_dir, corpus, tmp = setup
    assert main(_args(model_dir, corpus, tmp / "out", "--target-ratio", "0.5", *extra)) == 2
    assert message in capsys.readouterr().err and not (tmp / "out").exists()


def test_the_library_call_writes_nothing_and_finds_the_commands_plan(setup, monkeypatch):
    """`search_plan` on a model and blocks is the search the command runs: the same plan, no files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dms_llm import DMSConfig, RunSettings, load_calibration, prune_model, search_plan

    model_dir, corpus, tmp = setup
    assert main(_args(model_dir, corpus, tmp / "cli", "--target-ratio", "0.5", "--heldout-samples", "4")) == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blocks = load_calibration(corpus, AutoTokenizer.from_pretrained(model_dir), 32, 20, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    elsewhere = tmp / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = search_plan(model, blocks[:16], target_ratio=0.5, config=DMSConfig(steps=6, align=1), heldout=blocks[16:],
                       run=RunSettings(checkpoint_every=2), source_model=model_dir)
    assert os.listdir(elsewhere) == [] and sorted(os.listdir(tmp)) == ["calib.jsonl", "cli", "cwd", "model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # frozen weights: unchanged
    saved = json.load(open(tmp / "cli" / "dms_plan.json"))
    assert plan.to_dict()["layers"] == saved["layers"] and plan.hidden_channels == saved["hidden_channels"]
    assert plan.metadata["method"] == DMSConfig(steps=6, align=1).to_dict() == saved["metadata"]["method"]
    summary = json.load(open(tmp / "cli" / "search_summary.json"))
    assert plan.metadata["heldout_loss"] == pytest.approx(summary["heldout_loss"])
    assert sum(p.numel() for p in prune_model(model, plan).parameters()) == plan.params_after <= int(0.5 * summary["dense_params"])

def _comparable(out, drop=("prune_from_files", "prune-from-files")):
    """The run folder's files as text/bytes, minus what legitimately differs between two runs (times,
    the output path, the --prune-from-files setting)."""
    found = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name in ("metrics.jsonl", "search_config.json", "search_summary.json", "tensorboard"):
            continue
        data = open(path, "rb").read()
        if name == "dms_plan.json":
            plan = json.loads(data)
            plan["metadata"]["search"] = {k: v for k, v in plan["metadata"]["search"].items()
                                          if k not in ("prune_from_files", "output_dir")}
            plan["metadata"].pop("search_time_s")
            plan["metadata"].pop("command")  # names --output-dir and --prune-from-files, as the card's line dropped below
            data = plan
        elif name == "README.md":
            data = [line.replace(str(out), "OUT") for line in data.decode().splitlines()
                    if not any(d in line for d in drop)]
        found[name] = data
    return found


def test_pruning_from_the_files_writes_the_same_checkpoint(tmp_path):
    """A sharded source is pruned from its files by default (frozen weights); the run folder is the one
    the in-memory path writes, and the pruned model read back gives the same parity and held-out loss."""
    from conftest import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_model("llama-gqa").save_pretrained(model_dir, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(model_dir)
    assert os.path.isfile(model_dir / "model.safetensors.index.json")
    corpus = write_corpus(tmp_path / "calib.jsonl")
    outs = {mode: tmp_path / mode / "out" for mode in ("never", "auto")}
    for mode, out in outs.items():
        assert main(_args(str(model_dir), corpus, out, "--target-ratio", "0.6", "--heldout-samples", "4",
                          "--prune-from-files", mode)) == 0
    summaries = {mode: json.load(open(out / "search_summary.json")) for mode, out in outs.items()}
    assert [summaries[m]["pruned_from_files"] for m in ("never", "auto")] == [False, True]
    for key in ("params", "parity_max_abs_diff", "heldout_loss"):
        assert summaries["never"][key] == summaries["auto"][key], key
    assert summaries["auto"]["parity_max_abs_diff"] < 1e-4
    never, auto = _comparable(outs["never"]), _comparable(outs["auto"])
    assert sorted(never) == sorted(auto) and any(n.endswith(".safetensors") for n in never)
    for name in never:
        assert never[name] == auto[name], name
    plan = json.load(open(outs["auto"] / "dms_plan.json"))
    assert plan["metadata"]["masked_vs_pruned_max_abs_logit_diff"] == summaries["auto"]["parity_max_abs_diff"]


def test_the_search_model_is_freed_before_pruning_from_the_files(setup, monkeypatch):
    """Pruning from the files is for models the machine cannot hold twice: the search's model must be gone
    (not merely unreferenced by name) when the pruned one is written."""
    import gc

    from transformers import PreTrainedModel

    import dms_llm.checkpoints.stream_prune as stream_prune

    model_dir, corpus, tmp = setup
    alive = []
    write = stream_prune.prune_checkpoint

    def count_then_write(*args, **kwargs):
        gc.disable()  # count what is alive now, not after a collection the count itself could trigger
        try:
            alive.append(sum(issubclass(type(o), PreTrainedModel) for o in gc.get_objects()))
        finally:
            gc.enable()
        return write(*args, **kwargs)

    monkeypatch.setattr(stream_prune, "prune_checkpoint", count_then_write)
    assert main(_args(model_dir, corpus, tmp / "freed", "--target-ratio", "0.6", "--prune-from-files", "always")) == 0
    assert alive == [0]


def test_prune_from_files_settings(setup, capsys):
    model_dir, corpus, tmp = setup  # a single-file checkpoint: auto prunes in memory, always from the files
    assert main(_args(model_dir, corpus, tmp / "a", "--target-ratio", "0.6")) == 0
    assert json.load(open(tmp / "a" / "search_summary.json"))["pruned_from_files"] is False
    assert main(_args(model_dir, corpus, tmp / "b", "--target-ratio", "0.6", "--prune-from-files", "always")) == 0
    assert json.load(open(tmp / "b" / "search_summary.json"))["pruned_from_files"] is True
    capsys.readouterr()
    assert main(_args(model_dir, corpus, tmp / "c", "--target-ratio", "0.6", "--prune-from-files", "always",
                      "--train-weights", "lora")) == 2
    assert "needs --train-weights none" in capsys.readouterr().err and not os.path.exists(tmp / "c")


def test_aligned_search_saves_aligned_widths(setup, capsys):
    model_dir, corpus, tmp = setup
    out = tmp / "aligned"
    common = ("--target-ratio", "0.6", "--align", "8")
    assert main(_args(model_dir, corpus, out, *common, "--stop-after", "3")) == 3
    capsys.readouterr()
    # a checkpoint made with one alignment cannot be continued with another
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.6", "--align", "16", "--resume")) == 2
    assert "align" in capsys.readouterr().err
    # nor with another schedule or data order
    for changed in (("--seed", "1"), ("--target-ratio", "0.7"), ("--warmup-blocks", "2")):
        assert main(_args(model_dir, corpus, out, *common, *changed, "--resume")) == 2
        assert f"{changed[0]} " in capsys.readouterr().err
    assert main(_args(model_dir, corpus, out, *common, "--resume")) == 0
    plan = json.load(open(out / "dms_plan.json"))
    widths = [len(layer["mlp_channels"]) for layer in plan["layers"]] + [len(plan["hidden_channels"])]
    assert all(w % 8 == 0 for w in widths), widths
    assert plan["metadata"]["method"]["align"] == 8
    summary = json.load(open(out / "search_summary.json"))
    assert summary["params"] <= summary["target_params"]


def test_warm_up_starts_the_importances_at_the_mean_taylor_score(setup):
    """After the warm-up the importances are the mean over the first blocks of (sum over tokens of
    m dL/dm)^2 of the unmasked model, recomputed here by hand; the search then resumes exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dms_llm import DMSConfig, MaskHooks, ModelMasks, RunSettings, load_calibration
    from dms_llm.training.dms import Engine, SearchModule, warm_up_importance

    model_dir, corpus, tmp = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    blocks = load_calibration(corpus, AutoTokenizer.from_pretrained(model_dir), 32, 16, seed=0)
    masks = ModelMasks.for_method(model.config, DMSConfig(align=1))
    engine = Engine(RunSettings(), verbose=False)
    module, _ = engine.prepare(SearchModule(model, masks), torch.optim.SGD(masks.ratio_parameters(), lr=0.0))
    with MaskHooks(model, masks):
        warm_up_importance(engine, module, masks, blocks, 5, batch_size=1)
        expected = {name: torch.zeros(t.n) for name, t in masks.named_structures()}
        fresh = ModelMasks.for_method(model.config, DMSConfig(align=1))
    with MaskHooks(model, fresh):
        for i in range(5):
            loss = torch.nn.functional.cross_entropy(model(blocks[i : i + 1]).logits[0, :-1], blocks[i, 1:])
            loss.backward()
            for name, acc in fresh._taylor.items():
                expected[name] += acc.pow(2) / 5
            fresh.discard_importance()
    for name, topk in masks.named_structures():
        torch.testing.assert_close(topk.importance, expected[name], rtol=1e-4, atol=1e-12)
    assert any(topk.importance.std() > 0 for _, topk in masks.named_structures())
    assert all(p.grad is None for p in masks.ratio_parameters())

    common = ("--target-ratio", "0.5", "--warmup-blocks", "6")
    assert main(_args(model_dir, corpus, tmp / "a", *common)) == 0
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--stop-after", "3")) == 3
    assert main(_args(model_dir, corpus, tmp / "b", *common, "--resume")) == 0
    a, b = (_read_metrics(tmp / d) for d in "ab")
    assert [m["task_loss"] for m in a] == [m["task_loss"] for m in b]
    assert json.load(open(tmp / "a" / "dms_plan.json"))["layers"] == json.load(open(tmp / "b" / "dms_plan.json"))["layers"]


def test_a_stopped_library_search_leaves_the_model_as_it_was(setup):
    """A search with LoRA stopped early (checkpointed, resumable) takes its adapters off the caller's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dms_llm import DMSConfig, RunSettings, load_calibration, search_plan
    from dms_llm.training import Stopped

    model_dir, corpus, tmp = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blocks = load_calibration(corpus, AutoTokenizer.from_pretrained(model_dir), 32, 16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Stopped):
        search_plan(model, blocks, target_ratio=0.5, config=DMSConfig(steps=6, align=1, train_weights="lora"),
                    run=RunSettings(checkpoint_every=2, stop_after=2), run_dir=str(tmp / "stopped"))
    assert not any("lora" in name for name, _ in model.named_modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_refit_replaces_only_the_output_projections_of_the_saved_checkpoint(setup, capsys):
    from transformers import AutoModelForCausalLM

    from dms_llm.plan import PrunePlan
    from dms_llm.prune import prune_model

    _, corpus, tmp = setup
    # larger weights than the default initialisation: the logits, and so the held-out loss, follow the refit
    model_dir = save_tiny_checkpoint(tmp / "peaky", "llama-gqa", initializer_range=0.2)
    out = tmp / "refit"
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.6", "--refit", "--refit-samples", "8",
                      "--heldout-samples", "8")) == 0
    summary = json.load(open(out / "search_summary.json"))
    refit = summary["refit"]
    assert refit["tokens"] == 8 * 32 and refit["sublayers"] > 0
    assert refit["relative_error_after"] < refit["relative_error_before"]
    plan = PrunePlan.from_json(str(out / "dms_plan.json"))
    assert plan.metadata["refit"] == refit  # the plan says its weights are not a plain slice
    sliced = prune_model(AutoModelForCausalLM.from_pretrained(model_dir), plan).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {n for n in saved if not torch.equal(saved[n], sliced[n])}
    assert changed and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in changed), changed
    # the held-out loss is the plain slice's (what restarts rank); the saved refit model's is kept beside it
    heldout = _heldout_blocks(model_dir, corpus, 16, 8)
    losses = {}
    for name, model in (("refit", AutoModelForCausalLM.from_pretrained(out)), ("sliced", prune_model(
            AutoModelForCausalLM.from_pretrained(model_dir), plan))):
        with torch.no_grad():
            logits = model(input_ids=heldout).logits
        losses[name] = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), heldout[:, 1:].flatten()))
    assert abs(losses["refit"] - losses["sliced"]) > 1e-3  # the two can be told apart
    assert summary["heldout_loss_after_refit"] == pytest.approx(losses["refit"], rel=1e-4)
    assert summary["heldout_loss"] == pytest.approx(losses["sliced"], rel=1e-4)
    capsys.readouterr()
    assert main(_args(model_dir, corpus, tmp / "bad", "--target-ratio", "0.6", "--refit", "--refit-alpha", "0")) == 2
    assert "--refit-alpha must be > 0" in capsys.readouterr().err and not os.path.exists(tmp / "bad")


def test_refit_hidden_fill_completes_the_removed_hidden_channels_in_the_input_projections(setup, capsys):
    """--refit-hidden fill on a plan that removes hidden channels: the saved checkpoint's q/k/v and gate/up are no
    longer slices of the source (the fill is folded into them), the summary says so, and a search that would
    prune from the files, or dms-llm prune, refuses it before anything is written."""
    from transformers import AutoModelForCausalLM

    from dms_llm.cli.prune import main as prune_main
    from dms_llm.plan import PrunePlan
    from dms_llm.prune import prune_model

    model_dir, corpus, tmp = setup
    out = tmp / "fill"
    assert main(_args(model_dir, corpus, out, "--target-ratio", "0.5", "--prune", "heads,channels,hidden", "--refit",
                      "--refit-samples", "8", "--refit-hidden", "fill", steps=12)) == 0
    plan = PrunePlan.from_json(str(out / "dms_plan.json"))
    assert len(plan.hidden_channels) < plan.shapes.hidden_size  # the search removed hidden channels
    assert json.load(open(out / "search_summary.json"))["refit"]["fill_hidden"]
    sliced = prune_model(AutoModelForCausalLM.from_pretrained(model_dir), plan).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {n.rsplit(".", 2)[-2] for n in saved if not torch.equal(saved[n], sliced[n])}
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= changed <= {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                                   "gate_proj", "up_proj", "down_proj"}
    capsys.readouterr()
    for bad in (tmp / "from-files", tmp / "pruned"):
        argv = (_args(model_dir, corpus, bad, "--target-ratio", "0.5", "--refit", "--refit-hidden", "fill",
                      "--prune-from-files", "always") if bad.name == "from-files" else
                ["--plan", str(out / "dms_plan.json"), "--model", model_dir, "--output-dir", str(bad), "--refit",
                 "--refit-hidden", "fill"])
        assert (main if bad.name == "from-files" else prune_main)(argv) == 2
        assert "--refit-hidden fill runs the dense model beside the pruned one" in capsys.readouterr().err
        assert not bad.exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_refit_after_pruning_from_the_files_matches_the_one_in_memory(tmp_path, processes):
    """--prune-from-files --refit: the source is never loaded whole; the refit reads its sublayers from the
    files, and the saved checkpoint and scores are those of the in-memory path. With two processes (data
    parallel) the main process alone builds, refits and saves the pruned model, on either path."""
    from conftest import tiny_model, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from dms_llm.plan import PrunePlan
    from dms_llm.prune import prune_model

    model_dir = tmp_path / "model"
    tiny_model("llama-gqa", initializer_range=0.2).save_pretrained(model_dir, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "calib.jsonl")
    outs = {mode: tmp_path / mode for mode in ("never", "always")}
    for mode, out in outs.items():
        args = _args(str(model_dir), corpus, out, "--target-ratio", "0.6", "--heldout-samples", "4", "--refit",
                     "--refit-samples", "8", "--prune-from-files", mode, steps=4)
        if processes == 1:
            assert main(args) == 0
        else:
            proc = _torchrun(args)
            assert proc.returncode == 0, proc.stderr[-3000:]
    never, always = (json.load(open(out / "search_summary.json")) for out in outs.values())
    assert (never["pruned_from_files"], always["pruned_from_files"]) == (False, True)
    assert never["num_processes"] == always["num_processes"] == processes
    assert never["plan_sha256_per_rank"] == always["plan_sha256_per_rank"]
    for key in ("params", "heldout_loss", "heldout_loss_after_refit"):
        assert always[key] == pytest.approx(never[key], rel=1e-5), key
    assert abs(always["heldout_loss"] - always["heldout_loss_after_refit"]) > 1e-3  # the refit changed the model
    for key in ("tokens", "sublayers", "relative_error_before", "relative_error_after"):
        assert always["refit"][key] == pytest.approx(never["refit"][key], rel=1e-6), key
    weights = {mode: AutoModelForCausalLM.from_pretrained(out).state_dict() for mode, out in outs.items()}
    sliced = prune_model(AutoModelForCausalLM.from_pretrained(model_dir), PrunePlan.from_json(str(outs["always"] / "dms_plan.json")))
    for mode in outs:  # the refit model, not the slice, is what each path saved
        refit = [n for n, w in weights[mode].items() if not torch.equal(w, sliced.state_dict()[n])]
        assert refit and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in refit), mode
    for name, w in weights["never"].items():
        torch.testing.assert_close(weights["always"][name], w, rtol=1e-5, atol=1e-7)
    assert json.load(open(outs["always"] / "dms_plan.json"))["metadata"]["refit"]["sublayers"] == always["refit"]["sublayers"]


def test_runs_with_other_mixed_precision_follow_each_other_in_one_process():
    """An fp32 run, a bf16 one, then fp32 again (a search, its fine-tuning, another search, in one Python
    session): each autocasts as it asked, and Accelerate's process state is neither reset nor changed."""
    from accelerate.state import AcceleratorState

    from dms_llm import RunSettings
    from dms_llm.training.engine import Engine

    engines = [Engine(RunSettings(mixed_precision=p), verbose=False) for p in ("no", "bf16", "no")]
    state = AcceleratorState._shared_state
    x = torch.ones(4, 4)
    dtypes = []
    for engine in engines:
        with engine.autocast():
            dtypes.append((x @ x).dtype)
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32]
    assert AcceleratorState._shared_state is state and AcceleratorState().mixed_precision == "no"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about CPU runs")
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(monkeypatch):
    """bf16 autocast on a CPU that emulates it (8x slower than fp32 on an AVX2 machine) says so and what to
    pass; a CPU with bf16 instructions, fp32 runs, and machines whose flags cannot be read stay silent."""
    import warnings

    import dms_llm.training.engine as engine_module
    from dms_llm import RunSettings

    def warned(precision: str, native) -> bool:
        monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine_module.Engine(RunSettings(mixed_precision=precision), verbose=False)
        return any("--mixed-precision no" in str(w.message) for w in caught)

    assert warned("bf16", False)
    assert not warned("bf16", True) and not warned("bf16", None) and not warned("no", False)
    assert engine_module.cpu_has_bf16() in (True, False, None)


def test_a_run_refuses_another_precision_than_the_process_was_launched_with():
    """A process launched with a mixed precision (accelerate launch --mixed_precision) keeps it: a run that
    asks for another says so instead of resetting the launcher's state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dms_llm import RunSettings
    from dms_llm.training.engine import Engine

    AcceleratorState._reset_state(True)  # the test plays the launcher: a fresh process set to bf16
    try:
        Accelerator(mixed_precision="bf16", cpu=True)
        assert Engine(RunSettings(mixed_precision="bf16"), verbose=False).acc.mixed_precision == "bf16"
        with pytest.raises(ValueError, match="mixed precision 'bf16'"):
            Engine(RunSettings(mixed_precision="no"), verbose=False)
    finally:
        AcceleratorState._reset_state(True)
