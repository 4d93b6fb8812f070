"""Tiny real models built from configs (no Hub, no mocks), shared by every test module."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

# One entry per model family the toolkit supports; every parity test is parametrised over these.
FAMILIES = {
    "llama-mha": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-gqa": dict(cls="LlamaConfig", num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True),
    "mistral": dict(cls="MistralConfig", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(cls="Qwen2Config", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def tiny_config(family: str = "llama-gqa", **overrides):
    import transformers

    spec = dict(FAMILIES[family])
    cls = getattr(transformers, spec.pop("cls"))
    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str = "llama-gqa", seed: int = 0, **overrides):
    """A randomly initialised model of the family; norms and biases are randomised too so that a
    slicing bug in them cannot hide behind all-ones / all-zeros defaults."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def input_ids(batch=2, seq=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)
