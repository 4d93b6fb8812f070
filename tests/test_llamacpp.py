"""Exported GGUF files in the real engine, llama.cpp (slow; needs the `llamacpp` extra).

Dense and pruned SmolLM2 (a DMS search at 80% and 50%: per-layer `deci` files; Wanda-sp at the same
budgets: uniform `llama` files), f32 GGUF against the transformers model: logits at every position of a
fixed 128-token text, greedy decoding, and WikiText-2 perplexity. Tokenizers of every supported kind
must split text exactly as transformers does.
"""

import json
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, WORDS

pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed (pip install '.[llamacpp]')")
pytestmark = pytest.mark.slow

from dms_llm.export import llamacpp  # noqa: E402
from dms_llm.export.gguf import export_gguf  # noqa: E402

LOGIT_TOLERANCE = 0.05
PPL_WINDOWS = 40  # the benchmark (eval/bench_llamacpp.py) reports the first 320


def wikitext_ids(tokenizer):
    """The WikiText-2 test split as dms_llm's perplexity evaluation tokenizes it."""
    from dms_llm.evaluation.perplexity import load_ppl_text, tokenize_text

    text, _ = load_ppl_text("wikitext2", data_dir=SHARED_DATA, source="local")
    return tokenize_text(tokenizer, text).tolist()


@pytest.fixture(scope="module")
def smollm2_dir():
    from dms_llm.checkpoints.embedded import embedded_default_dir

    return embedded_default_dir()


def _dms_checkpoint(out, ratio):
    from dms_llm.cli.search import main

    args = ["--target-ratio", str(ratio), "--steps", "12", "--seq-len", "64", "--num-samples", "12", "--no-eval",
            "--train-weights", "none", "--output-dir", str(out), "--data-dir", SHARED_DATA]  # fmt: skip
    assert main(args) == 0
    return str(out)


def _baseline_checkpoint(out, ratio, smollm2_dir):
    from dms_llm.baselines import METHODS
    from dms_llm.checkpoints import count_parameters, load_model_and_tokenizer, save_pruned
    from dms_llm.data import load_calibration
    from dms_llm.prune import prune_model

    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    blocks = load_calibration(None, tokenizer, 128, 8, data_dir=SHARED_DATA)
    plan = METHODS["wanda-sp"](model, blocks, int(ratio * count_parameters(model)), align=1)
    return save_pruned(prune_model(model, plan), tokenizer, str(out), plan)


def _trap_checkpoint(out, smollm2_dir):
    """FLAP at 85% (output biases, per-layer widths), then hidden pruned to 515 channels, layer 0 without
    attention and layer 5 without MLP: every case the `deci` stand-ins and the exporter must get right."""
    import dataclasses

    from dms_llm.baselines import METHODS
    from dms_llm.checkpoints import count_parameters, load_model_and_tokenizer, save_pruned
    from dms_llm.data import load_calibration
    from dms_llm.plan import LayerPlan
    from dms_llm.prune import prune_model

    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    blocks = load_calibration(None, tokenizer, 128, 8, data_dir=SHARED_DATA)
    plan = METHODS["flap"](model, blocks, int(0.85 * count_parameters(model)), align=1)
    hidden = sorted(torch.randperm(576, generator=torch.Generator().manual_seed(0))[:515].tolist())
    layers = list(plan.layers)
    layers[0] = LayerPlan([], layers[0].mlp_channels)
    layers[5] = LayerPlan(layers[5].attention_groups, [])
    plan = dataclasses.replace(plan, hidden_channels=hidden, layers=layers, params_after=None)
    return save_pruned(prune_model(model, plan), tokenizer, str(out), plan)


CASES = ["dense", "dms-0.8", "dms-0.5", "wanda-sp-0.8", "wanda-sp-0.5", "traps-0.85"]


@pytest.fixture(scope="module", params=CASES)
def exported(request, smollm2_dir, tmp_path_factory):
    """(checkpoint folder, f32 GGUF, GGUF architecture) of one case."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp(request.param)
    name, _, ratio = request.param.rpartition("-") if "-" in request.param else (request.param, "", "")
    if request.param == "dense":
        ckpt = smollm2_dir
    elif name == "dms":
        ckpt = _dms_checkpoint(tmp / "ckpt", float(ratio))
        config = json.load(open(os.path.join(ckpt, "config.json")))  # the search aligns widths to 32 by default
        assert config["hidden_size"] % 32 == 0 and all(w % 32 == 0 for w in config["layer_intermediate_sizes"])
    elif name == "traps":
        ckpt = _trap_checkpoint(tmp / "ckpt", smollm2_dir)
    else:
        ckpt = _baseline_checkpoint(tmp / "ckpt", float(ratio), smollm2_dir)
    summary = export_gguf(ckpt, str(tmp / "f32.gguf"), "f32", progress=False)
    assert summary["architecture"] == ("llama" if name in ("dense", "wanda-sp") else "deci")
    if name == "traps":
        assert summary["stand_ins"] == {"zero_head_layers": [0], "zero_mlp_layers": [5]}
    return ckpt, str(tmp / "f32.gguf")


def _hf(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(ckpt)


def test_logits_match_transformers_at_every_position(exported):
    ckpt, path = exported
    model, tokenizer = _hf(ckpt)
    ids = wikitext_ids(tokenizer)[1000:1128]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llamacpp.load(path, n_ctx=256)
    try:
        got = llamacpp.logits(llm, ids)
    finally:
        llm.close()
    # the text matters: a model that ignored its context would not match at every position
    assert np.abs(expected[-1] - expected[-2]).max() > 1.0
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE, np.abs(got - expected).max()


def test_greedy_decoding_matches_transformers(exported):
    ckpt, path = exported
    model, tokenizer = _hf(ckpt)
    prompt = tokenizer("The history of the city begins with").input_ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0].tolist()  # fmt: skip
    llm = llamacpp.load(path, n_ctx=128)
    try:
        got = llamacpp.greedy(llm, prompt, 32)
    finally:
        llm.close()
    assert got == expected, (tokenizer.decode(got[len(prompt):]), tokenizer.decode(expected[len(prompt):]))


def test_wikitext2_perplexity_within_one_percent(exported):
    from dms_llm.evaluation import make_windows, window_nll

    ckpt, path = exported
    model, tokenizer = _hf(ckpt)
    windows, _ = make_windows(torch.tensor(wikitext_ids(tokenizer)), 128, PPL_WINDOWS)
    with torch.no_grad():
        total, count = window_nll(model, windows, progress=False)
    llm = llamacpp.load(path, n_ctx=128)
    try:
        ours = np.exp(total / count)
        theirs = llamacpp.perplexity(llm, windows)
    finally:
        llm.close()
    assert abs(theirs / ours - 1) <= 0.01, (ours, theirs)


# ----- tokenizers: llama.cpp splits text as transformers does -----------------------------------------

TEXTS = [
    "w1 w2 w3 the end.",
    "It's 2024: 1234567 items cost $89.99!\n\nNew paragraph\twith tabs   and  spaces.",
    "Ünïcödé wörds — and emoji 🙂 too; don't we'll I'm.",
]


def spm_style_tokenizer():
    """A SentencePiece-style BPE (byte fallback, '▁' for spaces) as Llama 2 and Mistral ship it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=120, show_progress=False)
    trainer_tok.train_from_iterator([" ".join(WORDS[i : i + 9]) + " it's" for i in range(len(WORDS))] + TEXTS, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2", "spm"])
def test_llamacpp_tokenizes_like_transformers(kind, tmp_path):
    from conftest import tiny_model
    from test_export_gguf import byte_level_tokenizer, save_checkpoint

    tokenizer = spm_style_tokenizer() if kind == "spm" else byte_level_tokenizer(kind)
    vocab = 512
    assert len(tokenizer) <= vocab
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model("llama-gqa", vocab_size=vocab), tokenizer)
    export_gguf(ckpt, str(tmp_path / "m.gguf"), "f32", progress=False)
    llm = llamacpp.load(tmp_path / "m.gguf", n_ctx=64, logits_all=False)
    try:
        for text in TEXTS:
            expected = tokenizer(text).input_ids
            got = llm.tokenize(text.encode(), add_bos=expected[:1] == [tokenizer.bos_token_id], special=False)
            assert got == expected, (kind, text, got, expected)
    finally:
        llm.close()
