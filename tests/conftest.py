"""Tiny real models built from configs (no Hub, no mocks), shared by every test module."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models are dominated by per-op overhead, where a second intra-op thread only adds contention.
torch.set_num_threads(1)

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


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`):
    tiny matrices gain nothing from threads, and on a busy machine intra-op thread hand-offs made the many small
    steps of `generate` 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def input_ids(batch=2, seq=12, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


# ----- a saved tiny checkpoint with a real (word-level) tokenizer, and text to calibrate on --------
WORDS = [f"w{i}" for i in range(90)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_corpus(path, n_docs=40, words_per_doc=120, seed=0):
    """JSONL documents with learnable structure (each word tends to be followed by the next one)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            i, words = rng.randrange(len(WORDS)), []
            for _ in range(words_per_doc):
                i = (i + 1) % len(WORDS) if rng.random() < 0.7 else rng.randrange(len(WORDS))
                words.append(WORDS[i])
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return str(path)


def save_tiny_checkpoint(path, family="llama-gqa", **overrides):
    model = tiny_model(family, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
