"""Perplexity protocol, local lm-eval tasks, results files and the CLI.

Every data file here is written by the test in the layout of the real file (see ../shared/data/README.md);
nothing is read from the shared data except in the slow test.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model

from dms_llm import evaluation as ev
from dms_llm.evaluation.tasks import utils as task_utils

TASKS_DIR = ev.TASKS_DIR  # package data: dms_llm/evaluation/tasks


# ------------------------------------------------------------------------------------------------
# tiny tokenizer and fixture data


def byte_tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte (+ <eos>), so token counts are byte counts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama-gqa", vocab_size=len(tok), max_position_embeddings=512)


WIKI_LINES = [" \n", " = Robert Boulter = \n", " \n", " Robert Boulter is an English film , television and theatre actor . \n",
              " \n", " = = Career = = \n", " \n", " He had a guest @-@ starring role in 2000 . \n"]

BOOLQ = [
    {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue on a clear day."},
    {"question": "do fish fly", "title": "Fish", "answer": False, "passage": "Most fish swim and cannot fly."},
    {"question": "is ice cold", "title": "Ice", "answer": True, "passage": "Ice is frozen water and feels cold."},
]
PIQA = [
    ({"goal": "How to open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."}, "0"),
    ({"goal": "Dry wet hair", "sol1": "Pour water on it.", "sol2": "Use a towel."}, "1"),
    ({"goal": "Cool soup", "sol1": "Blow on it gently.", "sol2": "Boil it longer."}, "0"),
]
WINOGRANDE = [
    {"qID": "a-1", "sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "2"},
    {"qID": "a-2", "sentence": "The cup did not fit in the box because _ was too big.",
     "option1": "the cup", "option2": "the box", "answer": "1"},
]
HELLASWAG = [
    {"ctx": "Roof shingle removal: A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."]},
    {"ctx": "Cooking: A woman cracks an egg. she", "label": 0,
     "endings": ["whisks it in a bowl.", "throws it away.", "sings a song.", "paints a wall."]},
]


def _arc(qid, stem, texts, labels, key):
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
            "answerKey": key}


ARC_EASY = [
    _arc("E-1", "Which is a gas?", ["rock", "water", "oxygen", "wood"], "ABCD", "C"),
    _arc("E-2", "What do plants need?", ["light", "noise", "plastic", "sand"], "1234", "1"),
    _arc("E-3", "Which is hot?", ["fire", "ice", "snow"], "ABC", "A"),
]
ARC_CHALLENGE = [
    _arc("C-1", "Which planet is largest?", ["Mars", "Jupiter", "Venus", "Earth"], "ABCD", "B"),
    _arc("C-2", "What melts ice?", ["cold", "dark", "heat", "wind", "salt"], "ABCDE", "C"),
]
OBQA = [
    _arc("8-343", "A person wants to save money so they decide to", ["buy more", "quit eating lunch out", "spend", "lose it"],
         "ABCD", "B"),
    _arc("7-1", "The sun is the source of", ["light", "ice", "rocks", "sand"], "ABCD", "A"),
]


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_fixture_data(root: Path, wiki_repeat: int = 1) -> Path:
    (root / "wikitext-2-raw").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(WIKI_LINES * wiki_repeat), encoding="utf-8")
    (root / "wikitext-2-raw" / "wiki.valid.raw").write_text("".join(WIKI_LINES[:4]), encoding="utf-8")
    (root / "ptb").mkdir(exist_ok=True)
    (root / "ptb" / "ptb.test.txt").write_text(" no it was n't black monday \n but while the new york stock exchange \n", encoding="utf-8")
    (root / "ptb" / "ptb.valid.txt").write_text(" consumers may want to move \n <unk> watching abc 's monday \n", encoding="utf-8")
    _jsonl(root / "c4" / "sample_c4-rp2.jsonl",
           [{"text": f"Document {i} talks about barbecue classes in Missoula.", "meta": {"source": "c4"}} for i in range(40)])
    _jsonl(root / "boolq" / "dev.jsonl", BOOLQ)
    _jsonl(root / "piqa" / "valid.jsonl", [d for d, _ in PIQA])
    (root / "piqa" / "valid-labels.lst").write_text("".join(y + "\n" for _, y in PIQA))
    _jsonl(root / "winogrande" / "dev.jsonl", WINOGRANDE)
    (root / "winogrande" / "dev-labels.lst").write_text("".join(r["answer"] + "\n" for r in WINOGRANDE))
    _jsonl(root / "hellaswag" / "hellaswag_val_full.jsonl", HELLASWAG)
    _jsonl(root / "arc" / "ARC-Easy-Test.jsonl", ARC_EASY)
    _jsonl(root / "arc" / "ARC-Challenge-Test.jsonl", ARC_CHALLENGE)
    _jsonl(root / "openbookqa" / "test.jsonl", OBQA)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("data"), wiki_repeat=8)


# ------------------------------------------------------------------------------------------------
# perplexity


class UniformLM(torch.nn.Module):
    """All-zero logits: every token has probability 1/V, so perplexity must be exactly V."""

    def __init__(self, vocab: int, max_pos: int = 4096):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=max_pos)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + 0 * self.dummy)


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, 37, (1000,), generator=torch.Generator().manual_seed(0))
    r = ev.perplexity_of_ids(UniformLM(37), ids, seq_len=128, batch_size=3, progress=False)
    assert r["ppl"] == pytest.approx(37, rel=1e-6)


def test_uniform_logits_through_the_dataset_path(data_dir, tok):
    r = ev.perplexity(UniformLM(len(tok)), tok, "wikitext2", "llm-pruner", data_dir=data_dir, progress=False)
    assert r["ppl"] == pytest.approx(len(tok), rel=1e-6)


def test_hand_computed_nll_matches(model):
    torch.manual_seed(0)
    seq_len = 16
    ids = torch.randint(3, model.config.vocab_size, (2 * seq_len + 5,))
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(2):
            window = ids[w * seq_len : (w + 1) * seq_len]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                nll -= logp[t, window[t + 1]].item()
                count += 1
    expected = math.exp(nll / count)
    for batch_size in (1, 2):
        r = ev.perplexity_of_ids(model, ids, seq_len=seq_len, batch_size=batch_size, progress=False)
        assert r["n_predicted"] == count == 2 * 15
        assert r["ppl"] == pytest.approx(expected, rel=1e-6)


def test_windows_drop_the_tail_exactly():
    ids = torch.arange(3 * 128 + 50)
    windows, info = ev.make_windows(ids, 128)
    assert windows.shape == (3, 128)
    assert torch.equal(windows[2], torch.arange(256, 384))  # consecutive, non-overlapping
    assert info["n_tokens_tail_dropped"] == 50 and info["n_predicted"] == 3 * 127
    windows, info = ev.make_windows(ids, 128, max_windows=2)
    assert windows.shape == (2, 128) and info["n_tokens_unscored"] == 128 + 50
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.make_windows(torch.arange(100), 128)


def test_wikitext_rows_and_join_follow_the_hub_layout(data_dir):
    rows = ev.wikitext_rows(data_dir / "wikitext-2-raw" / "wiki.valid.raw")
    assert rows == ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film , television and theatre actor . \n"]
    text, record = ev.load_ppl_text("wikitext2-valid", data_dir=data_dir, source="local")
    assert text == "\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film , television and theatre actor . \n"
    path = data_dir / "wikitext-2-raw" / "wiki.valid.raw"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and record["path"] == str(path)
    text, _ = ev.load_ppl_text("ptb-valid", data_dir=data_dir, source="local")
    assert text == "consumers may want to move\n\n<unk> watching abc 's monday"


def test_llm_pruner_protocol_counts_windows_of_the_joined_text(data_dir, tok, model):
    text = "\n\n".join(ev.wikitext_rows(data_dir / "wikitext-2-raw" / "wiki.test.raw"))
    n_bytes = len(text.encode("utf-8"))  # the byte tokenizer adds no special tokens
    r = ev.perplexity(model, tok, "wikitext2", "llm-pruner", data_dir=data_dir, source="local", progress=False)
    assert r["seq_len"] == 128 and r["n_tokens"] == n_bytes
    assert r["n_windows"] == n_bytes // 128 and r["n_tokens_tail_dropped"] == n_bytes % 128
    assert r["n_predicted"] == (n_bytes // 128) * 127
    assert r["bos_prepended"] is False
    # sparsegpt's 2048 is capped at the model's 512 positions
    r = ev.perplexity(model, tok, "wikitext2", "sparsegpt", data_dir=data_dir, source="local", progress=False)
    assert r["seq_len"] == 512 and r["n_windows"] == n_bytes // 512


def test_c4_offline_is_labelled_train_sample(data_dir, tok):
    r = ev.perplexity(UniformLM(len(tok)), tok, "c4", "llm-pruner", data_dir=data_dir, source="local", progress=False)
    assert r["label"] == "c4-train-sample" and r["source"]["label"] == "c4-train-sample"
    assert r["max_windows"] == 256 and r["source"]["path"].endswith("sample_c4-rp2.jsonl")


def test_clear_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="valid: wikitext2"):
        ev.check_ppl_datasets("wikitext3")
    with pytest.raises(ValueError, match="llm-pruner"):
        ev.check_protocols("gptq")
    with pytest.raises(ValueError, match="arc_easy"):
        ev.check_tasks("arc")
    assert ev.check_tasks("dms_piqa,piqa,boolq") == ["piqa", "boolq"]
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        ev.perplexity(UniformLM(10), tok, data_dir=tmp_path / "nope", source="local")
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        ev.perplexity(UniformLM(10), tok, data_dir=tmp_path, source="local")


def test_offline_auto_reads_local_and_hub_mode_fails_loudly(data_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1" and ev.hub_reachable() is False
    _, record = ev.load_ppl_text("ptb", data_dir=data_dir, source="auto")
    assert record["kind"] == "local" and record["path"].endswith("ptb.test.txt")
    with pytest.raises(Exception):  # never a silent fallback when the Hub was asked for
        ev.load_ppl_text("ptb", data_dir=data_dir, source="hub")


def test_data_dir_rules_agree(monkeypatch, data_dir):
    from dms_llm.runs.options import data_dir_default
    from dms_llm.data.sources import _data_file

    monkeypatch.setenv("DMS_DATA_DIR", str(data_dir))
    assert ev.resolve_data_dir() == task_utils.resolve_data_dir() == data_dir.resolve()
    assert data_dir_default() == str(data_dir)  # the commands follow the same rule
    with pytest.raises(FileNotFoundError, match=str(data_dir / "c4")):  # and so does the calibration data
        _data_file(None, "c4/none.jsonl", "calibration")
    # the library has no default folder of its own: the commands pass theirs (runs.options.data_dir_default)
    monkeypatch.delenv("DMS_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="DMS_DATA_DIR"):
        task_utils.resolve_data_dir()


# ------------------------------------------------------------------------------------------------
# zero-shot tasks

EXPECTED_DOC0 = {
    # task: (doc_to_text, doc_to_target, doc_to_choice) of the first fixture document
    "dms_boolq": ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", 1, ["no", "yes"]),
    "dms_piqa": ("Question: How to open a jar?\nAnswer:", 0, ["Twist the lid.", "Eat the lid."]),
    "dms_hellaswag": ("Roof shingle removal: A man is sitting on a roof. he", 3, HELLASWAG[0]["endings"]),
    "dms_winogrande": (1, "always got the easier cases.",
                       ["Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"]),
    "dms_arc_easy": ("Question: Which is a gas?\nAnswer:", 2, ["rock", "water", "oxygen", "wood"]),
    "dms_arc_challenge": ("Question: Which planet is largest?\nAnswer:", 1, ["Mars", "Jupiter", "Venus", "Earth"]),
    "dms_openbookqa": ("A person wants to save money so they decide to", 1, ["buy more", "quit eating lunch out", "spend", "lose it"]),
}


@pytest.fixture(scope="module")
def local_tasks(data_dir):
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    return get_task_dict(sorted(EXPECTED_DOC0), tm)


def test_task_prompts_on_fixture_docs(local_tasks):
    assert sorted(local_tasks) == sorted(EXPECTED_DOC0)
    for name, (text, target, choices) in EXPECTED_DOC0.items():
        task = local_tasks[name]
        doc = list(task.eval_docs)[0]
        assert task.doc_to_text(doc) == text, name
        assert task.doc_to_target(doc) == target, name
        assert task.doc_to_choice(doc) == choices, name
    arc = local_tasks["dms_arc_easy"]
    numeric = list(arc.eval_docs)[1]  # labels "1".."4", answerKey "1"
    assert arc.doc_to_target(numeric) == 0 and arc.doc_to_choice(numeric)[0] == "light"
    assert len(list(local_tasks["dms_piqa"].eval_docs)) == len(PIQA)


STOCK_YAML = {
    "dms_boolq": "super_glue/boolq/default.yaml",
    "dms_piqa": "piqa/piqa.yaml",
    "dms_hellaswag": "hellaswag/hellaswag.yaml",
    "dms_winogrande": "winogrande/default.yaml",
    "dms_arc_easy": "arc/arc_easy.yaml",
    "dms_arc_challenge": "arc/arc_challenge.yaml",
    "dms_openbookqa": "openbookqa/openbookqa.yaml",
}


@pytest.mark.parametrize("name", sorted(STOCK_YAML))
def test_local_task_renders_like_the_stock_task(name, local_tasks, data_dir):
    """The installed lm-eval's own task definition, fed our loader's rows, must give the same prompts."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    utils = task_utils
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / STOCK_YAML[name], resolve_func=True)
    cfg["custom_dataset"] = getattr(utils, "load_" + name[len("dms_"):])
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "data_dir": str(data_dir)}
    splits = set(cfg["custom_dataset"](data_dir=str(data_dir)))
    for key in ("training_split", "validation_split", "test_split"):
        if cfg.get(key) not in splits:
            cfg[key] = None  # the local files hold only the evaluated split
    if name == "dms_hellaswag":
        cfg["process_docs"] = None  # stock builds `query` from ctx_a/ctx_b; our file already holds it
    stock = ConfigurableTask(config=cfg)
    ours = local_tasks[name]
    assert ours.config.metric_list == stock.config.metric_list or [m["metric"] for m in ours.config.metric_list] == [
        m["metric"] for m in stock.config.metric_list]
    for doc_s, doc_o in zip(stock.eval_docs, ours.eval_docs, strict=True):
        assert stock.doc_to_text(doc_s) == ours.doc_to_text(doc_o)
        assert stock.doc_to_target(doc_s) == ours.doc_to_target(doc_o)
        assert stock.doc_to_choice(doc_s) == ours.doc_to_choice(doc_o)


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def zs_results(model, tok, data_dir):
    return ev.evaluate_model(model, tok, ppl=[], tasks="all", data_dir=data_dir, source="local", batch_size=4,
                             model_name="tiny", progress=False)


def test_all_tasks_score_with_expected_keys(zs_results):
    zs = zs_results["zero_shot"]
    sizes = {"boolq": 3, "piqa": 3, "hellaswag": 2, "winogrande": 2, "arc_easy": 3, "arc_challenge": 2, "openbookqa": 2}
    assert list(zs) == list(ev.ZERO_SHOT_TASKS)
    for task, (_, _, reported) in ev.ZERO_SHOT_TASKS.items():
        m = zs[task]
        expected = {"acc", "acc_stderr"} | ({"acc_norm", "acc_norm_stderr"} if task not in ("boolq", "winogrande") else set())
        assert expected <= set(m), task
        assert m["reported_metric"] == reported and m["value"] == m[reported]
        assert m["n"] == sizes[task] and 0 <= m["value"] <= 1
        assert zs_results["data_sources"][f"zero_shot/{task}"]["kind"] == "local"
    times = zs_results["time_s"]["zero_shot"]  # seconds per task (rounded to 0.01), within the whole evaluation's
    assert list(times) == list(ev.ZERO_SHOT_TASKS)
    assert 0 < sum(times.values()) <= zs_results["time_s"]["total"] + 0.01 * len(times)
    assert zs_results["zero_shot_avg"] == pytest.approx(sum(m["value"] for m in zs.values()) / len(zs))


def test_piqa_and_winogrande_scores_match_hand_computed_loglikelihoods(zs_results, model, tok):
    # PIQA: acc = argmax of log p(" " + solution | prompt); acc_norm divides by the solution's length in characters
    correct = correct_norm = 0
    for doc, label in PIQA:
        ctx = f"Question: {doc['goal']}\nAnswer:"
        sols = [doc["sol1"], doc["sol2"]]
        ll = [_loglik(model, tok, ctx, " " + s) for s in sols]
        norm = [v / len(s) for v, s in zip(ll, sols)]
        correct += int(max(range(2), key=ll.__getitem__) == int(label))
        correct_norm += int(max(range(2), key=norm.__getitem__) == int(label))
    assert zs_results["zero_shot"]["piqa"]["acc"] == pytest.approx(correct / len(PIQA))
    assert zs_results["zero_shot"]["piqa"]["acc_norm"] == pytest.approx(correct_norm / len(PIQA))
    # WinoGrande: the two candidates differ in the context; the shared continuation is scored
    correct = 0
    for doc in WINOGRANDE:
        cut = doc["sentence"].index("_")
        cont = " " + doc["sentence"][cut + 1:].strip()
        ll = [_loglik(model, tok, doc["sentence"][:cut] + o, cont) for o in (doc["option1"], doc["option2"])]
        correct += int(max(range(2), key=ll.__getitem__) == int(doc["answer"]) - 1)
    assert zs_results["zero_shot"]["winogrande"]["acc"] == pytest.approx(correct / len(WINOGRANDE))


# ------------------------------------------------------------------------------------------------
# results files


def _fake_results(model, params, wiki, boolq):
    return {"model": model, "params": params, "lm_eval_version": "x", "limit": None, "max_windows": None,
            "ppl": {"wikitext2": {"llm-pruner": wiki}}, "ppl_details": {"wikitext2": {"llm-pruner": {"seq_len": 128}}},
            "zero_shot": {"boolq": {"acc": boolq, "value": boolq, "reported_metric": "acc"}}, "zero_shot_avg": boolq}


def test_markdown_shows_differences_to_the_first_row():
    md = ev.results_markdown([_fake_results("dense", 200, 20.0, 0.70), _fake_results("pruned", 150, 25.5, 0.655)])
    lines = md.splitlines()
    assert "WikiText-2 ppl (128)" in lines[0] and "BoolQ acc" in lines[0]
    assert "| `dense` | 0.00 | 20.00 | 70.00 | 70.00 |" in lines
    assert lines[4] == "| Δ vs first row | -25.0% | +5.50 | -4.50 | -4.50 |"


def test_write_results_refuses_another_models_file(tmp_path):
    a = _fake_results("/ckpt/a", 100, 10.0, 0.5)
    path = ev.write_results(a, tmp_path)
    assert json.loads(path.read_text())["model"] == "/ckpt/a" and (tmp_path / "results.md").is_file()
    ev.write_results(dict(a, zero_shot_avg=0.6), tmp_path)  # the same model may be re-evaluated
    with pytest.raises(FileExistsError, match="another model"):
        ev.write_results(_fake_results("/ckpt/b", 100, 11.0, 0.5), tmp_path)
    ev.write_results(_fake_results("/ckpt/b", 100, 11.0, 0.5), tmp_path, overwrite=True)
    assert json.loads(path.read_text())["model"] == "/ckpt/b"
    with_baseline = dict(_fake_results("/ckpt/b", 100, 11.0, 0.5), baseline=_fake_results("dense", 200, 9.0, 0.6))
    ev.write_results(with_baseline, tmp_path / "x.json")
    assert "Δ vs first row" in (tmp_path / "x.md").read_text()


# ------------------------------------------------------------------------------------------------
# CLI on a saved checkpoint


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tok):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_run_eval_cli_with_baseline(saved_model, data_dir, capsys):
    from dms_llm.cli import run_eval

    args = [str(saved_model), "--ppl", "wikitext2", "--protocol", "llm-pruner,sparsegpt", "--tasks", "piqa,arc_challenge",
            "--data-dir", str(data_dir), "--source", "local", "--limit", "2", "--max-windows", "2",
            "--baseline", str(saved_model), "--no-progress", "--batch-size", "4"]
    assert run_eval.main(args) == 0
    out = saved_model / "eval" / "results.json"
    r = json.loads(out.read_text())
    assert r["model"] == str(saved_model.resolve()) and r["complete"] is True and r["limit"] == 2
    assert set(r["ppl"]["wikitext2"]) == {"llm-pruner", "sparsegpt"} and set(r["zero_shot"]) == {"piqa", "arc_challenge"}
    assert r["baseline"]["ppl"] == r["ppl"]  # the same weights on both sides
    assert r["params"] == sum(p.numel() for p in tiny_model("llama-gqa", vocab_size=257, max_position_embeddings=512).parameters())
    assert "Δ vs first row" in (saved_model / "eval" / "results.md").read_text()
    # another model's results in the same place are not replaced silently: one `error:` line, exit code 2
    capsys.readouterr()
    assert run_eval.main(["smollm2-135m", "--output", str(out), "--source", "local", "--data-dir", str(data_dir)]) == 2
    assert "another model" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess that imports lm-eval and transformers: ~15-30 s
def test_lm_eval_cli_runs_a_local_task_on_a_saved_checkpoint(saved_model, data_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DMS_DATA_DIR=str(data_dir))
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={saved_model}",
           "--include_path", str(TASKS_DIR), "--tasks", "dms_piqa", "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dms_piqa" in proc.stdout and "acc_norm" in proc.stdout


# ------------------------------------------------------------------------------------------------
# the real model on the real file

# Measured with `dms-llm eval` (fp32, CPU): the first 200 windows of 128 tokens (25,400 predicted
# tokens) of the WikiText-2 test text. The full text (2,382 windows) gives 56.09 (docs/RESULTS.md, section 6).
SMOLLM2_WIKITEXT2_FIRST_200 = 53.8896


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_first_windows(shared_data):
    from dms_llm.checkpoints import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    r = ev.perplexity(model, tok, "wikitext2", "llm-pruner", data_dir=shared_data, source="local", max_windows=200,
                      batch_size=8, progress=False)
    assert r["n_windows"] == 200 and r["seq_len"] == 128 and r["bos_prepended"] is False
    assert r["source"]["sha256"] == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    assert r["ppl"] == pytest.approx(SMOLLM2_WIKITEXT2_FIRST_200, rel=2e-3)
