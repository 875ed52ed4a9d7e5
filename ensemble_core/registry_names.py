"""Names of registered architectures and combine rules, resolved lazily (keeps spec.py torch-free)."""

from __future__ import annotations


def architecture_names() -> list[str]:
    from ensemble_core.models import model_names

    return model_names()


def combine_names() -> list[str]:
    from ensemble_core.ensemble import combine_names as names
    from ensemble_core.methods import method_names

    method_names()  # methods may register their own rules (e.g. DKD's boosted vote)
    return names()
