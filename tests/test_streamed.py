"""The streamed model (`dms_llm.streamed`): a pruned model run one decoder layer at a time, its weights sliced
from the source by the plan or read from the written files, gives the logits of the pruned model built
whole (`prune_model`), and never holds more than one decoder layer's weights."""

import pytest
import torch
from conftest import input_ids
from test_prune import CASES, KINDS, build, make_plan

from dms_llm.arch import ModelParts
from dms_llm.prune import prune_model, pruned_tensor_reader
from dms_llm.streamed import skeleton, streamed


def _materialised_layers(model) -> list[int]:
    return [i for i, layer in enumerate(ModelParts(model).layers) if any(p.device.type != "meta" for p in layer.parameters())]


def _run(model, ids):
    """Logits of `model`, recording which decoder layers hold weights while each layer runs."""
    seen = []
    handles = [layer.register_forward_pre_hook(lambda *_: seen.append(_materialised_layers(model)))
               for layer in ModelParts(model).layers]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits, seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_streamed_slices_give_the_pruned_models_logits_one_layer_at_a_time(case, kind):
    model = build(case)
    plan = make_plan(model, kind)
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        expected = prune_model(model, plan)(input_ids=ids).logits
    pruned = skeleton(plan.pruned_config(), torch.float32, "eager")
    assert all(p.device.type == "meta" for p in pruned.parameters())
    with streamed(pruned, pruned_tensor_reader(model, plan)):
        logits, seen = _run(pruned, ids)
        assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert seen == [[i] for i in range(len(plan.kept_layers()))]  # each layer alone, when it runs
    assert all(p.device.type == "meta" for p in pruned.parameters())  # nothing kept after the block
    # the comparison can fail: the same stream with the first decoder layer's weights zeroed gives other logits
    read = pruned_tensor_reader(model, plan)
    with streamed(pruned, lambda name: torch.zeros_like(read(name)) if ".layers.0." in name else read(name)):
        zeroed, _ = _run(pruned, ids)
    assert (zeroed - expected).abs().max() > 1e-3
    if model.config.tie_word_embeddings:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_streamed_reads_the_written_files_and_releases_weights_when_the_forward_fails(tmp_path):
    from transformers import AutoConfig

    from dms_llm.checkpoints import save_pruned
    from dms_llm.checkpoints.weights import WeightFiles

    model = build("llama-gqa")
    plan = make_plan(model, "all")
    whole = prune_model(model, plan)
    save_pruned(whole, None, str(tmp_path / "out"), plan, max_shard_size="20KB")
    ids = input_ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        expected = whole(input_ids=ids).logits
    written = skeleton(AutoConfig.from_pretrained(tmp_path / "out"), torch.float32, "eager")
    with streamed(written, WeightFiles(str(tmp_path / "out")).read):
        logits, _ = _run(written, ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        with streamed(written, WeightFiles(str(tmp_path / "out")).read):
            written(input_ids=ids + 1000)  # an id past the vocabulary fails inside the forward
    assert all(p.device.type == "meta" for p in written.parameters())


def test_a_tensor_of_the_wrong_shape_is_a_clear_error():
    model = build("llama-mha")
    plan = make_plan(model, "heads")
    read = pruned_tensor_reader(model, plan)
    pruned = skeleton(plan.pruned_config(), torch.float32, "eager")

    def wrong(name):
        t = read(name)
        return t[:-1] if name.endswith("layers.1.self_attn.q_proj.weight") else t

    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.q_proj\.weight read with shape"):
        with streamed(pruned, wrong):
            pruned(input_ids=input_ids(vocab=model.config.vocab_size))
