"""``GET /v1/leaderboard``: every method on MNIST and Fashion-MNIST under one budget and one attack protocol.

The document is produced by ``robust-ensembles leaderboard`` (``ensemble_core.leaderboard``), which runs every
registered method through the PROTOCOL.md reproduction and writes ``docs/results/leaderboard.json`` (the file this
route serves; ``RE_LEADERBOARD_PATH`` points it elsewhere, e.g. at a leaderboard a GPU cluster produced). The API
reads it as JSON only: no torch, no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service import schemas

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "results" / "leaderboard.json"  # a source checkout
PACKAGED_PATH = Path(__file__).resolve().parent / "published" / "leaderboard.json"  # an installed wheel's copy
FORMAT = "robust-ensembles/leaderboard-v2"

router = APIRouter()


class LeaderboardCell(BaseModel):
    model_config = ConfigDict(extra="allow")
    attack: str
    eps: float
    robust_acc: float | None = None
    unreliable: bool = False


class LeaderboardRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    method: str
    status: Literal["done", "failed", "not run", "stale"] = Field(
        description="a method that failed, has not run, or was evaluated by an earlier evaluation (stale) is listed, "
                    "never dropped")
    rank: int | None = Field(None, description="by any_attack_wb_mean (done rows only)")
    clean_acc: float | None = None
    any_attack: list[LeaderboardCell] = Field(
        [], description="per eps, the per-image worst case over every white-box and transfer attack")
    any_attack_mean: float | None = Field(None, description="mean of any_attack over all its eps")
    any_attack_wb_mean: float | None = Field(None, description="mean of any_attack over the eps where the white-box "
                                             "attacks ran (the ranking key)")
    transfer_mean: float | None = Field(None, description="mean robust accuracy over the transfer cells")
    transfer_mean_vs_baseline: float | None = None
    transfer: list[LeaderboardCell] = []
    white_box: list[LeaderboardCell] = []
    hyperparameters: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    command: str | None = Field(None, description="the command that reproduces the row")
    error: str | None = None


class LeaderboardBoard(BaseModel):
    dataset: str
    rows: list[LeaderboardRow]


class Leaderboard(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: str
    generated_at: str
    budget: dict[str, Any] = Field(description="the one training budget every method and the baseline had")
    protocol: dict[str, str] = Field(description="the attacks, images and ranking rule")
    machine: dict[str, Any]
    datasets: dict[str, LeaderboardBoard]
    headline: list[dict[str, Any]] = Field(
        [], description="the campaigns at the papers' budgets (docs/results/<campaign>/): per campaign the units "
                        "recorded and per row the training seeds, clean accuracy and the transfer and white-box "
                        "worst cases per eps as mean, sd and n over seeds; the quick-mode boards are `datasets`")
    headline_generated_at: str | None = None


def leaderboard_path(request: Request) -> Path:
    """The configured document (``Settings.leaderboard_path``), else the one in the project's docs, else the copy
    of it an installed wheel carries (``service/published``, see pyproject.toml)."""
    configured = getattr(request.app.state.settings, "leaderboard_path", None)
    if configured:
        return Path(configured)
    return PACKAGED_PATH if not DEFAULT_PATH.exists() and PACKAGED_PATH.exists() else DEFAULT_PATH


@router.get("/v1/leaderboard", response_model=Leaderboard, tags=["results"],
            responses={404: {"model": schemas.ErrorResponse}, 422: {"model": schemas.ValidationErrorResponse}})
def get_leaderboard(
    request: Request,
    dataset: Literal["mnist", "fashion_mnist"] | None = Query(None, description="only this data set's table"),
) -> dict[str, Any]:
    """The leaderboard: the campaigns at the papers' budgets (``headline``), then every method in quick mode
    (3 × LeNet-5, one budget, one attack protocol: black-box transfer and the white-box suite), ranked by the
    mean 'any attack' robust accuracy over the white-box eps. Each row states its hyperparameters, flags and the
    command that reproduces it; the document states the budget, the attacks and the machine."""
    path = leaderboard_path(request)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise HTTPException(404, "no leaderboard has been generated on this server: run `robust-ensembles "
                                 "leaderboard` (or set RE_LEADERBOARD_PATH)") from None
    except (OSError, ValueError) as e:
        raise HTTPException(404, f"the leaderboard document at {path.name} cannot be read: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HTTPException(404, f"the leaderboard document at {path.name} is not in the {FORMAT} format")
    if dataset is not None:
        doc["datasets"] = {k: v for k, v in doc.get("datasets", {}).items() if k == dataset}
    return doc
