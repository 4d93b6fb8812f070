"""The per-layer `dms_llama` architecture: parity with stock models, non-uniform layers (cache,
attention backends, dtypes, checkpointing, LoRA) and both ways of loading a saved checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import input_ids, tiny_config, tiny_model
from safetensors.torch import save_file

import dms_llm.modeling
from dms_llm.modeling import DMSLlamaConfig, DMSLlamaForCausalLM, register_auto_classes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(dms_llm.modeling.__file__))))


def env_without_dms_llm(tmp_path) -> dict:
    """The environment of a fresh interpreter in which dms_llm cannot be imported (the checkout is taken
    off PYTHONPATH; run it from tmp_path), for the trust_remote_code path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != REPO_ROOT]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    return env

# Biases of each source family's projections, as (q/k/v, o, gate/up, down).
FAMILY_BIASES = {
    "llama": lambda c: (c.attention_bias, c.attention_bias, c.mlp_bias, c.mlp_bias),
    "mistral": lambda c: (False, False, False, False),
    "qwen2": lambda c: (True, False, False, False),
}


def dms_config_from(stock_config, **overrides):
    """The uniform DMSLlamaConfig equivalent to a stock Llama/Mistral/Qwen2 config."""
    qkv, o, gate_up, down = FAMILY_BIASES[stock_config.model_type](stock_config)
    kwargs = dict(
        vocab_size=stock_config.vocab_size,
        hidden_size=stock_config.hidden_size,
        intermediate_size=stock_config.intermediate_size,
        num_hidden_layers=stock_config.num_hidden_layers,
        num_attention_heads=stock_config.num_attention_heads,
        num_key_value_heads=stock_config.num_key_value_heads,
        head_dim=stock_config.head_dim,
        hidden_act=stock_config.hidden_act,
        max_position_embeddings=stock_config.max_position_embeddings,
        rms_norm_eps=stock_config.rms_norm_eps,
        rope_parameters=dict(stock_config.rope_parameters),
        tie_word_embeddings=stock_config.tie_word_embeddings,
        pad_token_id=stock_config.pad_token_id,
        bos_token_id=stock_config.bos_token_id,
        eos_token_id=stock_config.eos_token_id,
        attention_bias=qkv,
        attention_out_bias=o,
        mlp_bias=gate_up,
        mlp_out_bias=down,
        sliding_window=getattr(stock_config, "sliding_window", None),
    )
    kwargs.update(overrides)
    config = DMSLlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


pytestmark = pytest.mark.usefixtures("single_thread")


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


# --- uniform: identical to the stock model ------------------------------------------------------


def test_uniform_config_reproduces_stock_logits(family):
    stock = tiny_model(family)
    model = DMSLlamaForCausalLM(dms_config_from(stock.config)).eval()
    # strict: every name is Llama's, and no parameter is missing or extra.
    model.load_state_dict(stock.state_dict(), strict=True)
    assert model.config.tie_word_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    ids = input_ids(seq=12)
    diff = (logits(stock, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"{family}: max |stock - dms| = {diff}"


def test_mistral_sliding_window_reproduces_stock_logits():
    stock = tiny_model("mistral", sliding_window=5)  # shorter than the input, so the window masks
    model = DMSLlamaForCausalLM(dms_config_from(stock.config)).eval()
    assert model.config.sliding_window == 5
    model.load_state_dict(stock.state_dict(), strict=True)
    ids = input_ids(seq=12)
    diff = (logits(stock, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, diff


# --- non-uniform layers ---------------------------------------------------------------------------

# Per source layer of a 4-layer llama-gqa (6 heads, 3 KV groups, 40 channels): kept KV groups and
# kept MLP channels. Layer 0 has no attention, layer 1 no MLP, and the head counts differ.
KEEP = [
    dict(groups=[], channels=list(range(0, 40, 2)) + [39]),
    dict(groups=[0, 2], channels=[]),
    dict(groups=[1], channels=list(range(40))),
    dict(groups=[0, 1, 2], channels=[3, 7, 8, 20, 21, 30, 33, 34, 35, 36]),
]


def _stock_source(tie=True, sliding_window=None, **extra):
    family = "mistral" if sliding_window else "llama-gqa"
    overrides = dict(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=tie, **extra)
    if sliding_window:
        overrides["sliding_window"] = sliding_window
    return tiny_model(family, **overrides)


def sliced_model(tie=True, sliding_window=None, keep=KEEP, **extra):
    """A non-uniform DMS model sliced from a stock one, and the stock model with the removed
    structures' outputs zeroed: the two must compute the same function. `keep`: what each layer keeps,
    like KEEP; `extra`: config overrides."""
    stock = _stock_source(tie, sliding_window, **extra)
    c = stock.config
    n_rep, hd = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    config = dms_config_from(
        c,
        layer_num_key_value_heads=[len(k["groups"]) for k in keep],
        layer_num_attention_heads=[len(k["groups"]) * n_rep for k in keep],
        layer_intermediate_sizes=[len(k["channels"]) for k in keep],
    )
    sd = {k: v.clone() for k, v in stock.state_dict().items()}
    new = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    for i, layer in enumerate(keep):
        p = f"model.layers.{i}."
        none = [torch.zeros(0, dtype=int)]
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in layer["groups"]] or none)
        q_rows = torch.cat([torch.arange(g * n_rep * hd, (g + 1) * n_rep * hd) for g in layer["groups"]] or none)
        ch = torch.tensor(layer["channels"], dtype=int)
        if layer["groups"]:
            new[p + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
            new[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][q_rows]
            new[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"][kv_rows]
            new[p + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"][kv_rows]
            new[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, q_rows]
        if layer["channels"]:
            new[p + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
            new[p + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"][ch]
            new[p + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"][ch]
            new[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, ch]
        # The reference: zero what the slice removed, so it contributes nothing to the residual.
        o_mask = torch.ones(c.num_attention_heads * hd, dtype=torch.bool)
        o_mask[q_rows] = False
        down_mask = torch.ones(c.intermediate_size, dtype=torch.bool)
        down_mask[ch] = False
        with torch.no_grad():
            stock.model.layers[i].self_attn.o_proj.weight[:, o_mask] = 0
            stock.model.layers[i].mlp.down_proj.weight[:, down_mask] = 0
    model = DMSLlamaForCausalLM(config).eval()
    model.load_state_dict(new, strict=True)
    return model, stock


@pytest.fixture(scope="module")
def nonuniform():
    model, _ = sliced_model()
    return model


def test_nonuniform_structure_and_parameter_names(nonuniform):
    layers = nonuniform.model.layers
    assert layers[0].self_attn is None and layers[0].input_layernorm is None
    assert layers[1].mlp is None and layers[1].post_attention_layernorm is None
    assert [layer.self_attn.num_heads for layer in layers[1:]] == [4, 2, 6]
    names = set(nonuniform.state_dict())
    assert not any(n.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm")) for n in names)
    assert not any(n.startswith(("model.layers.1.mlp", "model.layers.1.post_attention_layernorm")) for n in names)
    assert "model.layers.3.self_attn.o_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    # Cache slots: the three attention layers first, the attention-free layer 0 last.
    assert nonuniform.config.layer_types == ["full_attention", "full_attention", "full_attention", "moe"]
    assert [layer.self_attn.layer_idx for layer in layers[1:]] == [0, 1, 2]


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_nonuniform_matches_stock_with_removed_structures_zeroed(sliding_window):
    model, reference = sliced_model(sliding_window=sliding_window)
    ids = input_ids(seq=12)
    diff = (logits(model, ids) - logits(reference, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = logits(model, ids, use_cache=False)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_generate_with_cache_equals_greedy_without_cache(sliding_window):
    model, _ = sliced_model(sliding_window=sliding_window)
    ids = input_ids(seq=6)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, use_cache=True,
            min_new_tokens=10, pad_token_id=0,
        )
    torch.testing.assert_close(out, greedy_without_cache(model, ids, 10), rtol=0, atol=0)


def test_cache_skips_attention_free_layers(nonuniform):
    ids = input_ids(seq=5)
    with torch.no_grad():
        out = nonuniform(ids, use_cache=True)
    cache = out.past_key_values
    # Layer 0 has no attention: the cache holds a slot for each of the other three, and a dummy slot.
    assert cache.is_dummy == [False, False, False, True]
    # Slot 0 is the first attention layer's, where `generate` reads the length (positions of the next step).
    assert cache.get_seq_length() == 5
    assert [cache.layers[i].keys.shape[1] for i in (0, 1, 2)] == [2, 1, 3]


def test_cache_built_without_config_decodes_correctly(nonuniform):
    from transformers import DynamicCache

    # Without the config the cache appends plain layers lazily, one per attention layer.
    ids = input_ids(seq=10)
    cache = DynamicCache()
    with torch.no_grad():
        nonuniform(ids[:, :6], past_key_values=cache, use_cache=True)
        stepped = nonuniform(ids[:, 6:], past_key_values=cache, use_cache=True).logits
    assert len(cache.layers) == 3 and cache.get_seq_length() == 10
    torch.testing.assert_close(stepped, logits(nonuniform, ids)[:, 6:], rtol=1e-5, atol=1e-5)


def test_attention_free_model_generates():
    config = DMSLlamaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, head_dim=8, num_attention_heads=2,
                            layer_num_attention_heads=[0, 0], layer_num_key_value_heads=[0, 0],
                            layer_intermediate_sizes=[8, 8])
    assert config.use_cache is False
    model = DMSLlamaForCausalLM(config).eval()
    ids = input_ids(seq=4)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out, greedy_without_cache(model, ids, 3), rtol=0, atol=0)


def test_eager_and_sdpa_agree(nonuniform):
    ids = input_ids(seq=12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, so the backends get a real mask rather than is_causal
    eager = logits(nonuniform, ids, attention_mask=mask)
    sdpa = DMSLlamaForCausalLM(nonuniform.config).eval()
    sdpa.load_state_dict(nonuniform.state_dict())
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(sdpa, ids, attention_mask=mask)[:, 3:], eager[:, 3:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(nonuniform, dtype):
    ids = input_ids(seq=12)
    reference = logits(nonuniform, ids)
    half = DMSLlamaForCausalLM(nonuniform.config).eval()
    half.load_state_dict(nonuniform.state_dict())
    half.to(dtype)
    out = logits(half, ids)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.05 * reference.abs().max() + 0.02
    with torch.no_grad():
        generated = half.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)


def test_gradient_checkpointing_gives_same_gradients(nonuniform):
    model = DMSLlamaForCausalLM(nonuniform.config)
    model.load_state_dict(nonuniform.state_dict())
    model.train()
    ids = input_ids(seq=12)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    calls = []
    # A pre-hook: the non-reentrant recompute stops early, before forward hooks would run.
    hook = model.model.layers[3].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    model.activation_checkpointing_enable()
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2, "the checkpointed layer must be recomputed in backward"
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lora_on_all_projections_trains_and_merges(nonuniform):
    from peft import LoraConfig, get_peft_model

    base = DMSLlamaForCausalLM(nonuniform.config)
    base.load_state_dict(nonuniform.state_dict())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    n_linear = sum(
        isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets for name, m in nonuniform.named_modules()
    )
    assert n_linear == 4 * 7 - 4 - 3  # layer 0 lacks attention, layer 1 lacks the MLP
    wrapped = [n for n, m in lora.named_modules() if n.split(".")[-1] in targets and hasattr(m, "lora_A")]
    assert len(wrapped) == n_linear

    ids = input_ids(seq=12)
    lora.train()
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora(ids, labels=ids).loss.backward()
    optimizer.step()
    lora.eval()
    tuned = logits(lora, ids)
    assert (tuned - logits(nonuniform, ids)).abs().max() > 1e-4, "the LoRA step changed nothing"

    merged = lora.merge_and_unload()
    assert type(merged) is DMSLlamaForCausalLM
    torch.testing.assert_close(logits(merged, ids), tuned, rtol=1e-5, atol=1e-5)


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(layer_num_attention_heads=[4, 4]), "has 2 entries"),
        (dict(layer_num_attention_heads=[4, 5, 4], layer_num_key_value_heads=[2, 2, 2]), "not a multiple"),
        (dict(layer_num_attention_heads=[4, 0, 4], layer_num_key_value_heads=[2, 2, 2]), "both or neither"),
        (dict(layer_num_attention_heads=[0, 4, 4], layer_num_key_value_heads=[0, 2, 2],
              layer_intermediate_sizes=[0, 8, 8]), "neither attention nor MLP"),
        (dict(layer_intermediate_sizes=[8, -1, 8]), "non-negative"),
    ],
)
def test_config_rejects_inconsistent_layers(bad, message):
    with pytest.raises(ValueError, match=message):
        DMSLlamaConfig(num_hidden_layers=3, hidden_size=40, head_dim=8, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=8, **bad)


def test_config_defaults_and_scalars():
    uniform = DMSLlamaConfig(num_hidden_layers=2, hidden_size=40, head_dim=8, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=8, attention_bias=True)
    assert uniform.layer_num_attention_heads == [4, 4] and uniform.layer_intermediate_sizes == [8, 8]
    assert uniform.attention_out_bias is True and uniform.mlp_out_bias is False  # stock Llama semantics
    ragged = DMSLlamaConfig(num_hidden_layers=2, hidden_size=40, head_dim=8, layer_num_attention_heads=[0, 6],
                            layer_num_key_value_heads=[0, 3], layer_intermediate_sizes=[12, 0])
    assert (ragged.num_attention_heads, ragged.num_key_value_heads, ragged.intermediate_size) == (6, 3, 12)
    assert "layer_types" not in ragged.to_dict()
    assert DMSLlamaConfig(**ragged.to_dict()).layer_num_key_value_heads == [0, 3]
    from_source = DMSLlamaConfig(**tiny_config("qwen2").to_dict())
    assert from_source.model_type == "dms_llama" and from_source.layer_types == ["full_attention"] * 3


# --- save / reload --------------------------------------------------------------------------------


def _save(model, path):
    register_auto_classes()
    model.save_pretrained(path)
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "configuration_dms_llama.py", "modeling_dms_llama.py"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    auto_map = json.load(open(os.path.join(path, "config.json")))["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_dms_llama.DMSLlamaConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_dms_llama.DMSLlamaForCausalLM"


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_reload_with_registered_classes(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model, _ = sliced_model(tie=tie)
    _save(model, tmp_path)
    register_auto_classes()  # idempotent
    # eager like the in-memory model: from_pretrained would pick sdpa, which rounds differently.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is DMSLlamaForCausalLM
    assert loaded.config.tie_word_embeddings == tie
    ids = input_ids(seq=12)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys
    if importlib.util.find_spec("dms_llm") is not None:
        # Only an installed (e.g. editable) dms_llm is visible here; hide it so the checkpoint's own
        # files are all that can be used.
        class _Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "dms_llm":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _Hide())
    try:
        import dms_llm
    except ImportError:
        pass
    else:
        sys.exit("dms_llm is importable in the clean environment")

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ckpt, reference = sys.argv[1], load_file(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__name__ == "DMSLlamaForCausalLM", type(model)
    assert not type(model).__module__.startswith("dms_llm"), type(model).__module__
    assert "dms_llm" not in sys.modules
    with torch.no_grad():
        out = model(reference["input_ids"]).logits
    diff = (out - reference["logits"]).abs().max().item()
    print("max_abs_diff", diff)
    sys.exit(0 if diff <= 1e-6 else 1)
    """
)


def test_remote_code_loads_without_dms_llm(tmp_path):
    model, _ = sliced_model(tie=False)
    ckpt = tmp_path / "ckpt"
    _save(model, ckpt)
    ids = input_ids(seq=12)
    save_file({"input_ids": ids, "logits": logits(model, ids)}, str(tmp_path / "reference.safetensors"))
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)

    env = env_without_dms_llm(tmp_path)
    result = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(tmp_path / "reference.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max_abs_diff" in result.stdout
