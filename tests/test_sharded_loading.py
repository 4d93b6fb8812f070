"""Sharded loading (`dms_llm.checkpoints.sharded.load_sharded`): every process reads only its rows of every
parameter from the files, and the sharded model is the saved one: the same tensors gathered, the same
buffers, the same logits. Two gloo processes under torchrun; the input checks in this process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in each of two processes: compare with the model from_pretrained reads whole, write what was found.
SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from dms_llm.training.engine import process_state
from dms_llm.checkpoints.sharded import load_sharded

process_state()
folder, out = sys.argv[1], sys.argv[2]
whole = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
model = load_sharded(folder, "float32")
model.config._attn_implementation = "eager"
found = {"held": sum(p.to_local().numel() for p in model.parameters()),
         "total": sum(p.numel() for p in whole.parameters()),
         "differ": [n for n, p in model.named_parameters() if not torch.equal(p.full_tensor(), whole.get_parameter(n))],
         "buffers_differ": [n for n, b in model.named_buffers() if not torch.equal(b, whole.get_buffer(n))],
         "frozen": not any(p.requires_grad for p in model.parameters()), "training": model.training}
ids = torch.randint(3, whole.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    found["logit_diff"] = float((model(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max())
with open(f"{out}.{dist.get_rank()}.json", "w") as f:
    json.dump(found, f)
"""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_process_reads_its_shard_and_the_model_is_the_saved_one(tmp_path, family):
    # 5 layers and an odd vocabulary: row counts that two processes do not split evenly
    tiny_model(family, num_hidden_layers=5, vocab_size=101).save_pretrained(tmp_path / "model", max_shard_size="20KB")
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "model"), str(tmp_path / "found")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.load(open(tmp_path / f"found.{rank}.json")) for rank in (0, 1)]
    total = found[0]["total"]
    assert sum(f["held"] for f in found) == total  # every parameter's rows held exactly once
    for f in found:
        assert f["differ"] == [] and f["buffers_differ"] == [] and f["frozen"] and not f["training"]
        assert f["held"] <= total * 0.55  # a shard, not the model
        assert f["logit_diff"] < 1e-5


def test_bad_checkpoints_are_clear_errors_before_any_weights_are_read(tmp_path):
    from safetensors.torch import load_file, save_file

    from dms_llm.checkpoints.sharded import load_sharded

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sharded(str(tmp_path))
    tiny_model("llama-mha").save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    weights = load_file(path)
    with pytest.raises(RuntimeError, match="no process group"):
        load_sharded(str(tmp_path / "m"))  # a good checkpoint passes every check up to the process group
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape"):
        load_sharded(str(tmp_path / "m"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 tensors"):
        load_sharded(str(tmp_path / "m"))
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.bfloat16)
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="choose one with --dtype"):
        load_sharded(str(tmp_path / "m"), "auto")
