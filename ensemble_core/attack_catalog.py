"""Every evaluation attack with its parameters and bounds, for ``GET /v1/attacks`` and ``robust-ensembles attacks``.

Built from :class:`ensemble_core.spec.AttackSpec` (pydantic only, no torch), so the API serves it without loading
torch and the bounds shown are exactly the ones a request is validated against (HTTP 422 naming the field).
"""

from __future__ import annotations

from typing import Any

from ensemble_core.spec import ATTACK_LOSSES, AttackSpec

COMMON = ("eps", "label")
# The AttackSpec fields each attack reads (docs/evaluation.md, "Attacks").
ATTACK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "fgsm": ("loss", "losses", "kappa", "vote_temperature"),
    "bim": ("steps", "alpha", "alpha_ratio", "loss", "losses", "kappa", "vote_temperature"),
    "mim": ("steps", "alpha", "alpha_ratio", "momentum", "loss", "losses", "kappa", "vote_temperature"),
    "pgd": ("steps", "alpha", "alpha_ratio", "restarts", "random_start", "loss", "losses", "kappa",
            "vote_temperature"),
    "pgdl2": ("steps", "alpha", "alpha_ratio", "restarts", "random_start", "loss", "losses", "kappa",
              "vote_temperature"),
    "cw": ("steps", "c", "lr", "kappa"),
    "square": ("n_queries", "restarts", "norm", "loss", "losses"),
    "mora": ("steps", "restarts", "norm", "loss", "losses", "kappa", "mora_mode", "random_start"),
    "autoattack": ("norm", "version"),
    "autoattack_port": ("norm", "version"),
}

DESCRIPTIONS: dict[str, dict[str, str]] = {
    "fgsm": {"threat": "white-box", "norm": "Linf", "summary": "one signed gradient step of size eps"},
    "bim": {"threat": "white-box", "norm": "Linf", "summary": "iterative FGSM, no random start; every iterate "
                                                             "scored on the deployed rule"},
    "mim": {"threat": "white-box", "norm": "Linf", "summary": "momentum iterative FGSM (MI-FGSM); every iterate "
                                                             "scored"},
    "pgd": {"threat": "white-box", "norm": "Linf", "summary": "projected gradient descent from a uniform random "
                                                             "start, restarts; every iterate scored"},
    "pgdl2": {"threat": "white-box", "norm": "L2", "summary": "PGD in the L2 ball; every iterate scored"},
    "cw": {"threat": "white-box", "norm": "L2", "summary": "Carlini-Wagner L2 minimal perturbation (masked margin); "
                                                          "broken at eps when the distance found is <= eps"},
    "square": {"threat": "gradient-free", "norm": "Linf or L2", "summary": "Square Attack (random search, score "
                                                                          "based); checks gradient masking"},
    "mora": {"threat": "white-box", "norm": "Linf or L2", "summary": "ensemble-aware attack written from the MORA "
             "paper: per-member loss gradients, each normalised (no member's gradient dominates), averaged over the "
             "members still correct (softmax/vote ensembles) or all (logits); APGD-shaped steps"},
    "autoattack": {"threat": "white-box + gradient-free", "norm": "Linf or L2", "summary": "the reference "
                   "AutoAttack (PyPI pyautoattack, by its authors) at its own iterations and restarts: APGD-CE, "
                   "APGD-T, FAB-T, Square (standard)"},
    "autoattack_port": {"threat": "white-box + gradient-free", "norm": "Linf or L2", "summary": "torchattacks' "
                        "AutoAttack port (its own iteration counts); for comparison with the reference only"},
}

LOSSES: dict[str, str] = {
    "ce": "cross-entropy on the deployed rule's differentiable view",
    "cw": "CW margin min(max_{j!=y} o_j - o_y, kappa), true class masked with -inf",
    "dlr": "Croce & Hein's DLR margin (shift- and scale-invariant)",
    "vote": "vote-aware hinge: the r voters nearest to flipping pushed across their own boundaries (r = the votes "
            "that must change; top-n margins for DKD's boosted vote); only on vote rules",
    "softvote": "low-temperature soft vote of the voters (vote_temperature); only on vote rules",
}


def _field_info(schema: dict[str, Any], name: str) -> dict[str, Any]:
    prop = dict(schema["properties"][name])
    field = AttackSpec.model_fields[name]
    out: dict[str, Any] = {"default": field.get_default(call_default_factory=True)}
    for key in ("description", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "minItems",
                "maxItems"):
        if key in prop:
            out[key] = prop[key]
    if "anyOf" in prop:  # optional fields: bounds live on the non-null branch
        for branch in prop["anyOf"]:
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum"):
                if key in branch:
                    out[key] = branch[key]
    if name in ("loss", "losses"):
        out["enum"] = list(LOSSES)
    if name == "eps":
        out.update(minimum=0, maximum=64, maxItems=32, description="radii, in [0, 1] pixel units (L2: of the image)")
    return out


def attack_names() -> list[str]:
    return list(ATTACK_PARAMETERS)


def attack_catalog() -> dict[str, Any]:
    """``{"attacks": [...], "losses": {...}}``: each attack's threat model, what it does, its losses and its
    parameters with defaults and bounds."""
    schema = AttackSpec.model_json_schema()
    items = []
    for name, params in ATTACK_PARAMETERS.items():
        parameters = {p: _field_info(schema, p) for p in (*COMMON, *params)}
        for p in ("loss", "losses"):
            if p in parameters:
                parameters[p]["enum"] = list(ATTACK_LOSSES[name])
        items.append({"name": name, **DESCRIPTIONS[name], "losses": list(ATTACK_LOSSES[name]),
                      "parameters": parameters})
    return {"attacks": items, "losses": LOSSES,
            "documentation": "docs/evaluation.md (Attacks; The reviewer's set; Automatic flags)"}
