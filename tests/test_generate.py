"""Decoding through the KV cache equals full forwards, for `dms_llama` checkpoints.

The cached path can only be checked on a model whose next token depends on the context it is handed:
every test first shows that changing an early token changes the last logits clearly, then compares
logits (not argmax) at every decode step with the full forward's.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SHARED_DATA, input_ids
from safetensors.torch import load_file
from test_modeling import KEEP, env_without_dms_llm, logits, sliced_model

import dms_llm.modeling  # noqa: F401  (registers dms_llama with the Auto classes)

STEPS = 8

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_context_matters(model, prompt, at_least):
    """Changing the first token moves the last position's logits by more than `at_least`: a cache that
    lost the context would be visible in the comparisons that follow."""
    changed = prompt.clone()
    changed[:, 0] = (changed[:, 0] + 7) % model.config.vocab_size
    moved = (logits(model, prompt)[:, -1] - logits(model, changed)[:, -1]).abs().max().item()
    assert moved > at_least, moved


def generate_with_logits(model, prompt, steps, **kwargs):
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1).float()


def full_forward_step_logits(model, sequences, prompt_len):
    """The logits that predicted each generated token, from one forward over the whole sequence."""
    return logits(model, sequences, use_cache=False)[:, prompt_len - 1 : -1]


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_generate_logits_equal_full_forward_at_every_step(sliding_window):
    model, _ = sliced_model(sliding_window=sliding_window)  # layer 0 has no attention, layer 1 no MLP
    prompt = input_ids(batch=2, seq=6)
    assert_context_matters(model, prompt, at_least=0.05)
    sequences, step_logits = generate_with_logits(model, prompt, STEPS, use_cache=True)
    assert sequences.shape[1] == prompt.shape[1] + STEPS
    expected = full_forward_step_logits(model, sequences, prompt.shape[1])
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-5)
    # The same comparison catches a cache that drops the context: decoding without it gives other logits.
    no_context = torch.stack([logits(model, sequences[:, i : i + 1])[:, -1] for i in range(5, 5 + STEPS)], 1)
    assert (no_context[:, 1:] - expected[:, 1:]).abs().max() > 0.05


# Where the attention-free layers sit decides which cache slots are dummies; generate reads slot 0.
NO_ATTENTION, NO_MLP, NARROW, WIDE = KEEP


@pytest.mark.parametrize(
    "keep",
    [[NARROW, NO_MLP, NO_ATTENTION, WIDE], [NARROW, NO_MLP, WIDE, NO_ATTENTION], [NO_ATTENTION, NO_ATTENTION, NARROW, WIDE]],
    ids=["middle", "last", "first-two"],
)
def test_generate_with_attention_free_layers_anywhere(keep):
    model, _ = sliced_model(keep=keep)
    prompt = input_ids(batch=2, seq=6)
    assert_context_matters(model, prompt, at_least=0.05)
    sequences, step_logits = generate_with_logits(model, prompt, STEPS, use_cache=True)
    expected = full_forward_step_logits(model, sequences, prompt.shape[1])
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_manual_decode_loop_accepts_either_cache_keyword(keyword):
    from transformers import DynamicCache

    model, _ = sliced_model()
    ids = input_ids(batch=2, seq=10)
    assert_context_matters(model, ids[:, :6], at_least=0.05)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True, **{keyword: cache})
        stepped = [out.logits[:, -1]]
        for i in range(6, 10):
            stepped.append(model(ids[:, i : i + 1], use_cache=True, **{keyword: cache}).logits[:, -1])
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.stack(stepped, 1), logits(model, ids)[:, 5:], rtol=0, atol=1e-5)


def test_passing_two_different_caches_is_an_error():
    from transformers import DynamicCache

    model, _ = sliced_model()
    with pytest.raises(ValueError, match="not both"):
        model(input_ids(seq=4), cache=DynamicCache(), past_key_values=DynamicCache())


# ----- the real SmolLM2, pruned non-uniformly and saved (slow) ------------------------------------------

PROMPT = "The history of the city begins with"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def pruned_smollm2(tmp_path_factory):
    """SmolLM2-135M pruned by FLAP to 85% (per-layer widths differ, output biases added), saved as a
    `dms_llama` checkpoint."""
    from dms_llm.baselines import METHODS
    from dms_llm.data import load_calibration
    from dms_llm.checkpoints import count_parameters, load_model_and_tokenizer
    from dms_llm.prune import prune_model
    from dms_llm.checkpoints import save_pruned

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    blocks = load_calibration(None, tokenizer, 128, 8, data_dir=SHARED_DATA)
    plan = METHODS["flap"](model, blocks, int(0.85 * count_parameters(model)))
    path = str(tmp_path_factory.mktemp("smol") / "flap85")
    save_pruned(prune_model(model, plan), tokenizer, path, plan)
    return path


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = logits(model, ids, use_cache=False)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.slow
def test_pruned_smollm2_generate_equals_greedy_without_cache(pruned_smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pruned_smollm2, dtype=torch.float32).eval()
    assert model.config.model_type == "dms_llama"
    assert len(set(model.config.layer_intermediate_sizes)) > 1  # really non-uniform
    prompt = AutoTokenizer.from_pretrained(pruned_smollm2)(PROMPT, return_tensors="pt").input_ids
    assert_context_matters(model, prompt, at_least=1.0)
    sequences, step_logits = generate_with_logits(model, prompt, NEW_TOKENS)
    torch.testing.assert_close(sequences, greedy_without_cache(model, prompt, NEW_TOKENS), rtol=0, atol=0)
    expected = full_forward_step_logits(model, sequences, prompt.shape[1])
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-3)


REMOTE_GENERATE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Hide(importlib.abc.MetaPathFinder):  # only the checkpoint's own modeling files may be used
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dms_llm":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, _Hide())

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    ckpt, prompt_text, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()
    assert not type(model).__module__.startswith("dms_llm") and "dms_llm" not in sys.modules
    prompt = torch.tensor([[int(t) for t in prompt_text.split(",")]])
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    save_file({"sequences": gen.sequences, "logits": torch.stack(gen.logits, 1).float().contiguous()}, out)
    """
)


def generate_through_remote_code(checkpoint, prompt, steps, tmp_path):
    """`generate` in a fresh interpreter where dms_llm cannot be imported (trust_remote_code)."""
    script = tmp_path / "remote_generate.py"
    script.write_text(REMOTE_GENERATE_SCRIPT)
    env = env_without_dms_llm(tmp_path)
    out = tmp_path / "generated.safetensors"
    prompt_text = ",".join(str(int(t)) for t in prompt[0])
    result = subprocess.run([sys.executable, str(script), str(checkpoint), prompt_text, str(steps), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    found = load_file(str(out))
    return found["sequences"], found["logits"]


def test_remote_code_generate_equals_full_forward(tmp_path):
    from test_modeling import _save

    model, _ = sliced_model(tie=False)
    _save(model, tmp_path / "ckpt")
    prompt = input_ids(batch=1, seq=6)
    assert_context_matters(model, prompt, at_least=0.05)
    sequences, step_logits = generate_through_remote_code(tmp_path / "ckpt", prompt, STEPS, tmp_path)
    expected = full_forward_step_logits(model, sequences, prompt.shape[1])
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-5)


def test_checkpoint_with_stale_modeling_files_generates_through_dms_llm(tmp_path):
    from test_modeling import _save
    from transformers import AutoModelForCausalLM

    # A checkpoint saved by an older dms_llm carries older modeling files; where dms_llm is imported, the
    # library's registered classes load it instead, so such a file never runs.
    model, _ = sliced_model(tie=False)
    _save(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "modeling_dms_llama.py").write_text("raise ImportError('stale modeling file')\n")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(loaded).__module__.startswith("dms_llm.")
    prompt = input_ids(batch=1, seq=6)
    assert_context_matters(loaded, prompt, at_least=0.05)
    sequences, step_logits = generate_with_logits(loaded, prompt, STEPS, use_cache=True)
    torch.testing.assert_close(step_logits, full_forward_step_logits(model, sequences, prompt.shape[1]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_pruned_smollm2_remote_code_generate_equals_greedy_without_cache(pruned_smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(pruned_smollm2, dtype=torch.float32).eval()
    prompt = AutoTokenizer.from_pretrained(pruned_smollm2)(PROMPT, return_tensors="pt").input_ids
    sequences, step_logits = generate_through_remote_code(pruned_smollm2, prompt, NEW_TOKENS, tmp_path)
    torch.testing.assert_close(sequences, greedy_without_cache(reference, prompt, NEW_TOKENS), rtol=0, atol=0)
    expected = full_forward_step_logits(reference, sequences, prompt.shape[1])
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-3)
