"""Write a checkpoint with a real model's shapes and random weights, shard by shard, and a plan for it.

    python eval/make_synthetic_checkpoint.py /work/big/llama2-7b-synth --shape llama-2-7b \
        --plan /work/big/llama2-7b-synth-plan80.json --plan-ratio 0.8

For measuring `dms-llm prune` on a model this machine cannot hold twice (docs/RESULTS.md). The model is
never built in memory: names, shapes and the shard layout come from a meta-device model (no storage), and
each shard's tensors are drawn, written and freed before the next (memory: one shard). The folder holds
safetensors shards with `model.safetensors.index.json` (the layout `save_pretrained` writes), config.json,
generation_config.json and a small word-level tokenizer inside the vocabulary.

The plan (`--plan`) is what a search could produce, without running one: random importances, random kept
ratios per structure (heads, MLP channels, hidden, attention / MLP sublayers), then the search's own
end-of-search fit (`fit_to_budget`) scales the MLP widths to `--plan-ratio` of the dense parameter count,
and `ModelMasks.to_plan` applies the same top-k rule as a search.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


SHAPES = {
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # meta-llama/Meta-Llama-3-8B (GQA 32/8, rope theta 500000); eval/shape_smoke.py writes it with 2 layers
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),  # the ids of the word-level tokenizer below
    # for tests of this script
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1200, max_position_embeddings=256, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def write_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level tokenizer of min(vocab_size, 1000) tokens (ids 0/1/2 = unk/bos/eos, as Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(min(vocab_size, 1000) - 3)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def write_checkpoint(folder: str, shape: str, max_shard_size: str = "2GB", seed: int = 0, layers: int | None = None) -> None:
    """`layers`: fewer decoder layers than the shape has (the real layer shapes, a shallower model)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers is not None else {})})
    config.dtype = "bfloat16"
    model = meta_model(config)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, (shard_file, names) in enumerate(split.filename_to_tensors.items()):
        start = time.time()
        shard = {}
        for name in names:
            t = torch.empty(state[name].shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.uniform_(0.5, 1.5, generator=g)
            else:
                t.normal_(0.0, 0.02, generator=g)
            shard[name] = t
        save_file(shard, os.path.join(folder, shard_file), metadata={"format": "pt"})
        del shard
        print(f"{shard_file} ({len(names)} tensors) in {time.time() - start:.1f} s", flush=True)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
    write_tokenizer(folder, config.vocab_size)


def random_plan(folder: str, ratio: float, seed: int = 0, source_model: str | None = None):
    """A non-uniform plan at `ratio` of the dense parameter count (see the module doc)."""
    import torch
    from transformers import AutoConfig

    from dms_llm.budget import ParameterCounter
    from dms_llm.masks import ModelMasks
    from dms_llm.budget import fit_to_budget

    config = AutoConfig.from_pretrained(folder)
    counter = ParameterCounter(meta_model(config))
    masks = ModelMasks(config, structures="heads,channels,hidden,layers", depth="sublayer")
    g = torch.Generator().manual_seed(seed)
    n_layers = config.num_hidden_layers
    with torch.no_grad():
        for name, t in masks.named_structures():
            t.importance.copy_(torch.rand(t.n, generator=g))
            if name == "hidden":
                t.ratio.fill_(0.97)
            elif name == "attn_layers":  # two attention sublayers removed, one MLP sublayer
                t.ratio.fill_(1 - 2 / n_layers)
            elif name == "mlp_layers":
                t.ratio.fill_(1 - 1 / n_layers)
            else:
                t.ratio.fill_(float(torch.empty(()).uniform_(0.6, 1.0, generator=g)))
            t.clamp_()
    target = int(ratio * counter.dense())
    fit = fit_to_budget(masks, counter, target)
    plan = masks.to_plan(config, source_model=source_model or os.path.abspath(folder))
    plan.metadata = {"made_by": "eval/make_synthetic_checkpoint.py (random importances, not a search)",
                     "target_params": target, "budget_fit": fit, "seed": seed}
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where the checkpoint goes (must not exist)")
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", help="also write a plan for the checkpoint here")
    p.add_argument("--plan-ratio", type=float, default=0.8, help="the plan's parameter count / dense")
    args = p.parse_args(argv)
    if os.path.exists(args.folder):
        print(f"error: {args.folder} exists; choose a new folder", file=sys.stderr)
        return 2
    if args.layers is not None and args.layers < 1:
        print(f"error: --layers must be at least 1, got {args.layers}", file=sys.stderr)
        return 2
    start = time.time()
    write_checkpoint(args.folder, args.shape, args.max_shard_size, args.seed, args.layers)
    print(f"checkpoint written to {args.folder} in {time.time() - start:.1f} s")
    if args.plan:
        plan = random_plan(args.folder, args.plan_ratio, args.seed)
        plan.to_json(args.plan)
        print(f"plan: {plan.params_before:,} -> {plan.params_after:,} parameters "
              f"({plan.params_after / plan.params_before:.2%}); {len(plan.kept_layers())} of {len(plan.layers)} layers, "
              f"hidden {len(plan.hidden_channels)}, stock format: {plan.uses_stock_format()} -> {args.plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
