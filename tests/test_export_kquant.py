"""k-quant GGUF export (q4_k_m and its neighbours) through llama.cpp's own quantizer, checked in llama.cpp
itself (slow; needs the `llamacpp` extra). The real SmolLM2-135M, dense and pruned by hand to per-layer
widths (`deci`): every type loads and keeps the tokenizer and chat metadata, q8_0 and q6_k stay close to
the f16 file's perplexity, a chat-formatted greedy answer stops at the end of its turn, and the matrices
reported as stored in a fallback type are the ones llama.cpp's own log names.
"""

import os
import re

import numpy as np
import pytest
from conftest import SHARED_DATA
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed (pip install '.[llamacpp]')")
pytestmark = pytest.mark.slow

from dms_llm.export import llamacpp  # noqa: E402
from dms_llm.export.gguf import export_gguf  # noqa: E402
from dms_llm.export.quantize import KQUANTS, fallback_tensors, quantize_gguf  # noqa: E402

PPL_WINDOWS = 20  # of 128 tokens, WikiText-2 test
# Perplexity of the dense model relative to its f16 file (measured: q8_0 +0.5%, q6_k +1.3% on 40
# windows; every k-quant, q2_k included, under +35%).
CLOSE_TO_F16 = {"q8_0": 0.01, "q6_k": 0.025}
ANY_KQUANT_FACTOR = 1.5
# A question every type answers in one short turn (a 135M model's first token is fragile: without
# "Answer in one sentence." q8_0 and q6_k start in French and never stop).
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
K_TYPES = {GGMLQuantizationType[n] for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}


@pytest.fixture(scope="module")
def smollm2_dir():
    from dms_llm.checkpoints.embedded import embedded_default_dir

    return embedded_default_dir()


@pytest.fixture(scope="module")
def windows(smollm2_dir):
    from transformers import AutoTokenizer

    from dms_llm.evaluation import make_windows
    from dms_llm.evaluation.perplexity import load_ppl_text, tokenize_text

    text, _ = load_ppl_text("wikitext2", data_dir=SHARED_DATA, source="local")
    windows, _ = make_windows(tokenize_text(AutoTokenizer.from_pretrained(smollm2_dir), text), 128, PPL_WINDOWS)
    return windows


@pytest.fixture(scope="module")
def dense_file(smollm2_dir, tmp_path_factory):
    """outtype -> (path, summary) of the dense SmolLM2, exported once per type."""
    folder, done = tmp_path_factory.mktemp("dense"), {}

    def get(outtype):
        if outtype not in done:
            path = str(folder / f"{outtype}.gguf")
            done[outtype] = path, export_gguf(smollm2_dir, path, outtype, progress=False, threads=1)
        return done[outtype]

    return get


@pytest.fixture(scope="module")
def dense_ppl(dense_file, windows):
    done = {}

    def get(outtype):
        if outtype not in done:
            llm = llamacpp.load(dense_file(outtype)[0], n_ctx=128)
            try:
                done[outtype] = llamacpp.perplexity(llm, windows)
            finally:
                llm.close()
        return done[outtype]

    return get


def fields(path):
    return {k: v.contents() for k, v in GGUFReader(path).fields.items()}


@pytest.mark.parametrize("outtype", list(KQUANTS))
def test_kquant_file_keeps_the_metadata(outtype, dense_file, smollm2_dir):
    from transformers import AutoTokenizer

    path, summary = dense_file(outtype)
    f16, quantized = fields(dense_file("f16")[0]), fields(path)
    assert quantized["general.file_type"] == LlamaFileType["MOSTLY_" + outtype.upper()]
    # every key but the file type (and the quantization version llama.cpp adds) is the f16 file's
    own = ("general.file_type", "general.quantization_version", "GGUF.kv_count")
    assert {k: v for k, v in quantized.items() if k not in own} == {k: v for k, v in f16.items() if k not in own}
    assert quantized["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(smollm2_dir).chat_template
    # the matrices whose rows k-quants hold are quantized as asked (the MLP's down projection: rows of 1536)
    for t in GGUFReader(path).tensors:
        if len(t.shape) >= 2 and int(t.shape[0]) % 256 == 0:
            assert t.tensor_type in K_TYPES | {KQUANTS[outtype][1]}, (t.name, t.tensor_type)
    assert summary["bytes"] == os.path.getsize(path) and not [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".")]


def test_smaller_types_make_smaller_files(dense_file):
    order = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k"]
    sizes = [os.path.getsize(dense_file(t)[0]) for t in order]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), dict(zip(order, sizes))
    assert os.path.getsize(dense_file("q4_0")[0]) < os.path.getsize(dense_file("q4_k_s")[0])


@pytest.mark.parametrize("outtype", list(KQUANTS))
def test_every_type_runs_in_llamacpp(outtype, dense_ppl):
    ppl, reference = dense_ppl(outtype), dense_ppl("f16")
    assert reference < ppl < ANY_KQUANT_FACTOR * reference, (ppl, reference)


@pytest.mark.parametrize("outtype", list(CLOSE_TO_F16))
def test_perplexity_close_to_f16(outtype, dense_ppl):
    ppl, reference = dense_ppl(outtype), dense_ppl("f16")
    assert abs(ppl / reference - 1) <= CLOSE_TO_F16[outtype], (ppl, reference)


@pytest.mark.parametrize("outtype", ["f16", "q8_0", *KQUANTS])
def test_chat_answer_stops_at_the_end_of_its_turn(outtype, dense_file):
    """llama-cpp-python formats the chat with the file's own template and stops at its end-of-turn token."""
    from llama_cpp import Llama

    llm = Llama(model_path=dense_file(outtype)[0], n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
        reply = llm.create_chat_completion(messages=CHAT, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=64)
    finally:
        llm.close()
    choice, text = reply["choices"][0], reply["choices"][0]["message"]["content"]
    assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] < 64, text
    assert "Paris" in text and "<|im_" not in text and "assistant" not in text, text


# ----- the fallback report, against llama.cpp's own log -------------------------------------------------

# llama.cpp 0.3.36's words for one matrix ("warning: blk.0.attn_q.weight - ncols 576 not divisible by 256 (required
# for type q4_K) -> falling back to q5_0"), and for all of them
FALLBACK_LINE = re.compile(r"warning: (\S+)\s+- ncols\s+\d+ not divisible by\s+256 "
                           r"\(required for type\s+\S+\)\s*-> falling back to\s+(\S+)")
FALLBACK_TOTAL = re.compile(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback quantization")


def _hand_pruned(smollm2_dir, out, hidden, mlp_widths, kv_groups):
    """SmolLM2 cut to the given widths by index (quality aside: this checks shapes and types)."""
    from dms_llm.checkpoints import load_model_and_tokenizer, save_pruned
    from dms_llm.plan import LayerPlan, PrunePlan
    from dms_llm.prune import prune_model

    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    plan = PrunePlan.dense(model.config, source_model="smollm2-135m")
    layers = [LayerPlan(list(range(kv_groups[i % len(kv_groups)])), list(range(mlp_widths[i % len(mlp_widths)])))
              for i in range(len(plan.layers))]  # fmt: skip
    plan.hidden_channels, plan.layers, plan.params_after = list(range(hidden)), layers, None
    return save_pruned(prune_model(model, plan), tokenizer, str(out), plan)


CASES = {
    # (hidden width, MLP widths, KV groups of 3 heads) cycled over the 30 layers
    "dense": None,
    "align-32": (576, [1472, 1024, 640], [3, 2, 1]),
    "align-256": (512, [1536, 1024, 512], [3, 2, 1]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fallback_report_matches_llamacpp(case, smollm2_dir, tmp_path):
    ckpt = smollm2_dir if CASES[case] is None else _hand_pruned(smollm2_dir, tmp_path / "ckpt", *CASES[case])
    f16 = str(tmp_path / "f16.gguf")
    export_gguf(ckpt, f16, "f16", progress=False)
    log = quantize_gguf(f16, str(tmp_path / "direct.gguf"), "q4_k_m", threads=1)
    summary = export_gguf(ckpt, str(tmp_path / "q4_k_m.gguf"), "q4_k_m", progress=False, threads=1)
    # the command is llama.cpp's quantizer run on our f16 file, byte for byte
    with open(tmp_path / "direct.gguf", "rb") as a, open(tmp_path / "q4_k_m.gguf", "rb") as b:
        assert a.read() == b.read()
    written = ["direct.gguf", "f16.gguf", "q4_k_m.gguf"] + ([] if case == "dense" else ["ckpt"])
    assert sorted(os.listdir(tmp_path)) == sorted(written)  # no temporary file left

    logged = {m.group(1): m.group(2) for m in map(FALLBACK_LINE.search, log) if m}
    reported, _ = fallback_tensors(str(tmp_path / "q4_k_m.gguf"), "q4_k_m")
    assert reported == summary["fallback"]
    # llama.cpp warns for every fallback but the embedding, which it stores as q8_0 by its own rule for the
    # output matrix (SmolLM2 ties it) when the rows are not a multiple of 256
    assert logged == {k: v for k, v in reported.items() if k not in ("token_embd.weight", "output.weight")}
    total = FALLBACK_TOTAL.search("\n".join(log))
    assert total and int(total.group(1)) == len(logged) > 0

    kinds = {name.split(".", 2)[-1] if name.startswith("blk.") else name for name in reported}
    if case == "align-256":
        # hidden and MLP widths in multiples of 256: only the attention output falls back, its rows
        # are heads x 64 (192, 384, 576), which --align does not change
        assert kinds == {"attn_output.weight"} and len(reported) == 30
        assert summary["architecture"] == "deci"
    else:
        assert {"attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight", "attn_output.weight",
                "token_embd.weight"} <= kinds  # fmt: skip
        # MLP widths of 1472 and 640 are not multiples of 256; 1024 and 1536 are
        assert ("ffn_down.weight" in kinds) == (case == "align-32")
    llm = llamacpp.load(tmp_path / "q4_k_m.gguf", n_ctx=64)
    try:
        assert np.isfinite(llamacpp.logits(llm, list(range(100, 132)))).all()
    finally:
        llm.close()


def _log_callback():
    import ctypes

    import llama_cpp

    callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
    return ctypes.cast(callback, ctypes.c_void_p).value, data.value


def test_a_quantizer_failure_is_one_message_and_the_log_is_given_back(tmp_path):
    source = tmp_path / "not.gguf"
    source.write_bytes(b"not a gguf file")
    before = _log_callback()
    with pytest.raises(RuntimeError, match="llama.cpp could not quantize to q4_k_m: .*failed"):
        quantize_gguf(str(source), str(tmp_path / "out.gguf"), "q4_k_m", threads=1)
    assert _log_callback() == before


def test_the_command_lists_the_fallback_and_keeps_an_existing_file(tmp_path, capsys):
    from conftest import tiny_model
    from test_export_gguf import VOCAB, save_checkpoint

    from dms_llm.cli.export import main

    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model("llama-gqa", vocab_size=VOCAB))  # rows of 48: no k-quant fits
    out = tmp_path / "m.gguf"
    assert main([ckpt, "--outtype", "q4_k_m", "--output", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "q4_k_m" in printed and "matrices are not q4_k: their rows are not a multiple of 256" in printed
    assert GGUFReader(str(out)).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    before = out.read_bytes()
    assert main([ckpt, "--outtype", "q2_k", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]
