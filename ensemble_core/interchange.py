"""Results in the field's formats: RobustBench ``model_info`` records and Hugging Face model cards.

Torch-free (the API builds both on request). Inputs are an evaluation's results (``results.json`` of an
evaluate job, :func:`ensemble_core.evaluation.records.summarize`) and a registered model's ``config.json``
(:mod:`ensemble_core.registry_io`).

RobustBench's record is one JSON file per model, dataset and threat model
(``model_info/<dataset>/<threat_model>/<Name>.json``) with the fields of ``robustbench.utils.ModelInfo`` plus
``external`` and ``unreliable`` that its files carry (:data:`ROBUSTBENCH_FIELDS`). Its conventions, kept here:
accuracies are percentages as strings with two decimals (``"86.04"``), ``eps`` is a string (``"8/255"`` on
CIFAR under L∞, else the number), ``number_forward_passes`` is the number of forward passes a prediction
costs (the members), ``additional_data`` a boolean, and a field that does not apply is ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

# robustbench.utils.ModelInfo's fields, in its order, then the two its JSON files add (Xiao2020Enhancing.json)
MODEL_INFO_FIELDS: tuple[str, ...] = (
    "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
    "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d", "corruptions_mce",
    "corruptions_mce_3d", "autoattack_acc", "footnote")
ROBUSTBENCH_FIELDS: tuple[str, ...] = (*MODEL_INFO_FIELDS, "external", "unreliable")
THREAT_MODELS = ("Linf", "L2")
REFERENCE_AUTOATTACK = "autoattack"  # the attack name of the reference AutoAttack (pyautoattack)


def percent(value: float | None) -> str | None:
    """RobustBench's figure: a fraction in [0, 1] as a percentage string, two decimals (``0.8604`` -> ``"86.04"``)."""
    if value is None or not math.isfinite(value):
        return None
    return f"{100 * value:.2f}"


def eps_string(eps: float, dataset: str, threat_model: str) -> str:
    """``eps`` as RobustBench writes it: ``"8/255"`` for a whole number of 255ths on CIFAR under L∞, else the
    number (``"0.3"``, ``"0.5"``)."""
    k = eps * 255
    if threat_model == "Linf" and dataset.startswith("cifar") and k >= 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return format(eps, "g")


def _same(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(a), abs(b))


def target_records(result: Mapping[str, Any], threat_model: str) -> list[dict[str, Any]]:
    """The evaluation's records of its target under ``threat_model``."""
    return [r for r in result.get("records", []) if r.get("model") == "target" and r.get("norm") == threat_model]


def autoattack_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records of the reference AutoAttack (attack name ``autoattack``; not torchattacks' port)."""
    return [r for r in records if (r.get("attack_params") or {}).get("name") == REFERENCE_AUTOATTACK]


def default_eps(result: Mapping[str, Any], threat_model: str) -> float:
    """The eps a record is exported at when none is asked for: the reference AutoAttack's (its first), else the
    largest eps of a white-box record. :class:`ValueError` when the evaluation has none under the threat model."""
    recs = target_records(result, threat_model)
    aa = autoattack_records(recs)
    if aa:
        return float(aa[0]["eps"])
    wb = [float(r["eps"]) for r in recs if r.get("threat") in ("white-box", "gradient-free", "worst-case")]
    if not wb:
        raise ValueError(f"threat_model: the evaluation has no {threat_model} white-box record of its target")
    return max(wb)


def robustbench_record(result: Mapping[str, Any], config: Mapping[str, Any], *, eps: float | None = None,
                       threat_model: str = "Linf", job_id: str | None = None) -> dict[str, Any]:
    """A RobustBench ``model_info`` record (every field of :data:`ROBUSTBENCH_FIELDS`, in that order) of the
    evaluation ``result`` of the model ``config``.

    - ``clean_acc``: the target's clean accuracy on the white-box images;
    - ``autoattack_acc``: the reference AutoAttack's robust accuracy at ``eps`` when the evaluation ran it (the
      lowest over its records there), else ``null``;
    - ``external``: the per-image worst case over the evaluation's whole suite at ``eps`` (the ``any attack``
      record with transfer, else the white-box worst case), which includes AutoAttack when it ran;
    - ``unreliable``: a record of the target at this eps and threat model was flagged by the evaluation's checks;
    - ``number_forward_passes``: the members; ``architecture``: the member architecture;
    - ``name``, ``link``, ``authors``, ``venue``, ``reported``, ``additional_data``: from ``config["paper"]``
      (the model's name when there is no paper title; ``additional_data`` false unless said);
    - ``footnote``: what was evaluated, on how many images, with which attacks (RobustBench's own records use
      the full test set; ours say their size).
    """
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model: expected one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    recs = target_records(result, threat_model)
    if eps is None:
        eps = default_eps(result, threat_model)
    at_eps = [r for r in recs if _same(float(r["eps"]), eps)]
    if not at_eps:
        have = sorted({float(r["eps"]) for r in recs})
        raise ValueError(f"eps: the evaluation has no {threat_model} record of its target at eps {eps}; it has "
                         f"{', '.join(format(e, 'g') for e in have) or 'none'}")
    dataset = str(result.get("dataset") or config.get("dataset"))
    clean = (result.get("clean") or {}).get("target", {}).get("clean_acc")
    aa = [r["robust_acc"] for r in autoattack_records(at_eps) if r.get("robust_acc") is not None]
    external_rec = next((r for r in at_eps if r.get("attack") == f"any attack ({threat_model})"), None) or next(
        (r for r in at_eps if r.get("attack") == f"worst case ({threat_model}, all attacks)"), None)
    external = external_rec.get("robust_acc") if external_rec else None
    unreliable = any(bool(r.get("unreliable")) for r in at_eps)
    paper = dict(config.get("paper") or {})
    members = int(config.get("members") or len((result.get("models") or {}).get("target", {}).get("members", [])))
    attacks = sorted({str(r.get("attack")) for r in at_eps if r.get("threat") in ("white-box", "gradient-free",
                                                                                   "transfer")})
    n_wb = (result.get("n_examples") or {}).get("white_box")
    ident = f"{config.get('name')}" + (f" v{config.get('version')}" if config.get("version") else "")
    footnote = (f"Ensemble of {members} {config.get('architecture')} members combined by {config.get('combine')} "
                f"({ident}). Evaluated by robust-ensembles" + (f" (evaluate job {job_id})" if job_id else "") +
                f" on {n_wb} {dataset} test images ({result.get('split')} split, seed {result.get('seed')}), "
                f"{threat_model} eps {format(eps, 'g')}: 'external' is the per-image worst case over "
                f"{', '.join(attacks) or 'the evaluation'}"
                + ("; autoattack_acc is the reference AutoAttack (pyautoattack)." if aa else
                   "; the reference AutoAttack was not run (autoattack_acc null).")
                + (" Flagged unreliable by the evaluation's checks." if unreliable else ""))
    reported = paper.get("reported")
    record: dict[str, Any] = {
        "link": paper.get("link"),
        "name": paper.get("title") or config.get("name"),
        "authors": paper.get("authors"),
        "additional_data": bool(paper.get("additional_data", False)),
        "number_forward_passes": members,
        "dataset": dataset,
        "venue": paper.get("venue"),
        "architecture": paper.get("architecture") or config.get("architecture"),
        "eps": eps_string(eps, dataset, threat_model),
        "clean_acc": percent(clean),
        "reported": percent(reported) if isinstance(reported, int | float) else reported,
        "corruptions_acc": None, "corruptions_acc_3d": None, "corruptions_mce": None, "corruptions_mce_3d": None,
        "autoattack_acc": percent(min(aa)) if aa else None,
        "footnote": footnote,
        "external": percent(external),
        "unreliable": unreliable,
    }
    return {k: record[k] for k in ROBUSTBENCH_FIELDS}


# ------------------------------------------------------------------------------------------ model card
def _yaml(value: Any) -> str:
    """A YAML scalar (JSON's string and number syntax is valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def evaluation_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The target's records shown in a model card: every white-box, gradient-free, worst-case and transfer
    record (transfer over all surrogates)."""
    rows = []
    for r in result.get("records", []):
        if r.get("model") != "target":
            continue
        if r.get("threat") == "transfer" and r.get("surrogate_group", "all") != "all":
            continue
        rows.append({"threat": r.get("threat"), "attack": r.get("attack"), "norm": r.get("norm"),
                     "eps": r.get("eps"), "clean_acc": r.get("clean_acc"), "robust_acc": r.get("robust_acc"),
                     "n_examples": r.get("n_examples"), "unreliable": bool(r.get("unreliable"))})
    return rows


def model_card(config: Mapping[str, Any], evaluations: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> str:
    """The ``README.md`` of an exported ensemble: Hugging Face card metadata (``model-index`` with the clean and
    robust accuracies), how to load it, the evaluation tables and the exact training spec.

    ``evaluations``: ``(evaluate job id, results)`` pairs, newest first."""
    name = str(config.get("name") or "ensemble")
    dataset = str(config.get("dataset"))
    tags = ["robust-ensembles", "adversarial-robustness", "ensemble", "image-classification",
            *[str(t) for t in config.get("tags") or []]]
    lines = ["---", "library_name: robust-ensembles", "pipeline_tag: image-classification",
             f"tags: [{', '.join(_yaml(t) for t in dict.fromkeys(tags))}]", f"datasets: [{_yaml(dataset)}]",
             "metrics: [accuracy]", "model-index:", f"- name: {_yaml(name)}", "  results:"]
    for job_id, result in evaluations[:1]:
        lines += ["  - task: {type: image-classification, name: Image classification}",
                  f"    dataset: {{type: {_yaml(dataset)}, name: {_yaml(dataset)}, split: test}}",
                  "    metrics:"]
        clean = (result.get("clean") or {}).get("target", {}).get("clean_acc")
        if clean is not None:
            lines.append(f"    - {{type: accuracy, name: clean accuracy, value: {round(100 * clean, 2)}}}")
        for row in evaluation_rows(result):
            if row["threat"] == "worst-case" and row["robust_acc"] is not None:
                label = f"robust accuracy, {row['attack']}, eps {format(float(row['eps']), 'g')}"
                lines.append(f"    - {{type: robust_accuracy, name: {_yaml(label)}, "
                             f"value: {round(100 * row['robust_acc'], 2)}}}")
        lines.append(f"    source: {{name: robust-ensembles evaluate job, url: {_yaml('/v1/jobs/' + job_id)}}}")
    if not evaluations:
        lines[-1] = "  results: []"
    lines.append("---")
    arch = config.get("arch") or {}
    inp = config.get("input") or {}
    body = [
        "", f"# {name}" + (f" (version {config['version']})" if config.get("version") else ""), "",
        f"An ensemble of **{config.get('members')} × {config.get('architecture')}** members combined by "
        f"**{config.get('combine')}**, for **{dataset}** ({config.get('num_classes')} classes). Exported by "
        "robust-ensembles.", "",
        "| | |", "|---|---|",
        f"| architecture | `{config.get('architecture')}` (`ensemble_core.models`), arguments "
        f"`{json.dumps(arch.get('kwargs') or {})}` |",
        f"| members | {config.get('members')} |",
        f"| combine rule | `{config.get('combine')}` |",
        f"| input | {inp.get('shape')} images with pixels in [0, 1] (the members' own range "
        f"{inp.get('range')}, mean {inp.get('mean')}, std {inp.get('std')}, folded into their normalisation) |",
        f"| source | {json.dumps(config.get('source') or {})} |",
        f"| tags | {', '.join(str(t) for t in config.get('tags') or []) or '–'} |", "",
        "## Loading", "",
        "```python",
        "from ensemble_core.registry_io import load_folder",
        "ensemble = load_folder(\"path/to/this/folder\")   # an Ensemble in eval mode; reads no pickle",
        "logits = ensemble.member_logits(images)         # (members, N, classes); images in [0, 1]",
        "labels = ensemble.predict(images)               # the deployed rule; -1 where a vote abstains",
        "```", "",
        f"`model.safetensors` holds member *i*'s tensors as `members.<i>.<name>` (the names of "
        f"`ensemble_core.models.build_model({config.get('architecture')!r}, ...)`'s `state_dict`).", "",
        "## Evaluation", ""]
    if not evaluations:
        body += ["Not evaluated yet.", ""]
    for job_id, result in evaluations:
        n = result.get("n_examples") or {}
        clean = (result.get("clean") or {}).get("target", {}).get("clean_acc")
        body += [f"### Evaluate job `{job_id}`", "",
                 f"{n.get('white_box')} white-box and {n.get('transfer')} transfer {dataset} test images "
                 f"({result.get('split')} split, seed {result.get('seed')}); clean accuracy {_pct(clean)} %. "
                 "Robust accuracy counts an image as robust only if it is classified correctly clean and on every "
                 "adversarial copy; ⚠ = flagged unreliable by the evaluation's checks.", "",
                 "| threat | attack | norm | eps | clean % | robust % | images |",
                 "|---|---|---|---|---|---|---|"]
        for row in evaluation_rows(result):
            body.append(f"| {row['threat']} | {row['attack']} | {row['norm']} | {format(float(row['eps']), 'g')} | "
                        f"{_pct(row['clean_acc'])} | {_pct(row['robust_acc'])}{' ⚠' if row['unreliable'] else ''} | "
                        f"{row['n_examples']} |")
        flags = result.get("flags") or []
        if flags:
            body += ["", "Flags: " + "; ".join(f"{f.get('code')}: {f.get('message')}" for f in flags[:20])]
        body += ["", "<details><summary>Evaluate spec</summary>", "", "```json",
                 json.dumps(result.get("spec"), indent=2, sort_keys=True), "```", "", "</details>", ""]
    body += ["## Training", ""]
    training = config.get("training")
    if isinstance(training, dict) and training:
        body += ["The exact training spec (robust-ensembles `TrainSpec`, every default filled in):", "", "```json",
                 json.dumps(training, indent=2, sort_keys=True), "```", ""]
    elif training:
        body += ["Trained outside robust-ensembles; the uploader's description:", "", "```", str(training), "```",
                 ""]
    else:
        body += ["Trained outside robust-ensembles; the uploader gave no training description.", ""]
    paper = config.get("paper") or {}
    if paper:
        body += ["## Paper", "", *[f"- {k}: {v}" for k, v in paper.items()], ""]
    return "\n".join(lines + body)


__all__ = ["MODEL_INFO_FIELDS", "REFERENCE_AUTOATTACK", "ROBUSTBENCH_FIELDS", "THREAT_MODELS", "autoattack_records",
           "default_eps", "eps_string", "evaluation_rows", "model_card", "percent", "robustbench_record",
           "target_records"]
