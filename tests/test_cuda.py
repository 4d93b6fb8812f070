"""The equivalences and the search on a CUDA device, in fp32 and bf16 (skipped without a GPU).

The CPU suite proves each equivalence in fp32; these repeat the ones a GPU run depends on where the
kernels differ (cuBLAS, sdpa/flash attention, bf16 accumulation): identity masks reproduce the original
logits, binarised masks reproduce the physically pruned model, the reloaded checkpoint reproduces the
in-memory one, and a short search (with bf16 mixed precision) runs to a plan under its budget.
"""

import json

import pytest
import torch
from conftest import FAMILIES, input_ids, save_tiny_checkpoint, tiny_model, tiny_tokenizer, write_corpus

from dms_llm.inject import MaskHooks
from dms_llm.masks import ModelMasks
from dms_llm.prune import prune_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# bf16 keeps 8 bits of mantissa: logits of size ~1 differ by a few 1e-2 between two bf16 computation orders.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
DTYPES = [torch.float32, torch.bfloat16]


def _random_masks(model, seed: int) -> ModelMasks:
    masks = ModelMasks(model.config, structures=("heads", "channels", "hidden", "layers"))
    g = torch.Generator().manual_seed(seed)
    for name, topk in masks.named_structures():
        topk.importance.copy_(torch.rand(topk.n, generator=g))
        topk.ratio.data.fill_(0.75 if topk.kind == "layer" else float(torch.rand((), generator=g)) * 0.5 + 0.4)
    return masks


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_and_binarised_masks_match_on_cuda(family, dtype):
    model = tiny_model(family, num_hidden_layers=4).to("cuda", dtype)
    x = input_ids().cuda()
    with torch.no_grad():
        reference = model(x).logits
        masks = ModelMasks(model.config, structures=("heads", "channels", "hidden", "layers")).to("cuda")
        with MaskHooks(model, masks), masks.hard():  # ratio 1: everything kept
            assert torch.equal(model(x).logits, reference)

        masks = _random_masks(model, seed=1).to("cuda")
        plan = masks.to_plan(model.config, source_model="tiny")
        pruned = prune_model(model, plan)
        assert next(pruned.parameters()).device.type == "cuda" and next(pruned.parameters()).dtype == dtype
        with MaskHooks(model, masks), masks.hard():
            hooked = model(x).logits.float()
        diff = (hooked - pruned(x).logits.float()).abs().max().item()
        assert diff < TOLERANCE[dtype], f"{family} {dtype}: binarised masks vs pruned model differ by {diff}"
        assert (hooked - reference.float()).abs().max().item() > 2 * TOLERANCE[dtype]  # something was removed


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_reloaded_checkpoint_matches_in_memory_model_on_cuda(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from dms_llm.checkpoints import save_pruned

    model = tiny_model("qwen2", num_hidden_layers=4).to("cuda", dtype)
    plan = _random_masks(model, seed=2).to_plan(model.config, source_model="tiny")
    pruned = prune_model(model, plan)
    folder = save_pruned(pruned, tiny_tokenizer(), str(tmp_path / "pruned"), plan)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()
    x = input_ids().cuda()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned(x).logits)
        # greedy decoding with the KV cache equals decoding without it
        with_cache = reloaded.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        without = reloaded.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_search_runs_on_cuda_to_budget(tmp_path, precision):
    from dms_llm.cli.search import main

    model_dir = save_tiny_checkpoint(tmp_path / "model", "llama-gqa")
    corpus = write_corpus(tmp_path / "calib.jsonl")
    out = tmp_path / "out"
    args = ["--model", model_dir, "--dataset", corpus, "--output-dir", str(out), "--seq-len", "32", "--num-samples", "16",
            "--steps", "6", "--checkpoint-every", "3", "--no-eval", "--target-ratio", "0.6", "--mixed-precision", precision]
    assert main(args) == 0
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["params"] <= summary["target_params"]
    assert summary["parity_max_abs_diff"] < 1e-4  # checked in fp32 after the search, on the GPU
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


# One process in an NCCL group: the shards must be allocated on the GPU FSDP2 computes on, not on the host.
SHARDED_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from dms_llm.checkpoints.sharded import load_sharded

torch.cuda.set_device(0)
dist.init_process_group("nccl")
folder, out = sys.argv[1], sys.argv[2]
whole = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").cuda().eval()
model = load_sharded(folder, "float32")
model.config._attn_implementation = "eager"
ids = torch.randint(3, whole.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
with torch.no_grad():
    diff = float((model(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max())
found = {"devices": sorted({p.to_local().device.type for p in model.parameters()}), "logit_diff": diff,
         "differ": [n for n, p in model.named_parameters() if not torch.equal(p.full_tensor(), whole.get_parameter(n))]}
json.dump(found, open(out, "w"))
dist.destroy_process_group()
"""


def test_sharded_loading_allocates_the_shards_on_the_gpu(tmp_path):
    import os
    import subprocess
    import sys

    tiny_model("llama-gqa", num_hidden_layers=3).save_pretrained(tmp_path / "model", max_shard_size="20KB")
    script = tmp_path / "load.py"
    script.write_text(SHARDED_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
                           str(tmp_path / "model"), str(tmp_path / "found.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "found.json").read_text())
    assert found["devices"] == ["cuda"] and found["differ"] == []
    assert found["logit_diff"] < 1e-4
