"""eval/bench_quant.py without llama.cpp: the results file as a cache (skipping, invalidation), the
size-frontier marks, the table and the plot, from a results dict."""

import json
import os

import bench_quant as bq  # eval/, on the tests' path (pyproject.toml)

SETTINGS = {"ppl_windows": 320, "window": 128, "pp": 512, "tg": 128}


def checkpoint(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def results_with(cells: dict, params: dict) -> dict:
    return {"settings": SETTINGS, "types": ["f16", "q8_0", "q4_k_m"], "threads": [1, 2],
            "models": {n: {"params": p} for n, p in params.items()}, "cells": cells}


def cell(model, outtype, mb, wiki, tg1=None):
    c = {"model": model, "outtype": outtype, "size_bytes": int(mb * 1e6), "ppl_wikitext2": wiki, "ppl_ptb": 2 * wiki}
    if tg1 is not None:
        c["speed_t1"] = {"pp": 10 * tg1, "tg": tg1}
    return c


def test_pareto_marks_points_nothing_beats():
    #        cheap+bad  dear+good  dominated  duplicate of the first
    points = [(1, 10.0), (3, 5.0), (4, 6.0), (1, 10.0)]
    assert bq.pareto(points) == [True, True, False, True]


def test_fill_measures_once_and_writes_at_once(tmp_path):
    path = str(tmp_path / "out.json")
    results = results_with({"dense/f16": {"model": "dense", "outtype": "f16"}}, {"dense": 100})
    calls = []

    def measure():
        calls.append(1)
        return 42.0

    assert bq.fill(results, path, "dense/f16", "ppl_wikitext2", measure) == 42.0
    assert json.load(open(path))["cells"]["dense/f16"]["ppl_wikitext2"] == 42.0  # on disk before anything else runs
    assert bq.fill(results, path, "dense/f16", "ppl_wikitext2", measure) == 42.0
    assert len(calls) == 1


def test_a_rerun_keeps_measured_cells_and_drops_stale_ones(tmp_path):
    dense, pruned = checkpoint(tmp_path, "dense"), checkpoint(tmp_path, "pruned")
    models = {"dense": dense, "pruned": pruned}
    path = str(tmp_path / "out.json")
    cells = {"dense/f16": dict(cell("dense", "f16", 270, 56.0, tg1=30.0), checkpoint=bq.checkpoint_key(dense)),
             "pruned/f16": dict(cell("pruned", "f16", 200, 80.0), checkpoint="changed-since"),
             "old/f16": dict(cell("old", "f16", 100, 900.0), checkpoint="x")}  # fmt: skip
    json.dump(results_with(cells, {"dense": 1, "pruned": 1, "old": 1}), open(path, "w"))

    again = bq.load_results(path, models, SETTINGS, ["f16"], [1])
    assert again["cells"]["dense/f16"]["ppl_wikitext2"] == 56.0  # skipped by the rerun
    assert "pruned/f16" not in again["cells"]  # its checkpoint's files changed: measured again
    assert "old/f16" in again["cells"] and "old" in again["models"]  # a model not asked for this time stays
    assert again["types"] == ["f16", "q8_0", "q4_k_m"]

    json.dump(again, open(path, "w"))
    other = bq.load_results(path, models, dict(SETTINGS, ppl_windows=10), ["f16"], [1])
    kept = other["cells"]["dense/f16"]
    assert kept["size_bytes"] == 270_000_000 and "ppl_wikitext2" not in kept and "ppl_ptb" not in kept
    assert kept["speed_t1"]["tg"] == 30.0  # the speed cells do not depend on the windows
    longer = bq.load_results(path, models, dict(SETTINGS, tg=256), ["f16"], [1])["cells"]["dense/f16"]
    assert "speed_t1" not in longer and longer["ppl_wikitext2"] == 56.0


def test_table_orders_rows_and_marks_the_size_frontier():
    cells = {"pruned/q8_0": cell("pruned", "q8_0", 80, 90.0, tg1=60.0),
             "dense/q4_k_m": cell("dense", "q4_k_m", 100, 70.0, tg1=50.0),
             "dense/f16": cell("dense", "f16", 270, 56.0, tg1=30.0),
             "pruned/f16": cell("pruned", "f16", 150, 85.0),  # dominated by dense q4_k_m
             "dense/q8_0": {"model": "dense", "outtype": "q8_0", "size_bytes": 145_000_000}}  # ppl not measured yet
    text = bq.table(results_with(cells, {"dense": 135_000_000, "pruned": 80_000_000}))
    lines = text.splitlines()
    assert lines[0].startswith("| model | type | file MB | bits/param | WikiText-2 | PTB | on size frontier | pp512 1t")
    body = [line.split(" | ") for line in lines[2:]]
    assert [(r[0].strip("| "), r[1]) for r in body] == [("dense", "f16"), ("dense", "q8_0"), ("dense", "q4_k_m"),
                                                       ("pruned", "f16"), ("pruned", "q8_0")]  # fmt: skip
    frontier = {(r[0].strip("| "), r[1]): r[6] for r in body}
    assert frontier == {("dense", "f16"): "yes", ("dense", "q8_0"): "", ("dense", "q4_k_m"): "yes",
                        ("pruned", "f16"): "", ("pruned", "q8_0"): "yes"}  # fmt: skip
    dense_f16 = body[0]
    assert dense_f16[2] == "270.0" and dense_f16[3] == "16.00" and dense_f16[4] == "56.00" and dense_f16[8] == "30.0"


def test_plot_draws_one_line_per_model(tmp_path):
    cells = {"dense/f16": cell("dense", "f16", 270, 56.0, tg1=30.0), "dense/q4_k_m": cell("dense", "q4_k_m", 100, 70.0),
             "pruned/f16": cell("pruned", "f16", 150, 85.0, tg1=45.0)}  # fmt: skip
    results = results_with(cells, {"dense": 135_000_000, "pruned": 80_000_000})
    series = bq.plot_series(results)
    assert [(s["model"], s["types"], s["tg"]) for s in series] == [("dense", ["f16", "q4_k_m"], [30.0, None]),
                                                                   ("pruned", ["f16"], [45.0])]  # fmt: skip
    path = str(tmp_path / "frontier.png")
    assert bq.plot(results, path)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not bq.plot(results_with({}, {}), str(tmp_path / "none.png"))
    assert not os.path.exists(tmp_path / "none.png")


def test_processes_on_other_models_share_one_file(tmp_path):
    path = str(tmp_path / "out.json")
    first = results_with({"dense/f16": {"model": "dense", "outtype": "f16", "checkpoint": "a"}}, {})
    second = results_with({"pruned/f16": {"model": "pruned", "outtype": "f16", "checkpoint": "b"},
                           "dense/q8_0": {"model": "dense", "outtype": "q8_0", "checkpoint": "old"}}, {})  # fmt: skip
    first["models"] = {"dense": {"checkpoint": "a", "params": 1}}
    second["models"] = {"pruned": {"checkpoint": "b", "params": 1}}
    bq.save(second, path, own={"pruned"})
    bq.fill(first, path, "dense/f16", "ppl_wikitext2", lambda: 56.0, own={"dense"})
    bq.fill(second, path, "pruned/f16", "ppl_wikitext2", lambda: 90.0, own={"pruned"})
    cells = json.load(open(path))["cells"]
    assert cells["dense/f16"]["ppl_wikitext2"] == 56.0 and cells["pruned/f16"]["ppl_wikitext2"] == 90.0
    # the stale dense cell the pruned process still held in memory did not overwrite what the dense one wrote
    bq.fill(first, path, "dense/f16", "ppl_ptb", lambda: 80.0, own={"dense"})
    second["cells"]["dense/f16"] = {"model": "dense", "outtype": "f16", "checkpoint": "old"}
    bq.save(second, path, own={"pruned"})
    assert json.load(open(path))["cells"]["dense/f16"]["ppl_ptb"] == 80.0


def test_processes_on_one_model_keep_each_others_cells(tmp_path):
    """Two processes of one model on different types: neither write loses the other's measurements, and
    a measurement of another checkpoint of that model is not taken over."""
    path = str(tmp_path / "out.json")

    def process(checkpoint):
        return results_with({f"dms/{t}": {"model": "dms", "outtype": t, "checkpoint": checkpoint} for t in ("f16", "q2_k")},
                            {"dms": 1})

    a, b, old = process("c1"), process("c1"), process("c0")
    bq.fill(a, path, "dms/f16", "ppl_wikitext2", lambda: 90.0, own={"dms"})
    bq.fill(b, path, "dms/q2_k", "ppl_wikitext2", lambda: 120.0, own={"dms"})
    bq.fill(a, path, "dms/f16", "ppl_ptb", lambda: 150.0, own={"dms"})
    cells = json.load(open(path))["cells"]
    assert cells["dms/q2_k"]["ppl_wikitext2"] == 120.0  # b's cell survived a's later write
    assert cells["dms/f16"]["ppl_wikitext2"] == 90.0 and cells["dms/f16"]["ppl_ptb"] == 150.0
    bq.fill(old, path, "dms/q2_k", "ppl_ptb", lambda: 999.0, own={"dms"})
    cells = json.load(open(path))["cells"]
    assert "ppl_wikitext2" not in cells["dms/q2_k"] and "ppl_wikitext2" not in cells["dms/f16"]  # c0's own view
