"""The benchmark (`dms-llm benchmark`) end to end on a tiny saved model: every method, one budget, cached reruns."""

import json
import random
from pathlib import Path

import pytest
from conftest import WORDS, save_tiny_checkpoint, write_corpus

import dms_llm.benchmark.rows as rows_module
from dms_llm.evaluation.speed import decode_tokens_per_s, prefill_tokens_per_s, relative_speed


def _load_benchmark():
    from dms_llm.cli import benchmark

    return benchmark


def write_data_dir(root: Path) -> Path:
    """WikiText-2 raw test and BoolQ dev in the layout of ../shared/data, in the tiny tokenizer's words."""
    rng = random.Random(1)
    lines = [" \n", " = " + " ".join(rng.choices(WORDS, k=3)) + " = \n"]
    for _ in range(30):
        lines += [" \n", " " + " ".join(rng.choices(WORDS, k=40)) + " \n"]
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(lines))
    (root / "boolq").mkdir()
    docs = [{"question": " ".join(rng.choices(WORDS, k=4)), "title": "t", "answer": i % 2 == 0,
             "passage": " ".join(rng.choices(WORDS, k=12))} for i in range(4)]
    (root / "boolq" / "dev.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model_dir = save_tiny_checkpoint(tmp / "model", "llama-gqa", num_hidden_layers=4)
    corpus = write_corpus(tmp / "calib.jsonl")
    data_dir = write_data_dir(tmp / "data")
    recipe = tmp / "dms.yaml"
    recipe.write_text("seq-len: 16\nnum-samples: 8\nsteps: 4\ncheckpoint-every: 2\nprune: heads,channels,layers\n"
                      f"dataset: {corpus}\n")
    return dict(model=model_dir, corpus=corpus, data=str(data_dir), recipe=str(recipe), tmp=tmp)


def _argv(setup, out, work, methods, **extra):
    argv = ["--model", setup["model"], "--budgets", "0.7", "--methods", methods, "--calib-dataset", setup["corpus"],
            "--calib-samples", "8", "--seq-len", "16", "--ppl", "wikitext2", "--protocols", "llm-pruner",
            "--data-dir", setup["data"], "--dms-config", setup["recipe"], "--speed-reps", "1", "--speed-seq-len", "16",
            "--speed-new-tokens", "4", "--out", str(out), "--work", str(work), "--batch-size", "4", "--align", "1"]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}"] + ([str(v)] if v != "" else [])
    return argv


def test_benchmark_end_to_end_then_cached(setup, monkeypatch):
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results", setup["tmp"] / "work"
    methods = "dense,magnitude,wanda-sp,llm-pruner,flap,shortgpt,dms"
    assert bench.main(_argv(setup, out, work, methods, tasks="boolq", limit=4)) == 0
    label = Path(setup["model"]).name
    report = json.loads((out / f"{label}.json").read_text())
    assert {"model", "machine", "machines", "command", "rows"} <= set(report)
    assert set(report["machines"]) == {"build", "ppl", "zero_shot", "speed"} and report["machines"]["ppl"] == [report["machine"]]
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == methods.split(",")
    dense = rows["dense"]["params"]
    assert rows["dense"]["prefill_speedup"] == 1.0 and rows["dense"]["time_s"] == 0
    for name, r in rows.items():
        assert set(r) == {"method", "budget", "recovery", "params", "ppl", "zero_shot", "zero_shot_avg",
                          "prefill_speedup", "decode_speedup", "time_s", "machines"}
        assert r["recovery"] is False
        ppl = r["ppl"]["wikitext2"]["llm-pruner"]
        assert ppl > 1 and ppl == ppl
        assert 0 <= r["zero_shot"]["boolq"]["acc"] <= 1 and r["zero_shot_avg"] == r["zero_shot"]["boolq"]["acc"]
        if name != "dense":
            assert r["params"] <= int(0.7 * dense), name  # at or below the budget, as the formula counts
            assert r["prefill_speedup"] > 0 and r["decode_speedup"] > 0 and r["time_s"] >= 0
    assert rows["dms"]["params"] > 0.5 * dense
    md = (out / f"{label}.md").read_text()
    assert "| flap | 0.7 | no |" in md and "boolq" in md
    assert (out / f"{label}.png").stat().st_size > 1000
    assert len(list((work / "rows").glob("*.json"))) == len(rows)

    # a rerun finds every row cached: no plan, search, evaluation or timing may run again
    import dms_llm.baselines as baselines
    import dms_llm.evaluation as evaluation
    import dms_llm.evaluation.speed as speed

    def boom(*a, **k):
        raise AssertionError("recomputed a cached result")

    for name in list(baselines.METHODS):
        monkeypatch.setitem(baselines.METHODS, name, boom)
    monkeypatch.setattr(evaluation, "evaluate_model", boom)
    monkeypatch.setattr(rows_module, "run_command", boom)  # no search or fine-tuning either
    monkeypatch.setattr(speed, "relative_speed", boom)
    before = (out / f"{label}.json").read_text()
    assert bench.main(_argv(setup, out, work, methods, tasks="boolq", limit=4)) == 0
    after = json.loads((out / f"{label}.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]

    # --report-only writes the same report from the cache, and leaves out rows that were never built
    report_out = setup["tmp"] / "report-only"
    assert bench.main(_argv(setup, report_out, work, methods + ",dms-lora", tasks="boolq", limit=4, report_only="")) == 0
    only = json.loads((report_out / f"{label}.json").read_text())
    assert only["rows"] == after["rows"]  # no dms-lora row: never built, nothing computed for it
    assert (report_out / f"{label}.md").read_text().count("\n| ") == (out / f"{label}.md").read_text().count("\n| ")


def test_rerun_with_a_new_budget_computes_only_the_new_rows(setup, monkeypatch):
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results2", setup["tmp"] / "work2"
    argv = _argv(setup, out, work, "dense,magnitude", speed_reps=0)
    assert bench.main(argv) == 0
    import dms_llm.baselines as baselines

    calls = []
    real = baselines.METHODS["magnitude"]
    monkeypatch.setitem(baselines.METHODS, "magnitude", lambda *a, **k: calls.append(k) or real(*a, **k))
    argv[argv.index("--budgets") + 1] = "0.7,0.5"
    assert bench.main(argv) == 0
    assert len(calls) == 1  # only the 0.5 plan is new
    rows = json.loads((out / f"{Path(setup['model']).name}.json").read_text())["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [("dense", 1.0), ("magnitude", 0.7), ("magnitude", 0.5)]
    assert rows[2]["params"] < rows[1]["params"] and rows[1]["prefill_speedup"] is None  # speed skipped


def test_recovery_rows_fine_tune_every_pruned_model(setup):
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results3", setup["tmp"] / "work3"
    assert bench.main(_argv(setup, out, work, "dense,flap", speed_reps=0, recovery_steps=2)) == 0
    rows = json.loads((out / f"{Path(setup['model']).name}.json").read_text())["rows"]
    assert [(r["method"], r["recovery"]) for r in rows] == [("dense", False), ("flap", False), ("flap", True)]
    one_shot, recovered = rows[1], rows[2]
    assert recovered["params"] == one_shot["params"]  # fine-tuning keeps the architecture (and FLAP's biases)
    assert recovered["time_s"] > one_shot["time_s"]
    assert recovered["ppl"]["wikitext2"]["llm-pruner"] != one_shot["ppl"]["wikitext2"]["llm-pruner"]


def test_recovery_recipe_and_speed_reuse(setup):
    """--recovery-config sets the fine-tuning; a recovered row reuses its pruned row's timing (same shapes)."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results5", setup["tmp"] / "work5"
    recipe = setup["tmp"] / "recover.yaml"
    recipe.write_text(f"method: full\nlr: 1.0e-3\ndistill-weight: 0.0\nepochs: 3\ndataset: {setup['corpus']}\n"
                      "seq-len: 16\nnum-samples: 8\n")
    assert bench.main(_argv(setup, out, work, "dense,magnitude", recovery_steps=2, recovery_config=recipe,
                            device="cpu")) == 0
    rows = json.loads((out / f"{Path(setup['model']).name}.json").read_text())["rows"]
    one_shot, recovered = rows[1], rows[2]
    assert recovered["recovery"] and recovered["prefill_speedup"] == one_shot["prefill_speedup"]
    saved = [json.loads(p.read_text()) for p in (work / "rows").glob("magnitude-*-rec2-*.json")]
    assert len(saved) == 1 and saved[0]["info"]["recovery"]["method"] == "full"  # the recipe, not the default LoRA
    assert saved[0]["info"]["recovery"]["steps"] == 2 and saved[0]["identity"]["recovery_recipe"]["lr"] == 1e-3
    with pytest.raises(SystemExit):
        bench.main(_argv(setup, out, work, "dense,magnitude", recovery_config=setup["tmp"] / "nope.yaml"))


def test_train_dtype_reaches_the_search_and_the_fine_tuning(setup):
    """--train-dtype sets the dtype the DMS search and the recovery run in, is recorded, and keys the cache."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results6", setup["tmp"] / "work6"
    assert bench.main(_argv(setup, out, work, "dms", speed_reps=0, recovery_steps=2, train_dtype="bfloat16")) == 0
    saved = {p.name: json.loads(p.read_text()) for p in (work / "rows").glob("dms-*.json")}
    one_shot = next(r for n, r in saved.items() if "-rec" not in n)
    recovered = next(r for n, r in saved.items() if "-rec2-" in n)
    assert one_shot["info"]["train_dtype"] == "bfloat16" and one_shot["identity"]["train_dtype"] == "bfloat16"
    assert recovered["info"]["recovery"]["dtype"] == "bfloat16"
    # the default (auto: fp32 on this CPU) is a different row, and its identity has no train_dtype key
    args = bench.parse_args(_argv(setup, out, work, "dms"))
    auto = bench.Benchmark(args)
    assert "train_dtype" not in auto.identity("dms", 0.7, 0)
    assert auto.row_name("dms", 0.7, 0) != one_shot["name"]


def test_a_search_folder_without_weights_is_a_clear_error(setup, capsys):
    """A cached DMS row whose folder lost its weights cannot be fine-tuned: one line says what to delete."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results7", setup["tmp"] / "work7"
    assert bench.main(_argv(setup, out, work, "dms", speed_reps=0)) == 0
    for weights in (work / "dms").glob("*/*.safetensors"):
        weights.unlink()
    assert bench.main(_argv(setup, out, work, "dms", speed_reps=0, recovery_steps=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the dms search folder") and "holds no weights" in err and "Traceback" not in err


def test_adopting_a_finished_search_folder(setup, monkeypatch, capsys):
    from dms_llm.cli import search

    run_dir = setup["tmp"] / "dms-run"
    assert search.main(["--model", setup["model"], "--dataset", setup["corpus"], "--output-dir", str(run_dir),
                        "--seq-len", "16", "--num-samples", "8", "--steps", "3", "--target-ratio", "0.7", "--no-eval"]) == 0
    summary = json.loads((run_dir / "search_summary.json").read_text())
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results4", setup["tmp"] / "work4"
    monkeypatch.setattr(rows_module, "run_command", lambda *a, **k: (_ for _ in ()).throw(AssertionError("searched again")))
    assert bench.main(_argv(setup, out, work, "dense,dms", speed_reps=0, adopt=f"dms@0.7={run_dir}")) == 0
    rows = json.loads((out / f"{Path(setup['model']).name}.json").read_text())["rows"]
    assert rows[1]["method"] == "dms" and rows[1]["params"] == summary["params"]
    assert rows[1]["ppl"]["wikitext2"]["llm-pruner"] > 1
    with pytest.raises(SystemExit):  # a folder made for another budget is refused before any work
        bench.main(_argv(setup, out, work, "dense,dms", speed_reps=0, adopt=f"dms@0.7={setup['tmp']}"))
    capsys.readouterr()
    assert bench.main(_argv(setup, out, work, "dense,dms", speed_reps=0, budgets=0.5, adopt=f"dms@0.5={run_dir}")) == 2
    assert "its target is" in capsys.readouterr().err


def test_dms_restarts_row_keeps_the_best_of_its_searches(setup, capsys):
    """A dms-restarts row is a search.py --restarts run; a folder that is not one cannot be adopted for it."""
    bench = _load_benchmark()
    recipe = setup["tmp"] / "dms-restarts.yaml"
    recipe.write_text(Path(setup["recipe"]).read_text() + "heldout-samples: 8\n")
    out, work = setup["tmp"] / "results8", setup["tmp"] / "work8"
    argv = _argv(setup, out, work, "dms-restarts", speed_reps=0, dms_restarts=2, dms_config=recipe)
    assert bench.main(argv) == 0
    args = bench.parse_args(argv)
    name = bench.Benchmark(args).row_name("dms-restarts", 0.7, 0)
    assert args.methods == ["dms-restarts"] and "dms-restarts" not in bench.parse_args([]).methods  # opt-in only
    assert bench.Benchmark(bench.parse_args(_argv(setup, out, work, "dms-restarts", dms_restarts=3))).row_name(
        "dms-restarts", 0.7, 0) != name  # the number of searches is part of the row's identity
    record = json.loads((work / "dms" / name / "restarts.json").read_text())
    assert [s["seed"] for s in record["searches"]] == [0, 1]
    assert record["chosen_seed"] == min(record["searches"], key=lambda s: s["heldout_loss"])["seed"]
    row = json.loads((out / f"{Path(setup['model']).name}.json").read_text())["rows"][0]
    assert row["method"] == "dms-restarts" and row["params"] == json.loads(
        (work / "dms" / name / "search_summary.json").read_text())["params"]
    assert row["ppl"]["wikitext2"]["llm-pruner"] > 1
    single = work / "dms" / name / "restarts" / "seed-0"  # one search, not a restarts run
    for bad in ([f"dms-restarts@0.7={single}"], [f"dms-restarts@0.7={work / 'dms' / name}", "--dms-restarts", "3"]):
        with pytest.raises(SystemExit):
            bench.parse_args(_argv(setup, out, work, "dms-restarts", adopt=bad[0]) + bad[1:])
        assert "a dms-restarts row needs a search.py --restarts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(_argv(setup, out, work, "dms-restarts", dms_restarts=1))


def test_bad_arguments_fail_early(setup):
    bench = _load_benchmark()
    for argv in (["--budgets", "1.2"], ["--methods", "dense,nope"], ["--dms-config", "/no/such.yaml"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


# ----- the speed helper ------------------------------------------------------------------------------


def test_speed_helpers_measure_positive_rates_and_relative_speed():
    from conftest import tiny_model

    small, big = tiny_model("llama-gqa", num_hidden_layers=1), tiny_model("llama-gqa", num_hidden_layers=8, hidden_size=96)
    assert prefill_tokens_per_s(small, batch=1, seq_len=8, reps=2) > 0
    assert decode_tokens_per_s(small, prompt_len=4, new_tokens=3, reps=2) > 0
    res = relative_speed({"big": big, "small": small}, reference="big", reps=3, seq_len=32, prompt_len=4, new_tokens=8)
    assert res["models"]["big"]["prefill_speedup"] == 1.0
    # 8 wide layers vs 1 narrow one: the small model must come out faster in both modes
    assert res["models"]["small"]["prefill_speedup"] > 1 and res["models"]["small"]["decode_speedup"] > 1
    with pytest.raises(ValueError):
        relative_speed({"a": small}, reference="b")


def test_decode_without_any_attention_recomputes_the_sequence():
    """A dms_llama model that kept no attention has no cache; decoding must still work."""
    from conftest import tiny_model

    from dms_llm.plan import LayerPlan, PrunePlan
    from dms_llm.prune import prune_model

    model = tiny_model("llama-gqa", num_hidden_layers=2)
    plan = PrunePlan.dense(model.config)
    plan.layers = [LayerPlan([], list(range(40))) for _ in range(2)]
    plan.validate()
    pruned = prune_model(model, plan)
    assert decode_tokens_per_s(pruned, prompt_len=4, new_tokens=3, reps=1) > 0


def test_skip_leaves_exactly_the_named_rows_out():
    bench = _load_benchmark()
    args = bench.parse_args(["--model", "m", "--budgets", "0.8,0.5", "--methods", "dense,flap,dms-lora",
                             "--skip", "dms-lora@0.5", "--skip", "flap@0.8"])
    assert bench.plan_rows(args) == [("dense", 1.0, 0), ("dms-lora", 0.8, 0), ("flap", 0.5, 0)]
