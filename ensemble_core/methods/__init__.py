"""Method registry. Each method is one module in this package; this file only discovers them.

Importing this package does not import torch: the names and hyperparameter schemas are resolved
lazily, so the API can start without torch and load it on the first validation that needs it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ensemble_core.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False
_NOT_METHODS = {"base"}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def hyperparameter_model(name: str) -> type[BaseModel]:
    return get_method(name).Hyperparameters


def method_constraints(name: str, members: int, hp: dict[str, Any]) -> str | None:
    return get_method(name).constraints(members, hp)


def describe_methods() -> list[dict[str, Any]]:
    return [get_method(n).describe() for n in method_names()]
