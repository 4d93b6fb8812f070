"""The benchmark (`dms-llm benchmark`) end to end on a tiny saved model: every method, one budget, cached reruns."""

import json
import random
import time
from pathlib import Path

import pytest
import yaml
from conftest import WORDS, save_tiny_checkpoint, write_corpus

import dms_llm.benchmark.rows as rows_module
from dms_llm.evaluation.speed import decode_tokens_per_s, prefill_tokens_per_s, relative_speed
from dms_llm.runs.options import ConfigError


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
            "--calib-samples", "8", "--seq-len", "16", "--ppl", "wikitext2", "--protocol", "llm-pruner",
            "--data-dir", setup["data"], "--dms-config", setup["recipe"], "--speed-reps", "1", "--speed-seq-len", "16",
            "--speed-new-tokens", "4", "--output-dir", str(out), "--work", str(work), "--batch-size", "4", "--align", "1",
            "--dms-seeds", "0"]  # one dms row: the rows of several seeds are tested on their own below
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}"] + ([str(v)] if v != "" else [])
    return argv


def test_benchmark_end_to_end_then_cached(setup, monkeypatch):
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results", setup["tmp"] / "work"
    methods = "dense,magnitude,wanda-sp,llm-pruner,flap,shortgpt,dms"
    start = time.perf_counter()
    assert bench.main(_argv(setup, out, work, methods, tasks="boolq", limit=4)) == 0
    wall = time.perf_counter() - start
    label = Path(setup["model"]).name
    report = json.loads((out / f"{label}.json").read_text())
    assert {"model", "machine", "machines", "command", "rows"} <= set(report)
    assert set(report["machines"]) == {"build", "ppl", "zero_shot", "speed"} and report["machines"]["ppl"] == [report["machine"]]
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == methods.split(",")
    dense = rows["dense"]["params"]
    assert rows["dense"]["prefill_speedup"] == 1.0 and rows["dense"]["time_s"] == 0
    for name, r in rows.items():
        assert set(r) == {"name", "method", "budget", "recovery", "params", "ppl", "zero_shot", "zero_shot_avg",
                          "prefill_speedup", "decode_speedup", "time_s", "machines",
                          # what every row records: seed, dtypes, calibration tokens, evaluation times
                          "seed", "zero_shot_avg_stderr", "eval_time_s", "dtype", "train_dtype", "calib_tokens",
                          "recovery_tokens"}
        assert r["recovery"] is False
        ppl = r["ppl"]["wikitext2"]["llm-pruner"]
        assert ppl > 1 and ppl == ppl
        assert 0 <= r["zero_shot"]["boolq"]["acc"] <= 1 and r["zero_shot_avg"] == r["zero_shot"]["boolq"]["acc"]
        if name != "dense":
            assert r["params"] <= int(0.7 * dense), name  # at or below the budget, as the formula counts
            assert 0 < r["time_s"] < wall, name  # seconds the method took, within the whole run
            # the reported speedups are the ratios of the tokens/s the row's file recorded for it and for dense
            (speed,) = json.loads((work / "rows" / f"{r['name']}.json").read_text())["speed"].values()
            for kind in ("prefill", "decode"):
                measured = speed[f"{kind}_tokens_per_s"] / speed["dense"][f"{kind}_tokens_per_s"]
                assert r[f"{kind}_speedup"] == pytest.approx(measured), (name, kind)
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

    # --report-only from a cache where nothing was built yet: a report without rows, and no plot
    empty_out = setup["tmp"] / "report-empty"
    assert bench.main(_argv(setup, empty_out, setup["tmp"] / "no-work", methods, report_only="")) == 0
    assert json.loads((empty_out / f"{label}.json").read_text())["rows"] == []
    assert not (empty_out / f"{label}.png").exists()


def test_a_results_file_fills_an_empty_cache_and_rebuilt_models_are_checked(setup, monkeypatch, capsys):
    """--from-results: an empty cache takes a results file's measurements without measuring anything again; a
    new cell rebuilds the models it needs, each checked against the file, and a model that disagrees with the
    file (here: a tampered value) stops the run and leaves its row as restored."""
    import copy

    import dms_llm.baselines as baselines
    import dms_llm.evaluation as evaluation
    import dms_llm.evaluation.speed as speed

    bench = _load_benchmark()
    label = Path(setup["model"]).name
    methods, base = "dense,magnitude,dms", dict(tasks="boolq", limit=4, recovery_steps=2)
    out = setup["tmp"] / "restore-source"
    assert bench.main(_argv(setup, out, setup["tmp"] / "restore-source-work", methods, **base)) == 0
    published = out / f"{label}.json"
    report = json.loads(published.read_text())
    assert len(report["rows"]) == 5 and all(r["name"] for r in report["rows"])

    def boom(*a, **k):
        raise AssertionError("measured or built a restored row")

    with monkeypatch.context() as m:
        m.setitem(baselines.METHODS, "magnitude", boom)
        m.setattr(evaluation, "evaluate_model", boom)
        m.setattr(rows_module, "run_command", boom)
        m.setattr(speed, "relative_speed", boom)
        again = setup["tmp"] / "restore-report"
        argv = _argv(setup, again, setup["tmp"] / "restore-report-work", methods, from_results=published, **base)
        assert bench.main(argv + ["--report-only"]) == 0
        assert json.loads((again / f"{label}.json").read_text())["rows"] == report["rows"]
        assert bench.main(argv) == 0  # nothing missing: nothing built or measured either
        # restored by a run that asks for less (no tasks, no timing): the file's results are kept all the same
        narrow = setup["tmp"] / "restore-narrow-work"
        assert bench.main(_argv(setup, setup["tmp"] / "restore-narrow", narrow, methods, from_results=published,
                                **{**base, "tasks": "none"}, speed_reps=0)) == 0
        assert bench.main(_argv(setup, again, narrow, methods, **base) + ["--report-only"]) == 0
        assert json.loads((again / f"{label}.json").read_text())["rows"] == report["rows"]

    # a new cell: the pruned models are built again (each once), checked, then measured; the file's cells stay
    built = []
    real_run, real_plan = rows_module.run_command, baselines.METHODS["magnitude"]
    monkeypatch.setattr(rows_module, "run_command", lambda name, *a: built.append(name) or real_run(name, *a))
    monkeypatch.setitem(baselines.METHODS, "magnitude", lambda *a, **k: built.append("magnitude") or real_plan(*a, **k))
    import dms_llm.benchmark.report as report_module

    monkeypatch.setattr(report_module, "machine", lambda: "another machine")  # the new cells are measured elsewhere
    extended = setup["tmp"] / "restore-extended"
    work = setup["tmp"] / "restore-extended-work"
    assert bench.main(_argv(setup, extended, work, methods, from_results=published, ppl_extra="wikitext2:llm-pruner:2",
                            **base)) == 0
    assert sorted(built) == ["finetune", "finetune", "magnitude", "search"]
    rows = json.loads((extended / f"{label}.json").read_text())["rows"]
    for old, new in zip(report["rows"], rows):
        assert new["ppl"]["wikitext2"]["llm-pruner"] == old["ppl"]["wikitext2"]["llm-pruner"]
        assert new["zero_shot"] == old["zero_shot"] and new["time_s"] == old["time_s"]
        assert new["ppl"]["wikitext2"]["llm-pruner@2"] > 1
        # the row's machines stay the file's, and the new cell names its own
        assert new["machines"] == {**old["machines"], "ppl/wikitext2/llm-pruner@2": "another machine"}
    cached = [json.loads(p.read_text()) for p in (work / "rows").glob("*.json")]
    rebuilt = [r["rebuilt"] for r in cached if r["method"] != "dense"]
    assert len(rebuilt) == 4 and all(r["machine"] == "another machine" for r in rebuilt)
    assert all(r["check"]["measured"] == pytest.approx(r["check"]["published"], rel=1e-4) for r in rebuilt)
    # a rebuild interrupted before its check (the model saved, no `rebuilt` yet) is checked before it is used
    magnitude = next(p for p in (work / "rows").glob("magnitude-*.json") if "-rec" not in p.name)
    interrupted = json.loads(magnitude.read_text())
    del interrupted["rebuilt"]
    magnitude.write_text(json.dumps(interrupted))
    built.clear()
    assert bench.main(_argv(setup, extended, work, "dense,magnitude", from_results=published,
                            ppl_extra="wikitext2:llm-pruner:3", **{**base, "recovery_steps": 0})) == 0
    assert built == ["magnitude"] and "rebuilt" in json.loads(magnitude.read_text())

    # a file whose value the rebuilt model does not reproduce
    tampered = copy.deepcopy(report)
    row = next(r for r in tampered["rows"] if r["method"] == "magnitude" and not r["recovery"])
    row["ppl"]["wikitext2"]["llm-pruner"] *= 1.01
    tampered_path = setup["tmp"] / "tampered.json"
    tampered_path.write_text(json.dumps(tampered))
    work = setup["tmp"] / "restore-tampered-work"
    capsys.readouterr()
    assert bench.main(_argv(setup, setup["tmp"] / "restore-tampered", work, "dense,magnitude",
                            from_results=tampered_path, ppl_extra="wikitext2:llm-pruner:2", **base)) != 0
    assert "the rebuilt model is not the one in" in capsys.readouterr().err
    left = json.loads((work / "rows" / f"{row['name']}.json").read_text())
    assert left["artifact"] is None and "rebuilt" not in left and left["params"] == row["params"]

    # a file without cache names, or not a results file: refused before any work
    unnamed = {**report, "rows": [{k: v for k, v in r.items() if k != "name"} for r in report["rows"]]}
    no_cells = {**report, "settings": {k: v for k, v in report["settings"].items() if k != "ppl_cell_specs"}}
    for text in (json.dumps(unnamed), json.dumps(no_cells), "[]"):
        tampered_path.write_text(text)
        with pytest.raises(ConfigError):
            bench.parse_args(_argv(setup, out, work, methods, from_results=tampered_path))


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


def test_compensated_baselines_are_their_plans_refit_on_the_recipes_calibration(setup, monkeypatch):
    import torch

    from dms_llm.baselines import AUTHORS_CALIBRATION_TOKENS, METHODS
    from dms_llm.checkpoints import load_model_and_tokenizer
    from dms_llm.data import load_calibration
    from dms_llm.prune import prune_model
    from dms_llm.refit import refit_output_projections

    # FLAP's authors' default as 12 blocks of the recipe's 16 tokens: more than the recipe's 8, so its row reads 12
    monkeypatch.setitem(AUTHORS_CALIBRATION_TOKENS, "flap", 12 * 16)
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-comp", setup["tmp"] / "work-comp"
    methods = "dense,flap,flap+compensation,wanda-sp,wanda-sp+compensation"
    assert bench.main(_argv(setup, out, work, methods, speed_reps=0)) == 0
    rows = {r["method"]: r for r in json.loads((out / f"{Path(setup['model']).name}.json").read_text())["rows"]}
    assert list(rows) == methods.split(",")
    assert rows["flap+compensation"]["calib_tokens"] == 12 * 16 and rows["wanda-sp+compensation"]["calib_tokens"] == 8 * 16
    # wanda-sp calibrates on the same 8 blocks either way: the same plan, and the refit alone moves the perplexity
    assert rows["wanda-sp+compensation"]["params"] == rows["wanda-sp"]["params"]
    ppl = {m: r["ppl"]["wikitext2"]["llm-pruner"] for m, r in rows.items()}
    assert ppl["wanda-sp+compensation"] != ppl["wanda-sp"]

    # the saved folder is the flap plan on the 12 blocks, refit on the first 8 of them (the refit's default
    # 128 capped by what there is), built here independently
    dense, tok = load_model_and_tokenizer(setup["model"], dtype="float32")
    blocks = load_calibration(setup["corpus"], tok, 16, 12, seed=0)
    plan = METHODS["flap"](dense, blocks, int(0.7 * sum(p.numel() for p in dense.parameters())), align=1)
    expected = prune_model(dense, plan)
    refit_output_projections(expected, dense, plan, blocks[:128])
    row = json.loads((work / "rows" / f"{rows['flap+compensation']['name']}.json").read_text())
    saved, _ = load_model_and_tokenizer(str(work / row["artifact"]), dtype="float32")
    ids = blocks[:2]
    sliced = prune_model(dense, plan)  # the same plan without the refit: what the comparison must tell apart
    with torch.no_grad():
        got, want, unfit = saved(ids).logits, expected(ids).logits, sliced(ids).logits
    assert (want - unfit).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compensated_rows_need_the_dms_recipe(setup, capsys):
    bench = _load_benchmark()
    argv = _argv(setup, setup["tmp"] / "r-norecipe", setup["tmp"] / "w-norecipe", "dense,flap+compensation", speed_reps=0)
    i = argv.index("--dms-config")
    del argv[i:i + 2]
    assert bench.main(argv) != 0
    assert "--dms-config" in capsys.readouterr().err


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
    assert bench.main(_argv(setup, out, work, "dense,magnitude", recovery_config=setup["tmp"] / "nope.yaml")) == 2


def test_a_recovery_recipe_with_a_token_budget_is_refused(setup, capsys):
    """The recovery rows are named and cached by --recovery-steps: a recipe's max-tokens would contradict it,
    so it is refused before any work (a recipe's epochs is dropped: the steps replace it)."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-tok", setup["tmp"] / "work-tok"
    recipe = setup["tmp"] / "recover-tokens.yaml"
    recipe.write_text(f"distill-weight: 0.0\nmax-tokens: 4096\ndataset: {setup['corpus']}\nseq-len: 16\nnum-samples: 8\n")
    assert bench.main(_argv(setup, out, work, "dense,magnitude", recovery_steps=2, recovery_config=recipe)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "max-tokens" in err and "--recovery-steps" in err
    assert not work.exists() and not out.exists()


def test_recovery_curve_rows_of_the_median_seed_in_their_own_table_and_plot(setup):
    """--recovery-curve: one more recovered row per point and curve method, each a fine-tuning run of that many
    tokens with the curve's recipe (a longer point reads more); dms gets one, of its median seed by the one-shot
    perplexity; the main table, plot and seed summary leave the curve out, its own table and plot show it; a
    rerun builds nothing."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-curve", setup["tmp"] / "work-curve"
    recipe = setup["tmp"] / "recover-curve.yaml"
    recipe.write_text(f"distill-weight: 0.0\nsteps: 99\ndataset: {setup['corpus']}\nseq-len: 16\nnum-samples: 8\n")
    argv = _argv(setup, out, work, "dense,magnitude,dms", speed_reps=0, recovery_steps=2, recovery_curve="32,64",
                 recovery_curve_config=recipe, curve_methods="magnitude,dms", curve_budgets="0.7") + ["--dms-seeds", "0,1,2"]
    for bad in (["--curve-methods", "flap"], ["--curve-budgets", "0.5"], ["--recovery-curve", "lots"]):
        with pytest.raises(ConfigError):
            bench.parse_args(argv + bad)
    assert bench.main(argv) == 0
    saved = [json.loads(p.read_text()) for p in (work / "rows").glob("*.json")]
    curve = {(r["method"], r["curve_tokens"]): r for r in saved if r.get("curve_tokens")}
    assert set(curve) == {("magnitude", 32), ("magnitude", 64), ("dms", 32), ("dms", 64)}
    for (method, tokens), r in curve.items():
        assert r["info"]["recovery"]["steps"] == tokens // 16 and r["recovery_tokens"] == tokens  # not the recipe's 99
        assert r["identity"]["recovery_recipe"]["steps"] == 99 and list(r["ppl"])  # the curve's own recipe, measured
    for method in ("magnitude", "dms"):  # the 64-token point continued the 32-token one (a constant learning rate)
        short, long = ([json.loads(line) for line in open(work / r["artifact"] / "metrics.jsonl")]
                       for r in (curve[method, 32], curve[method, 64]))
        assert curve[method, 32]["info"]["recovery"]["continued_at_step"] is None and len(short) == 2
        assert curve[method, 64]["info"]["recovery"]["continued_at_step"] == 2 and len(long) == 4
        assert [m["loss"] for m in long[:2]] == [m["loss"] for m in short]
    one_shot = {r["seed"]: r for r in saved if r["method"] == "dms" and not r["recovery"]}
    values = sorted((next(iter(r["ppl"].values()))["value"], seed) for seed, r in one_shot.items())
    assert len({v for v, _ in values}) == 3  # three different one-shot models: the median is one of them
    assert {curve["dms", 32]["seed"], curve["dms", 64]["seed"]} == {values[1][1]}
    report = json.loads((out / f"{Path(setup['model']).name}.json").read_text())
    assert sum(1 for r in report["rows"] if r.get("curve_tokens")) == 4
    assert all(len(s["seeds"]) == 3 for s in report["seed_summary"] if s["method"] == "dms")  # no curve row mixed in
    md = (out / f"{Path(setup['model']).name}.md").read_text()
    main_table, curve_table = md.split("## Recovery curve")
    assert "| 32 |" not in main_table and "| magnitude | 0.7 | 0 | 32 |" in curve_table and "| dms | 0.7 |" in curve_table
    assert (out / f"{Path(setup['model']).name}-curve.png").stat().st_size > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (work / "rows").glob("*.json")}
    assert bench.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (work / "rows").glob("*.json")} == stamps


def test_curve_plot_labels_a_point_by_its_rounded_token_count():
    """The curve's x ticks: 1,000,192 tokens (1M rounded up to whole batches) reads 1M, not 1.00019M."""
    from dms_llm.benchmark.report import _tokens_label

    assert [_tokens_label(t) for t in (32, 1500, 65536, 262144, 1_000_000, 1_000_192, 2_500_000)] == [
        "32", "1.5k", "64k", "256k", "1M", "1M", "2.5M"]


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


def test_search_then_recovery_in_other_precision_in_one_process(setup):
    """The search (fp32 here) and a recovery recipe with bf16 mixed precision run in one benchmark process:
    each command gets its own Accelerate state (a second Accelerator with another precision was refused)."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-mp", setup["tmp"] / "work-mp"
    recipe = setup["tmp"] / "recover-bf16.yaml"
    recipe.write_text(f"mixed-precision: bf16\ndistill-weight: 0.0\ndataset: {setup['corpus']}\nseq-len: 16\nnum-samples: 8\n")
    assert bench.main(_argv(setup, out, work, "dms", speed_reps=0, recovery_steps=2, recovery_config=recipe)) == 0
    recovered = [json.loads(p.read_text()) for p in (work / "rows").glob("dms-*-rec2-*.json")]
    assert len(recovered) == 1 and recovered[0]["ppl"]


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
    # a folder made for another budget is refused before any work
    assert bench.main(_argv(setup, out, work, "dense,dms", speed_reps=0, adopt=f"dms@0.7={setup['tmp']}")) == 2
    capsys.readouterr()
    assert bench.main(_argv(setup, out, work, "dense,dms", speed_reps=0, budgets=0.5, adopt=f"dms@0.5={run_dir}")) == 2
    assert "its target is" in capsys.readouterr().err


def test_an_adopted_search_of_the_recipe_is_restored_without_its_folder(setup, monkeypatch):
    """A row whose adopted search is exactly the benchmark recipe's records the name it has without --adopt, so
    that --from-results restores it where the folder is absent; a folder searched otherwise records none."""
    import shutil

    bench = _load_benchmark()
    label = Path(setup["model"]).name
    made, made_work = setup["tmp"] / "recipe-made", setup["tmp"] / "recipe-made-work"
    assert bench.main(_argv(setup, made, made_work, "dms", speed_reps=0, recovery_steps=2)) == 0
    searched = {r["recovery"]: r for r in json.loads((made / f"{label}.json").read_text())["rows"]}
    assert all("recipe_name" not in r for r in searched.values())  # not adopted: its name is the recipe's already
    folder = setup["tmp"] / "recipe-search"  # the search, moved out of the cache as if made by `dms-llm search`
    shutil.copytree(made_work / "dms" / searched[False]["name"], folder)

    adopted_out, adopted_work = setup["tmp"] / "recipe-adopted", setup["tmp"] / "recipe-adopted-work"
    assert bench.main(_argv(setup, adopted_out, adopted_work, "dms", speed_reps=0, recovery_steps=2,
                            adopt=f"dms@0.7={folder}")) == 0
    published = adopted_out / f"{label}.json"
    adopted = {r["recovery"]: r for r in json.loads(published.read_text())["rows"]}
    for recovery in (False, True):
        assert adopted[recovery]["name"] != searched[recovery]["name"]  # named by its folder
        assert adopted[recovery]["recipe_name"] == searched[recovery]["name"]

    shutil.rmtree(folder)  # another machine: no folder, no --adopt; restored, nothing searched or fine-tuned again
    monkeypatch.setattr(rows_module, "run_command", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built again")))
    restored_out = setup["tmp"] / "recipe-restored"
    assert bench.main(_argv(setup, restored_out, setup["tmp"] / "recipe-restored-work", "dms", speed_reps=0,
                            recovery_steps=2, from_results=published)) == 0
    restored = {r["recovery"]: r for r in json.loads((restored_out / f"{label}.json").read_text())["rows"]}
    for recovery in (False, True):
        assert restored[recovery]["name"] == searched[recovery]["name"]
        assert restored[recovery]["ppl"] == adopted[recovery]["ppl"]

    from dms_llm.cli import search  # a search of other settings (3 steps, the default structures) is not the recipe's

    other = setup["tmp"] / "other-search"
    assert search.main(["--model", setup["model"], "--dataset", setup["corpus"], "--output-dir", str(other),
                        "--seq-len", "16", "--num-samples", "8", "--steps", "3", "--target-ratio", "0.7", "--no-eval"]) == 0
    args = bench.parse_args(_argv(setup, adopted_out, adopted_work, "dms", adopt=f"dms@0.7={other}"))
    assert bench.Benchmark(args).recipe_name("dms", 0.7, 0, 0) is None
    recorded = json.loads((other / "search_config.json").read_text())
    expected = bench.Benchmark(args).dms_search_values("dms", 0.7, 0, str(other))
    assert not rows_module.same_search(recorded, expected)
    assert rows_module.same_search({**recorded, **expected, "output_dir": "elsewhere"}, expected)
    assert not rows_module.same_search({**recorded, **expected, "seed": 1}, expected)


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
        with pytest.raises(ConfigError, match="a dms-restarts row needs a `dms-llm search --restarts"):
            bench.parse_args(_argv(setup, out, work, "dms-restarts", adopt=bad[0]) + bad[1:])
    with pytest.raises(ConfigError):
        bench.parse_args(_argv(setup, out, work, "dms-restarts", dms_restarts=1))


def test_bad_arguments_fail_early(setup):
    bench = _load_benchmark()
    for argv in (["--budgets", "1.2"], ["--methods", "dense,nope"], ["--dms-config", "/no/such.yaml"]):
        with pytest.raises(ConfigError):
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


@pytest.mark.parametrize("non_uniform", [False, True], ids=["llama", "dms_llama"])
def test_decode_passes_the_cache_under_the_name_the_model_declares(non_uniform):
    """Every timed decode step gets one new token and the KV cache, under the forward keyword this transformers
    declares (5.24 renamed `past_key_values` to `cache` and warns about the old name: no warning may escape)."""
    import inspect
    import warnings

    from conftest import tiny_model

    from dms_llm.evaluation.speed import time_decode
    from dms_llm.plan import PrunePlan
    from dms_llm.prune import prune_model

    model = tiny_model("llama-gqa", num_hidden_layers=2)
    if non_uniform:
        plan = PrunePlan.dense(model.config)
        plan.layers[0].mlp_channels = plan.layers[0].mlp_channels[:16]
        plan.validate()
        model = prune_model(model, plan)
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    declared = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        time_decode(model, prompt_len=4, new_tokens=3)
    prompt, *steps = calls
    assert prompt["input_ids"].shape[1] == 4 and len(steps) == 3
    for step in steps:
        assert step["input_ids"].shape[1] == 1 and step.get(declared) is not None


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


# ----- issue 17: seeds, perplexity cells per budget, standard errors, --config, llama.cpp ------------------


def _report(out, setup):
    return json.loads((out / f"{Path(setup['model']).name}.json").read_text())


def test_dms_seeds_make_one_row_each_and_a_median(setup, monkeypatch):
    """--dms-seeds: one search and one row per seed (with its `seed`), each its own cached row; the table
    shows their median with the spread; a seed's finished search folder can be adopted; a rerun computes
    nothing."""
    from dms_llm.cli import search

    adopted = setup["tmp"] / "dms-seed1"
    assert search.main(["--config", setup["recipe"], "--model", setup["model"], "--output-dir", str(adopted),
                        "--target-ratio", "0.7", "--seed", "1", "--no-eval", "--align", "1"]) == 0
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-seeds", setup["tmp"] / "work-seeds"
    argv = _argv(setup, out, work, "dense,flap,dms", speed_reps=0, tasks="boolq", limit=4) + [
        "--dms-seeds", "0,1,2", "--adopt", f"dms@0.7={adopted}"]
    with pytest.raises(ConfigError):  # a folder searched with a seed that is not one of --dms-seeds
        bench.parse_args(argv[:-4] + ["--dms-seeds", "0,2", "--adopt", f"dms@0.7={adopted}"])
    assert bench.main(argv) == 0
    report = _report(out, setup)
    dms = [r for r in report["rows"] if r["method"] == "dms"]
    assert [r["seed"] for r in dms] == [0, 1, 2] and all(r["budget"] == 0.7 for r in dms)
    assert [r["seed"] for r in report["rows"] if r["method"] != "dms"] == [0, 0]  # dense and flap: --seed
    saved = {json.loads(p.read_text())["seed"]: json.loads(p.read_text()) for p in (work / "rows").glob("dms-*.json")}
    assert sorted(saved) == [0, 1, 2] and saved[1]["info"]["adopted"] == str(adopted)
    assert saved[1]["time_s"] == json.loads((adopted / "search_summary.json").read_text())["search_time_s"]
    for seed in (0, 2):  # searched here, each with its seed (and the recipe's calibration: 8 blocks x 16 tokens)
        settings = json.loads((work / saved[seed]["artifact"] / "search_config.json").read_text())
        assert settings["seed"] == seed and saved[seed]["calib_tokens"] == 8 * 16
    assert not any("seed" in name for name in [saved[0]["name"]]) and "-seed2-" in saved[2]["name"]
    (summary,) = report["seed_summary"]
    assert summary["seeds"] == [0, 1, 2] and (summary["budget"], summary["recovery"]) == (0.7, False)
    ppl = sorted(r["ppl"]["wikitext2"]["llm-pruner"] for r in dms)
    assert summary["median"]["ppl"]["wikitext2"]["llm-pruner"] == ppl[1]
    assert summary["min"]["ppl"]["wikitext2"]["llm-pruner"] == ppl[0] and summary["max"]["ppl"]["wikitext2"]["llm-pruner"] == ppl[2]
    assert summary["max_over_min"]["wikitext2"]["llm-pruner"] == pytest.approx(ppl[2] / ppl[0])
    assert summary["median"]["time_s"] == sorted(r["time_s"] for r in dms)[1]
    md = (out / f"{Path(setup['model']).name}.md").read_text()
    assert "| dms (median of 3 seeds) | 0.7 | no | 0,1,2 |" in md and "## DMS over its seeds" in md
    assert md.count("| dms | 0.7 | no |") == 3  # every seed's own row, below the table

    # a rerun computes nothing
    import dms_llm.baselines as baselines
    import dms_llm.evaluation as evaluation

    def boom(*a, **k):
        raise AssertionError("recomputed a cached result")

    for name in list(baselines.METHODS):
        monkeypatch.setitem(baselines.METHODS, name, boom)
    monkeypatch.setattr(evaluation, "evaluate_model", boom)
    monkeypatch.setattr(rows_module, "run_command", boom)
    assert bench.main(argv) == 0
    assert _report(out, setup)["rows"] == report["rows"]


def test_seed_summary_and_the_table_from_hand_made_rows():
    """The median per cell (middle value; mean of the two middle ones for an even count), the smallest and
    largest, max/min of perplexity, and the table's `median (min–max)` cells, on values set by hand."""
    from dms_llm.benchmark.report import markdown, seed_summary

    def row(seed, wt, ptb, zs, se, time_s, recovery=False):
        return {"method": "dms", "budget": 0.8, "recovery": recovery, "seed": seed, "params": 100_000_000 + seed * 1_000_000,
                "ppl": {"wikitext2": {"llm-pruner": wt}, "ptb": {"llm-pruner": ptb}},
                "zero_shot": {"boolq": {"value": zs, "stderr": se}}, "zero_shot_avg": zs, "zero_shot_avg_stderr": se,
                "prefill_speedup": None, "decode_speedup": None, "time_s": time_s, "calib_tokens": 65_536, "machines": {}}

    rows = [row(0, 150.0, 240.0, 0.40, 0.02, 800.0), row(1, 130.0, 260.0, 0.50, 0.03, 900.0),
            row(2, 140.0, 200.0, 0.45, 0.01, 700.0), row(0, 90.0, 120.0, 0.5, 0.02, 1800.0, True),
            row(1, 100.0, 130.0, 0.4, 0.02, 1700.0, True)]
    one_shot, recovered = seed_summary(rows)
    assert one_shot["seeds"] == [0, 1, 2] and recovered["seeds"] == [0, 1]
    med, lo, hi = one_shot["median"], one_shot["min"], one_shot["max"]
    assert med["ppl"] == {"wikitext2": {"llm-pruner": 140.0}, "ptb": {"llm-pruner": 240.0}}  # per cell, not one seed's row
    assert lo["ppl"]["ptb"]["llm-pruner"] == 200.0 and hi["ppl"]["wikitext2"]["llm-pruner"] == 150.0
    assert one_shot["max_over_min"] == {"wikitext2": {"llm-pruner": pytest.approx(150 / 130)},
                                        "ptb": {"llm-pruner": pytest.approx(260 / 200)}}
    assert med["zero_shot_avg"] == 0.45 and med["zero_shot_avg_stderr"] == 0.02 and med["time_s"] == 800.0
    assert med["params"] == 101_000_000 and med["zero_shot"]["boolq"] == {"value": 0.45, "stderr": 0.02}
    assert recovered["median"]["ppl"]["wikitext2"]["llm-pruner"] == 95.0  # two seeds: the mean of both
    rows.append(row(3, 120.0, None, 0.3, 0.02, 600.0))  # a seed still missing a cell: no median of the others
    partial = seed_summary(rows)[0]
    assert partial["median"]["ppl"]["ptb"]["llm-pruner"] is None and partial["median"]["ppl"]["wikitext2"]["llm-pruner"] == 135.0
    report = {"model": "m", "machine": "x", "machines": {}, "command": "dms-llm benchmark", "settings": {"limit": 4},
              "rows": rows[:5], "seed_summary": seed_summary(rows[:5])}
    md = markdown(report)
    line = next(x for x in md.splitlines() if x.startswith("| dms (median of 3 seeds) | 0.8 | no | 0,1,2 | 101.00 (100.00–102.00) |"))
    assert "| 140.00 (130.00–150.00) | 240.00 (200.00–260.00) |" in line
    assert "| 45.00 (40.00–50.00) | 45.00 ± 2.00 (40.00–50.00) |" in line and line.endswith("| 800.0 (700.0–900.0) | 65,536 |")
    spread = next(x for x in md.splitlines() if x.startswith("| 0.8 | no | 0,1,2 |"))
    assert spread == "| 0.8 | no | 0,1,2 | 1.154 | 1.300 | 800.0 (700.0–900.0) |"


def test_zero_shot_average_and_its_standard_error():
    from dms_llm.benchmark.cells import zero_shot_average

    tasks = [{"value": 0.5, "stderr": 0.03}, {"value": 0.7, "stderr": 0.04}, {"value": 0.3, "stderr": 0.0}]
    avg, se = zero_shot_average(tasks)
    assert avg == pytest.approx(0.5) and se == pytest.approx(0.05 / 3)  # sqrt(0.03^2 + 0.04^2 + 0) / 3
    assert zero_shot_average(tasks[:2] + [None]) == (None, None)  # a task not measured yet: no average
    assert zero_shot_average(tasks[:2] + [{"value": 0.3, "stderr": None}]) == (pytest.approx(0.5), None)


def test_long_windows_only_for_the_rows_of_one_budget(setup):
    """--ppl-extra wikitext2:sparsegpt:all:0.7: the whole split in 2048-token windows (the tiny model's context
    caps them at 128) for dense and the 0.7 rows, never for the 0.5 rows; the per-task standard errors and
    the average's are in the report."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-cells", setup["tmp"] / "work-cells"
    argv = _argv(setup, out, work, "dense,magnitude", speed_reps=0, budgets="0.7,0.5", max_windows=3, tasks="boolq",
                 limit=4) + ["--ppl-extra", "wikitext2:sparsegpt:all:0.7", "--ppl-extra", "wikitext2:llm-pruner::0.5"]
    start = time.perf_counter()
    assert bench.main(argv) == 0
    wall = time.perf_counter() - start
    rows = {(r["method"], r["budget"]): r for r in _report(out, setup)["rows"]}
    dense, b07, b05 = rows[("dense", 1.0)], rows[("magnitude", 0.7)], rows[("magnitude", 0.5)]
    assert set(dense["ppl"]["wikitext2"]) == {"llm-pruner", "sparsegpt", "llm-pruner@all"}
    assert set(b07["ppl"]["wikitext2"]) == {"llm-pruner", "sparsegpt"}
    assert set(b05["ppl"]["wikitext2"]) == {"llm-pruner", "llm-pruner@all"}  # no 2048-token cell at 0.5
    saved = {json.loads(p.read_text())["budget"]: json.loads(p.read_text()) for p in (work / "rows").glob("magnitude-*.json")}
    main, whole = saved[0.7]["ppl"]["wikitext2|llm-pruner|mw=3"], saved[0.7]["ppl"]["wikitext2|sparsegpt|mw=None"]
    assert main["n_windows"] == 3 and whole["n_windows"] > 3
    # measured, not left unset: 3 tiny windows can round to 0.00 s on a fast CPU
    assert isinstance(main["time_s"], float) and 0 <= main["time_s"] < wall
    assert "wikitext2|sparsegpt|mw=None" not in saved[0.5]["ppl"]
    for r in (dense, b07, b05):
        se = r["zero_shot"]["boolq"]["stderr"]
        assert se == r["zero_shot"]["boolq"]["acc_stderr"] and r["zero_shot_avg_stderr"] == pytest.approx(se)
        assert r["calib_tokens"] == (0 if r["method"] == "dense" else 8 * 16) and r["dtype"] == "float32"
        assert set(r["eval_time_s"]) >= {"ppl/wikitext2/llm-pruner", "zero_shot/boolq"}
    md = (out / f"{Path(setup['model']).name}.md").read_text()
    assert "wikitext2 (sparsegpt) = 2048-token windows, the whole split, the 0.7 rows and dense" in md
    assert "zero-shot avg ± SE" in md and f"± {100 * b07['zero_shot_avg_stderr']:.2f}" in md
    # asking for the 2048-token cell for every budget later adds only the 0.5 row's cell
    import dms_llm.evaluation as evaluation

    calls = []
    real = evaluation.evaluate_model
    argv2 = argv[: argv.index("--ppl-extra")] + ["--ppl-extra", "wikitext2:sparsegpt", "--ppl-extra", "wikitext2:llm-pruner::0.5"]
    try:
        evaluation.evaluate_model = lambda *a, **k: calls.append((k["ppl"], k["protocols"], k["max_windows"])) or real(*a, **k)
        assert bench.main(argv2) == 0
    finally:
        evaluation.evaluate_model = real
    assert calls == [(["wikitext2"], ["sparsegpt"], None)]


def test_ppl_cells_parse_and_name_their_columns():
    from dms_llm.benchmark.cells import parse_ppl_extra, ppl_cells

    (wt, ptb) = parse_ppl_extra("wikitext2,ptb:sparsegpt:all:0.8")
    assert (wt.dataset, wt.protocol, wt.max_windows, wt.budgets) == ("wikitext2", "sparsegpt", None, (0.8,))
    assert ptb.applies("dense", 1.0) and ptb.applies("flap", 0.8) and not ptb.applies("flap", 0.5)
    assert parse_ppl_extra("ptb:llm-pruner:40")[0].max_windows == 40 and parse_ppl_extra("ptb:llm-pruner")[0].budgets is None
    for bad in ("wikitext2", "nope:sparsegpt", "ptb:nope", "ptb:sparsegpt:0", "ptb:sparsegpt:x", "ptb:sparsegpt:all:y",
                "a:b:c:d:e", "ptb:llm-pruner,sparsegpt", "ptb:sparsegpt:all:,"):
        with pytest.raises(ValueError):
            parse_ppl_extra(bad)
    cells = ppl_cells(["wikitext2"], ["llm-pruner"], 320, parse_ppl_extra("wikitext2,ptb:sparsegpt:all:0.8")
                      + parse_ppl_extra("wikitext2:llm-pruner:all") + parse_ppl_extra("wikitext2:llm-pruner:320"))
    assert [(c.dataset, c.column, c.max_windows) for c in cells] == [
        ("wikitext2", "llm-pruner", 320), ("wikitext2", "sparsegpt", None), ("ptb", "sparsegpt", None),
        ("wikitext2", "llm-pruner@all", None)]  # the last spec repeats the main cell: dropped
    # a spec repeating an extra cell for other budgets widens that cell's budgets (it is not dropped)
    merged = ppl_cells(["wikitext2"], ["llm-pruner"], 320, parse_ppl_extra("ptb:sparsegpt:all:0.8")
                       + parse_ppl_extra("ptb:sparsegpt::0.5,0.8") + parse_ppl_extra("wikitext2:sparsegpt:all:0.5")
                       + parse_ppl_extra("wikitext2:sparsegpt"))
    assert [(c.dataset, c.column, c.budgets) for c in merged[1:]] == [("ptb", "sparsegpt", (0.8, 0.5)),
                                                                      ("wikitext2", "sparsegpt", None)]


def test_config_file_and_the_issue_17_preset(setup, tmp_path, monkeypatch):
    """--config FILE sets any option (the command line overrides it); the shipped preset asks for exactly
    the issue-17 table, with the five DMS seeds of issue 38."""
    bench = _load_benchmark()
    config = tmp_path / "bench.yaml"
    config.write_text("budgets: 0.8,0.5\nmethods: [dense, flap, dms]\nlimit: 500\ndms-seeds: 3,4,5\n"
                      "ppl-extra: ['ptb:sparsegpt:all:0.8']\nmax-windows: 320\nseed: 2\n")
    args = bench.parse_args(["--config", str(config), "--budgets", "0.7", "--ppl-extra", "wikitext2:sparsegpt"])
    assert args.budgets == [0.7] and args.methods == ["dense", "flap", "dms"] and args.limit == 500 and args.seed == 2
    assert args.dms_seeds == [3, 4, 5] and args.config == str(config) and args.max_windows == 320
    assert [(c.dataset, c.protocol, c.budgets) for c in args.ppl_cells[-2:]] == [("ptb", "sparsegpt", (0.8,)),
                                                                             ("wikitext2", "sparsegpt", None)]
    assert bench.parse_args(["--seed", "5"]).dms_seeds == [5, 6, 7]  # default: three seeds from --seed
    quick = bench.parse_args(["--config", str(config), "--ppl-extra", "none", "--tasks", "none"])
    assert [(c.dataset, c.column) for c in quick.ppl_cells] == [("wikitext2", "llm-pruner")] and quick.tasks == []
    again = bench.parse_args(["--config", str(config), "--ppl-extra", "none", "--ppl-extra", "wikitext2:sparsegpt"])
    assert [(c.dataset, c.column) for c in again.ppl_cells] == [("wikitext2", "llm-pruner"), ("wikitext2", "sparsegpt")]
    for text in ("nope: 1\n", "report-only: maybe\n", "- a list\n"):
        config.write_text(text)
        with pytest.raises(ConfigError):
            bench.parse_args(["--config", str(config)])

    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the preset names its recipes relative to the repository root
    preset = ["--config", str(repo / "recipes" / "benchmark" / "smollm2-135m.yaml"), "--dms-config",
              str(repo / "recipes" / "smollm2-135m-default.yaml"), "--recovery-config",
              str(repo / "recipes" / "finetune" / "smollm2-135m-recover.yaml")]
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(ConfigError):  # the preset asks for llama.cpp columns; without the extra they are refused
            bench.parse_args(preset)
        assert bench.parse_args(preset + ["--report-only"]).llamacpp  # ... but their cached values can be reported
        preset.append("--no-llamacpp")
    a = bench.parse_args(preset)
    assert a.budgets == [0.8, 0.5] and a.dms_seeds == [0, 1, 2, 3, 4] and a.dms_restarts == 3 and a.recovery_steps == 250
    assert a.dms_budget_config == {0.5: "recipes/smollm2-135m-heads-kept.yaml"}  # the MLPs alone cannot reach 50%
    assert a.dms_steps == {}  # the 50% searches run the heads-kept recipe's own steps: one place says how many
    assert bench.parse_args(preset + ["--budgets", "0.8"]).dms_budget_config == {}  # the file's 0.5=... names no row here
    with pytest.raises(ConfigError):  # ... but given on the command line, a budget not benchmarked is a typo
        bench.parse_args(preset + ["--budgets", "0.8", "--dms-budget-config", f"0.5={a.dms_budget_config[0.5]}"])
    assert a.methods == ["dense", "magnitude", "wanda-sp", "llm-pruner", "flap", "shortgpt", "flap+compensation",
                         "llm-pruner+compensation", "dms", "dms-restarts", "dms-lora"]
    assert a.tasks == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"] and a.limit == 500
    assert [(c.dataset, c.protocol, c.max_windows, c.budgets) for c in a.ppl_cells] == [
        ("wikitext2", "llm-pruner", 320, None), ("ptb", "llm-pruner", 320, None),
        ("wikitext2", "sparsegpt", None, (0.8,)), ("ptb", "sparsegpt", None, (0.8,))]
    assert a.align == 32 and a.dtype == "float32" and a.llamacpp_outtype == "q8_0"
    dms_recipe = yaml.safe_load((repo / "recipes" / "smollm2-135m-default.yaml").read_text())
    assert a.calib_samples * a.seq_len >= dms_recipe["num-samples"] * dms_recipe["seq-len"]  # no baseline reads less
    rows = [(m, b, r) for m, b, r in bench.plan_rows(a) for _ in bench.Benchmark(a).seeds(m)]
    # dense; per budget, one-shot and recovered: 5 baselines, 2 compensated ones, 5 DMS seeds, restarts, LoRA;
    # then the recovery curve at 80%: 3 points of DMS (one seed, once its one-shot rows are measured) and 2 baselines
    assert len(rows) == 1 + 2 * 2 * (5 + 2 + 5 + 1 + 1) + 3 * (5 + 2)
    assert [(m, b, r.tokens) for m, b, r in a.curve][:3] == [("dms", 0.8, 65536), ("dms", 0.8, 262144), ("dms", 0.8, 1000000)]
    assert {m for m, _, _ in a.curve} == {"dms", "flap+compensation", "llm-pruner+compensation"}
    assert bench.parse_args(preset + ["--recovery-curve", "none"]).curve == []  # one-shot rows only, as --tasks none


def test_the_dms_recipe_reaches_the_search_with_its_align_and_warmup(setup):
    """A --dms-config recipe's warmup-blocks reaches the search; its align is the benchmark's for every method
    (no --align), and a --align that disagrees with it is refused before any work."""
    bench = _load_benchmark()
    recipe = setup["tmp"] / "dms-warmup.yaml"
    recipe.write_text(Path(setup["recipe"]).read_text() + "warmup-blocks: 2\nalign: 2\n")
    out, work = setup["tmp"] / "results-warmup", setup["tmp"] / "work-warmup"
    argv = _argv(setup, out, work, "dms,magnitude", speed_reps=0, dms_config=recipe)
    argv = argv[: argv.index("--align")] + argv[argv.index("--align") + 2:]
    with pytest.raises(ConfigError):
        bench.parse_args(argv + ["--align", "4"])
    assert bench.parse_args(argv + ["--align", "2"]).align == 2 and bench.parse_args(_argv(setup, out, work, "dms")).align == 1
    assert bench.main(argv) == 0
    saved = {p.name.split("-")[0]: json.loads(p.read_text()) for p in (work / "rows").glob("*.json")}
    settings = json.loads((work / saved["dms"]["artifact"] / "search_config.json").read_text())
    assert settings["warmup_blocks"] == 2 and settings["align"] == 2
    assert saved["dms"]["identity"]["align"] == saved["magnitude"]["identity"]["align"] == 2
    assert saved["dms"]["identity"]["recipe"]["warmup_blocks"] == 2  # a new warmup is a new search


def test_dms_steps_replace_the_recipe_steps_for_one_budget_only(setup):
    """--dms-steps 0.5=N: the DMS searches at 0.5 run N steps, a new row; the other budget's row keeps the
    recipe's steps and its name, so its cached measurements stay valid. A malformed value or a budget that
    is not benchmarked is refused before any work."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-steps", setup["tmp"] / "work-steps"
    recipe_steps = 4  # the fixture recipe's
    argv = _argv(setup, out, work, "dms", speed_reps=0, budgets="0.7,0.5")
    for bad in ("0.5", "0.5=x", "0.6=4", "0.5=0"):
        with pytest.raises(ConfigError):
            bench.parse_args(argv + ["--dms-steps", bad])
    plain, stepped = bench.Benchmark(bench.parse_args(argv)), bench.Benchmark(bench.parse_args(argv + ["--dms-steps", "0.5=3"]))
    assert stepped.row_name("dms", 0.7, 0) == plain.row_name("dms", 0.7, 0)
    assert stepped.row_name("dms", 0.5, 0) != plain.row_name("dms", 0.5, 0)
    assert bench.main(argv + ["--dms-steps", "0.5=3"]) == 0
    steps = {}
    for path in (work / "rows").glob("*.json"):
        row = json.loads(path.read_text())
        steps[row["budget"]] = len((work / row["artifact"] / "metrics.jsonl").read_text().splitlines())
    assert steps == {0.5: 3, 0.7: recipe_steps}
    assert json.loads((out / f"{Path(setup['model']).name}.json").read_text())["settings"]["dms_steps"] == {"0.5": 3}


def test_a_budget_recipe_replaces_the_dms_recipe_for_that_budget_only(setup):
    """--dms-budget-config 0.5=FILE: the DMS search at 0.5 runs that recipe (here: other structures), a new row;
    the other budget's row keeps --dms-config and its name. A missing file, a budget that is not benchmarked and
    a recipe whose align disagrees are refused before any work."""
    bench = _load_benchmark()
    out, work = setup["tmp"] / "results-budget-recipe", setup["tmp"] / "work-budget-recipe"
    widths = setup["tmp"] / "dms-widths.yaml"
    widths.write_text(Path(setup["recipe"]).read_text().replace("prune: heads,channels,layers", "prune: channels,hidden"))
    assert widths.read_text() != Path(setup["recipe"]).read_text()
    argv = _argv(setup, out, work, "dms", speed_reps=0, budgets="0.7,0.5")
    misaligned = setup["tmp"] / "dms-align4.yaml"
    misaligned.write_text(widths.read_text() + "align: 4\n")
    for bad in ("0.5", f"0.6={widths}", "0.5=missing.yaml", f"0.5={misaligned}"):
        with pytest.raises(ConfigError):
            bench.parse_args(argv + ["--dms-budget-config", bad])
    given = argv + ["--dms-budget-config", f"0.5={widths}"]
    plain, split = bench.Benchmark(bench.parse_args(argv)), bench.Benchmark(bench.parse_args(given))
    assert split.row_name("dms", 0.7, 0) == plain.row_name("dms", 0.7, 0)
    assert split.row_name("dms", 0.5, 0) != plain.row_name("dms", 0.5, 0)
    assert bench.main(given) == 0
    structures = {}
    for path in (work / "rows").glob("*.json"):
        row = json.loads(path.read_text())
        structures[row["budget"]] = json.loads((work / row["artifact"] / "search_config.json").read_text())["prune"]
    assert structures == {0.5: "channels,hidden", 0.7: "heads,channels,layers"}
    assert json.loads((out / f"{Path(setup['model']).name}.json").read_text())["settings"]["dms_budget_config"] == {
        "0.5": str(widths)}


def test_llamacpp_columns_from_gguf_files_of_every_row(setup, tmp_path, monkeypatch):
    """--llamacpp: each row's checkpoint and the dense one exported to GGUF and timed in llama.cpp; the
    speed-up is the ratio of the medians of the recorded samples; a recovered row reuses its pruned row's
    timing (same shapes); a rerun times nothing."""
    pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed")
    import statistics

    from conftest import tiny_model
    from test_export_gguf import byte_level_tokenizer

    import dms_llm.export.llamacpp as llamacpp

    model_dir = str(tmp_path / "bpe-model")  # llama.cpp needs a BPE tokenizer
    model = tiny_model("llama-gqa", num_hidden_layers=2, vocab_size=320)
    model.config.pad_token_id = None
    model.save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    bench = _load_benchmark()
    out, work = tmp_path / "results", tmp_path / "work"
    argv = _argv({**setup, "model": model_dir}, out, work, "dense,magnitude", speed_reps=0, recovery_steps=2) + [
        "--llamacpp", "--llamacpp-outtype", "f32", "--llamacpp-reps", "2", "--llamacpp-pp", "16", "--llamacpp-tg", "4"]
    assert bench.main(argv) == 0
    rows = {(r["method"], r["recovery"]): r for r in _report(out, {"model": model_dir})["rows"]}
    assert rows[("dense", False)]["llamacpp_pp_speedup"] == 1.0 and rows[("dense", False)]["llamacpp_tg_speedup"] == 1.0
    saved = {p.name: json.loads(p.read_text()) for p in (work / "rows").glob("magnitude-*.json")}
    pruned = next(r for n, r in saved.items() if "-rec" not in n)
    recovered = next(r for n, r in saved.items() if "-rec2-" in n)
    (timing,) = pruned["llamacpp"].values()
    clock = timing["clock"]
    for kind in ("pp", "tg"):
        mine = statistics.median(timing["samples"]["pruned"][f"{kind}_{clock}"])
        dense = statistics.median(timing["samples"]["dense"][f"{kind}_{clock}"])
        assert rows[("magnitude", False)][f"llamacpp_{kind}_speedup"] == pytest.approx(mine / dense)
    assert (work / timing["gguf"]).is_file() and len(list((work / "gguf").glob("*.gguf"))) == 2  # dense, pruned: not the recovered
    (reused,) = recovered["llamacpp"].values()
    assert reused["measured_on"] == pruned["name"] and reused["pp_speedup"] == timing["pp_speedup"]
    md = (out / "bpe-model.md").read_text()
    assert "llama.cpp pp ×" in md and "f32 GGUF files, 1 thread(s)" in md
    monkeypatch.setattr(llamacpp, "interleaved_speed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed again")))
    assert bench.main(argv) == 0


def test_summary_pairs_one_shot_with_recovered_and_bolds_the_best_per_budget():
    from dms_llm.benchmark.report import markdown, seed_summary, summary_lines

    def row(method, budget, recovery, wt2, avg, seed=0):
        return {"method": method, "budget": budget, "recovery": recovery, "seed": seed, "params": 8e7 if budget < 1 else 1e8,
                "ppl": {"wikitext2": {"llm-pruner": wt2}}, "zero_shot": {}, "zero_shot_avg": avg}

    rows = [row("dense", 1.0, 0, 50.0, 0.5), row("flap", 0.8, 0, 125.0, 0.45), row("flap", 0.8, 250, 100.0, 0.40)]
    rows += [row("dms", 0.8, 0, wt2, 0.41, seed) for seed, wt2 in enumerate((120.0, 130.0, 140.0))]
    rows += [row("dms", 0.8, 250, wt2, 0.42, seed) for seed, wt2 in enumerate((90.0, 95.0, 200.0))]
    rows += [row("flap", 0.5, 0, 900.0, None), row("dms", 0.5, 0, 800.0, 0.38), row("dms", 0.5, 250, 300.0, None)]
    report = {"model": "m", "machine": "here", "command": "dms-llm benchmark", "rows": rows, "seed_summary": seed_summary(rows),
              "settings": {"ppl": ["wikitext2"], "protocols": ["llm-pruner"]}}
    lines = summary_lines(report)
    assert lines[0] == ("| method | budget | params (M) | wikitext2 (llm-pruner) | zero-shot avg | "
                        "wikitext2 (llm-pruner), recovered | zero-shot avg, recovered |")
    assert lines[2:] == [
        "| dense | – | 100.00 | 50.00 | 50.00 | – | – |",  # dense is never bold, though it is the lowest
        "| flap | 0.8 | 80.00 | **125.00** | **45.00** | 100.00 | 40.00 |",  # DMS's median 130 loses, its best seed 120 would not
        "| dms (median of 3 seeds) | 0.8 | 80.00 | 130.00 | 41.00 | **95.00** | **42.00** |",  # the mean 128.33 would lose
        "| flap | 0.5 | 80.00 | 900.00 | – | – | – |",
        # zero-shot and recovered stay plain: FLAP has neither cell yet, so a best of the measured ones would mislead
        "| dms | 0.5 | 80.00 | **800.00** | 38.00 | 300.00 | – |"]
    assert "## Summary" in markdown(report)


def test_plot_panels_per_perplexity_cell_with_collapsed_models_at_the_edge(tmp_path):
    """A panel per main perplexity cell and one for zero-shot; a perplexity above OFF_SCALE x dense is drawn
    at that line and flagged, so one collapsed model does not squash the others (values set by hand)."""
    from dms_llm.benchmark.report import OFF_SCALE, plot, plot_panels, seed_summary

    def row(method, budget, recovery, wt2, ptb, avg, seed=0):
        return {"method": method, "budget": budget, "recovery": recovery, "seed": seed, "params": 1e8 * budget,
                "ppl": {"wikitext2": {"llm-pruner": wt2}, "ptb": {"llm-pruner": ptb}}, "zero_shot": {}, "zero_shot_avg": avg}

    rows = [row("dense", 1.0, 0, 50.0, 80.0, 0.5), row("magnitude", 0.8, 0, 1e6, 200.0, None),
            row("magnitude", 0.8, 250, 900.0, 150.0, None)]
    rows += [row("dms", 0.8, 0, wt2, 100.0, 0.4, seed) for seed, wt2 in enumerate((120.0, 130.0, 140.0))]
    report = {"model": "m", "rows": rows, "seed_summary": seed_summary(rows),
              "settings": {"ppl": ["wikitext2", "ptb"], "protocols": ["llm-pruner"]}}
    panels = plot_panels(report)
    assert [p["path"] for p in panels] == [("ppl", "wikitext2", "llm-pruner"), ("ppl", "ptb", "llm-pruner"), ("zero_shot_avg",)]
    wt2 = {(s["method"], s["recovery"]): s for s in panels[0]["series"]}
    assert panels[0]["dense"] == 50.0 and panels[0]["cap"] == OFF_SCALE * 50.0
    assert wt2[("magnitude", False)]["y"] == [OFF_SCALE * 50.0] and wt2[("magnitude", False)]["off_scale"] == [True]
    assert wt2[("magnitude", True)]["y"] == [900.0] and wt2[("magnitude", True)]["off_scale"] == [False]
    assert wt2[("dms", False)]["y"] == [130.0]  # three seeds: their median
    assert {(s["method"], s["recovery"]) for s in panels[1]["series"]} == set(wt2)
    zs = panels[2]
    assert zs["dense"] == 50.0 and zs["cap"] is None and [s["method"] for s in zs["series"]] == ["dms"]
    assert zs["series"][0]["y"] == [pytest.approx(40.0)]
    plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_are_the_typed_records_they_declare(setup, tmp_path):
    """`Row` / `ReportedRow` type the JSON without changing it: a new row has exactly `Row`'s required keys,
    and every row the tests above wrote (cache and results files) uses only declared keys."""
    from types import SimpleNamespace

    from dms_llm.benchmark.row import REPORTED_KEYS, ROW_KEYS, ReportedRow, Row

    args = SimpleNamespace(model=setup["model"], dtype="float32", seed=0, align=1, train_dtype="auto", adopted={},
                           dms_config=None, recovery_config=None, ppl_cells=["a cell"], work=str(tmp_path))
    assert set(rows_module.Benchmark(args).load_row("dense", 1.0, 0)) == Row.__required_keys__
    cached, reported = [], []
    for path in setup["tmp"].rglob("*.json"):
        data = json.loads(path.read_text())
        if path.parent.name == "rows":
            cached.append((path, data))
        elif isinstance(data, dict) and {"machine", "rows"} <= set(data):
            reported += [(path, row) for row in data["rows"]]
    if not cached or not reported:
        pytest.skip("checks the rows that the tests above write: run the whole file")
    for path, row in cached:
        assert set(row) <= ROW_KEYS and Row.__required_keys__ <= set(row), (path, set(row) ^ ROW_KEYS)
    for path, row in reported:
        assert set(row) <= REPORTED_KEYS and ReportedRow.__required_keys__ <= set(row), (path, set(row) ^ REPORTED_KEYS)
