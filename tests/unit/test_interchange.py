"""RobustBench records and model cards from a real (small) evaluation result.

The evaluation is the library's own (``run_evaluation``) on a tiny ensemble of a registered folder over the
synthetic data set; the records it writes are what the exporter maps onto RobustBench's schema.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ensemble_core import interchange as ix
from ensemble_core import registry_io as rio
from ensemble_core.evaluation import run_evaluation

# robustbench.utils.ModelInfo's dataclass fields (RobustBench's repository, utils.py), then the two keys its
# model_info JSON files add: written out here from their source, not from our module
THEIR_FIELDS = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote", "external", "unreliable"]
PCT = re.compile(r"^\d{1,3}\.\d{2}$")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    torch.manual_seed(0)
    arch = rio.member_arch("lenet5_classic", "synthetic")
    members = [rio.canonical_tensors(rio.build_arch_member(arch)) for _ in range(3)]
    folder = tmp_path_factory.mktemp("m") / "model"
    config = rio.make_config(arch, "synthetic", "mean_logits", 3, training={"method": "baseline", "epochs": 1},
                             name="tiny", version="2", tags=["unit"],
                             paper={"title": "A Tiny Ensemble", "authors": "A. Author", "reported": 0.5})
    rio.write_folder(folder, config, members)
    spec = {"target_checkpoint": str(folder), "n_examples": 24, "batch_size": 24,
            "attacks": [{"name": "fgsm", "eps": [0.05, 0.1]}, {"name": "pgd", "eps": [0.05, 0.1], "steps": 3}],
            "checks": {"n_examples": 8, "large_eps_steps": 3, "convergence": False}, "member_transfer": None}
    result = run_evaluation(spec, str(folder), log=lambda s: None, plots=False)
    return json.loads(json.dumps(result)), config


def test_the_record_has_every_field_of_robustbench_in_their_conventions(evaluated: tuple[dict, dict]) -> None:
    result, config = evaluated
    rec = ix.robustbench_record(result, config, threat_model="Linf", job_id="job-1")
    assert list(rec) == THEIR_FIELDS
    assert rec["number_forward_passes"] == 3 and rec["dataset"] == "synthetic"
    assert rec["name"] == "A Tiny Ensemble" and rec["authors"] == "A. Author" and rec["reported"] == "50.00"
    assert rec["additional_data"] is False and rec["architecture"] == "lenet5_classic"
    assert rec["eps"] == "0.1"  # no AutoAttack: the largest white-box eps
    clean = result["clean"]["target"]["clean_acc"]
    assert rec["clean_acc"] == f"{100 * clean:.2f}" and PCT.match(rec["clean_acc"])
    worst = next(r for r in result["records"] if r["model"] == "target" and r["attack"] == "worst case (Linf, all "
                 "attacks)" and r["eps"] == 0.1)
    assert rec["external"] == f"{100 * worst['robust_acc']:.2f}"
    assert rec["autoattack_acc"] is None and "was not run" in rec["footnote"]
    assert rec["corruptions_acc"] is None and "job-1" in rec["footnote"] and "24 synthetic test images" in rec[
        "footnote"]
    assert rec["unreliable"] == any(r["unreliable"] for r in result["records"] if r["model"] == "target"
                                    and r["eps"] == 0.1 and r["norm"] == "Linf")
    at_005 = ix.robustbench_record(result, config, eps=0.05)
    assert at_005["eps"] == "0.05" and float(at_005["external"]) >= float(rec["external"])


def test_autoattack_acc_comes_from_the_reference_autoattack_record(evaluated: tuple[dict, dict]) -> None:
    result, config = copy.deepcopy(evaluated[0]), evaluated[1]
    pgd = next(r for r in result["records"] if r["model"] == "target" and r["attack_params"]["name"] == "pgd"
               and r["eps"] == 0.05)
    aa = {**copy.deepcopy(pgd), "attack": "autoattack-standard", "robust_acc": 0.125, "unreliable": True}
    aa["attack_params"]["name"] = "autoattack"
    port = {**copy.deepcopy(pgd), "attack": "autoattack_port", "robust_acc": 0.0}
    port["attack_params"]["name"] = "autoattack_port"  # torchattacks' port: never RobustBench's figure
    result["records"] += [aa, port]
    rec = ix.robustbench_record(result, config)
    assert rec["eps"] == "0.05"  # the AutoAttack's eps by default
    assert rec["autoattack_acc"] == "12.50" and rec["unreliable"] is True
    assert "reference AutoAttack (pyautoattack)" in rec["footnote"]


def test_eps_strings_and_refusals() -> None:
    assert ix.eps_string(8 / 255, "cifar10", "Linf") == "8/255"
    assert ix.eps_string(0.5, "cifar10", "L2") == "0.5"
    assert ix.eps_string(0.2, "mnist", "Linf") == "0.2"  # 51/255, but MNIST's convention is the number
    assert ix.percent(0.86039) == "86.04" and ix.percent(None) is None and ix.percent(1.0) == "100.00"
    with pytest.raises(ValueError, match="threat_model"):
        ix.robustbench_record({"records": []}, {}, threat_model="L1")
    with pytest.raises(ValueError, match="no L2 white-box record"):
        ix.robustbench_record({"records": []}, {}, threat_model="L2")


def test_an_eps_the_evaluation_did_not_run_is_refused(evaluated: tuple[dict, dict]) -> None:
    with pytest.raises(ValueError, match=r"eps: .* at eps 0.3; it has 0.05, 0.1"):
        ix.robustbench_record(evaluated[0], evaluated[1], eps=0.3)


def test_the_model_card_holds_metadata_the_evaluation_table_and_the_training_spec(
        evaluated: tuple[dict, dict], tmp_path: Path) -> None:
    result, config = evaluated
    card = ix.model_card(config, [("job-1", result)])
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\nlibrary_name: robust-ensembles") and '"unit"' in front
    assert "model-index:" in front and "type: robust_accuracy" in front
    clean = round(100 * result["clean"]["target"]["clean_acc"], 2)
    assert f"name: clean accuracy, value: {clean}" in front
    rows = [line for line in body.splitlines() if line.startswith("| white-box | fgsm")]
    assert len(rows) == 2  # fgsm at both eps
    assert '"method": "baseline"' in body and "```json" in body and "load_folder" in body
    assert "## Paper" in body and "A Tiny Ensemble" in body
    empty = ix.model_card({**config, "training": "SGD, lr 0.1, 10 epochs"})
    assert "Not evaluated yet." in empty and "the uploader's description" in empty and "results: []" in empty
