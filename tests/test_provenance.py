"""`PlanRecord`, the typed record of how a plan was made: its JSON is the flat "metadata" object plans have
always had (every plan saved before it loads, and writes back the same), and the commands read it (the
command that made a checkpoint comes from its plan, not from its README)."""

import glob
import json
import os

import pytest
from conftest import tiny_model

from dms_llm.plan import PrunePlan
from dms_llm.provenance import PlanRecord

# The "metadata" of a DMS search's dms_plan.json as written before the record (abridged from a run at 36db933),
# with a key this version does not know.
OLD_SEARCH = {
    "search": {"model": "smollm2-135m", "target_ratio": 0.8, "steps": 240},
    "method": {"target_ratio": 0.8, "steps": 240, "structures": ["heads", "channels", "hidden"]},
    "target_params": 107612006,
    "budget_fit": {"params_before": 107640000, "scale": 0.998},
    "search_time_s": 1834.2,
    "num_processes": 1,
    "plan_sha256_per_rank": ["ab12"],
    "masked_vs_pruned_max_abs_logit_diff": 3.1e-05,
    "heldout_loss": 3.21,
    "from_the_future": {"x": 1},
}
# A baseline's, with its own facts (they have no field: they stay in `extra`).
OLD_BASELINE = {"method": "flap", "criterion": "WIFV", "allocation": "global", "keep_fraction_heads": 0.5,
                "pruned_layers": [0, 1], "align": 32, "target_params": 1000, "params": 990, "budget_gap": 0.01}


@pytest.mark.parametrize("old", [OLD_SEARCH, OLD_BASELINE, {}], ids=["search", "baseline", "empty"])
def test_an_old_metadata_dict_reads_typed_and_writes_back_the_same(old):
    record = PlanRecord.from_dict(json.loads(json.dumps(old)))
    assert record.to_dict() == old and record == old
    assert record.method == old.get("method") and record.target_params == old.get("target_params")
    assert record.command is None  # plans made before the record do not say which command made them


def test_fields_are_typed_and_the_rest_is_kept_in_extra():
    record = PlanRecord.from_dict(OLD_SEARCH)
    assert record.heldout_loss == 3.21 and record.budget_fit["params_before"] == 107640000
    assert record.extra == {"from_the_future": {"x": 1}}
    baseline = PlanRecord.from_dict(OLD_BASELINE)
    assert baseline.method == "flap" and baseline.criterion == "WIFV"
    assert set(baseline.extra) == {"keep_fraction_heads", "pruned_layers", "align", "params", "budget_gap"}


def test_the_dict_view_reads_and_writes_the_fields():
    record = PlanRecord()
    assert "heldout_loss" not in record and record.get("heldout_loss") is None and len(record) == 0
    with pytest.raises(KeyError):
        record["heldout_loss"]
    record["heldout_loss"] = 2.5  # a field, through the old spelling
    record.update(time_s=1.0, made_by="a script")
    assert record.heldout_loss == 2.5 and record.time_s == 1.0 and record.extra == {"made_by": "a script"}
    assert dict(record) == {"heldout_loss": 2.5, "time_s": 1.0, "made_by": "a script"}
    del record["heldout_loss"]
    assert record.heldout_loss is None and "heldout_loss" not in record
    assert record != {"time_s": 2.0, "made_by": "a script"}


def test_then_records_the_commands_in_order():
    record = PlanRecord()
    record.then("dms-llm prune --plan p.json")
    assert record.command == "dms-llm prune --plan p.json"
    record = PlanRecord(command="dms-llm search --target-ratio 0.8")
    record.then("dms-llm finetune --model runs/a")
    assert record.command == "dms-llm search --target-ratio 0.8\n# then\ndms-llm finetune --model runs/a"


def test_a_plan_holds_a_record_however_its_metadata_is_given(tmp_path):
    plan = PrunePlan.dense(tiny_model("llama-gqa").config, source_model="tiny")
    assert isinstance(plan.metadata, PlanRecord) and plan.to_dict()["metadata"] == {}
    plan.metadata = dict(OLD_SEARCH)  # older code assigns a dict
    assert isinstance(plan.metadata, PlanRecord) and plan.metadata.search_time_s == 1834.2
    plan.metadata.command = "dms-llm search --config r.yaml"
    path = str(tmp_path / "dms_plan.json")
    plan.to_json(path)
    saved = json.load(open(path))["metadata"]
    assert saved == {**OLD_SEARCH, "command": "dms-llm search --config r.yaml"}  # flat, as before
    again = PrunePlan.from_json(path)
    assert again == plan and again.metadata.command == "dms-llm search --config r.yaml"


def test_every_saved_plan_on_this_machine_loads_and_round_trips():
    """Plans written by earlier versions (search runs, fine-tuned checkpoints, refits), where they exist."""
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "runs", "**", "dms_plan.json"),
                             recursive=True))
    if not paths:
        pytest.skip("no saved runs beside this checkout")
    for path in paths:
        with open(path) as f:
            old = json.load(f)["metadata"]
        plan = PrunePlan.from_json(path)
        assert plan.metadata.to_dict() == old, path
        assert plan.metadata.method is None or isinstance(plan.metadata.method, (dict, str)), path
