"""A small Python client of the REST API (used by the CLI; handy in notebooks too).

    from service.client import Client
    c = Client("http://127.0.0.1:8000")          # token: $RE_API_TOKEN, or Client(url, token="re_...")
    job = c.submit("train", {"method": "baseline", "members": 3, "epochs": 2})
    c.wait(job["id"])
    c.download(job["id"], "ensemble.pt", "ensemble.pt")
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_API = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """An error answer of the API, with its status code and a readable message."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{d.get('field', '?')}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
                         for d in detail)
    return str(detail)


class Client:
    """The API at ``base_url`` (default ``$RE_API_URL``), authenticated with ``token`` (default
    ``$RE_API_TOKEN``; none needed when the service runs with authentication off)."""

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = (base_url or os.environ.get("RE_API_URL") or DEFAULT_API).rstrip("/")
        token = token or os.environ.get("RE_API_TOKEN") or None
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r

    def _get(self, path: str, **params: Any) -> Any:
        return self._check(self.http.get(path, params={k: v for k, v in params.items() if v is not None})).json()

    # ------------------------------------------------------------------ jobs
    def submit(self, kind: str, spec: dict[str, Any], *, priority: int = 0, max_attempts: int | None = None,
               idempotency_key: str | None = None, tags: list[str] | None = None,
               note: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "spec": spec, "priority": priority}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        if tags:
            body["tags"] = list(tags)
        if note is not None:
            body["note"] = note
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{job_id}")

    def jobs(self, *, status: str | None = None, kind: str | None = None, parent_id: str | None = None,
             limit: int = 50, offset: int = 0, method: str | None = None, dataset: str | None = None,
             tags: list[str] | None = None, search: str | None = None, since: str | None = None,
             until: str | None = None) -> dict[str, Any]:
        """``GET /v1/jobs`` with its filters (``tags``: jobs with every one; ``since`` / ``until``: ISO dates)."""
        return self._get("/v1/jobs", status=status, kind=kind, parent_id=parent_id, limit=limit, offset=offset,
                         method=method, dataset=dataset, tag=",".join(tags) if tags else None, q=search,
                         since=since, until=until)

    def update_job(self, job_id: str, *, tags: list[str] | None = None, add_tags: list[str] | None = None,
                   remove_tags: list[str] | None = None, note: str | None = None,
                   clear_note: bool = False) -> dict[str, Any]:
        """``PATCH /v1/jobs/{id}``: tags and note (``clear_note`` removes the note)."""
        body: dict[str, Any] = {}
        if tags is not None:
            body["tags"] = tags
        if add_tags:
            body["add_tags"] = add_tags
        if remove_tags:
            body["remove_tags"] = remove_tags
        if note is not None or clear_note:
            body["note"] = None if clear_note else note
        return self._check(self.http.patch(f"/v1/jobs/{job_id}", json=body)).json()

    def delete_job(self, job_id: str, *, cascade: bool = False) -> dict[str, Any]:
        """``DELETE /v1/jobs/{id}``: the job with its artifacts and checkpoints (409 while it runs)."""
        return self._check(self.http.delete(f"/v1/jobs/{job_id}", params={"cascade": str(cascade).lower()})).json()

    def usage(self, owner: str | None = None) -> dict[str, Any]:
        """``GET /v1/usage``: disk use and job counts (an admin may name another ``owner``)."""
        return self._get("/v1/usage", owner=owner)

    def retention(self) -> dict[str, Any]:
        return self._get("/v1/retention")

    def set_retention(self, **rules: int | None) -> dict[str, Any]:
        """``PUT /v1/retention`` with ``keep_days`` / ``keep_last`` (None removes a rule)."""
        return self._check(self.http.put("/v1/retention", json=rules)).json()

    def apply_retention(self, *, dry_run: bool = True) -> dict[str, Any]:
        return self._check(self.http.post("/v1/retention/apply",
                                          params={"dry_run": str(dry_run).lower()})).json()

    def quotas(self, owner: str | None = None) -> dict[str, Any]:
        return self._get("/v1/quotas", owner=owner)

    def set_quota(self, owner: str, **limits: float | None) -> dict[str, Any]:
        """``PUT /v1/quotas/{owner}`` (admin tokens; ``*``: the defaults)."""
        return self._check(self.http.put(f"/v1/quotas/{owner}", json=limits)).json()

    # ------------------------------------------------------------------ webhooks (docs/webhooks.md)
    def create_webhook(self, url: str, events: list[str], *, thresholds: list[dict[str, Any]] | None = None,
                       description: str | None = None) -> dict[str, Any]:
        """``POST /v1/webhooks``: the answer holds the signing ``secret``, shown this once."""
        body: dict[str, Any] = {"url": url, "events": events, "thresholds": thresholds or []}
        if description is not None:
            body["description"] = description
        return self._check(self.http.post("/v1/webhooks", json=body)).json()

    def webhooks(self) -> dict[str, Any]:
        return self._get("/v1/webhooks")

    def webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._get(f"/v1/webhooks/{webhook_id}")

    def update_webhook(self, webhook_id: str, **changes: Any) -> dict[str, Any]:
        return self._check(self.http.patch(f"/v1/webhooks/{webhook_id}", json=changes)).json()

    def delete_webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/webhooks/{webhook_id}")).json()

    def webhook_deliveries(self, webhook_id: str, *, status: str | None = None, limit: int = 50) -> dict[str, Any]:
        return self._get(f"/v1/webhooks/{webhook_id}/deliveries", status=status, limit=limit)

    def ping_webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/webhooks/{webhook_id}/ping")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self._get(f"/v1/jobs/{job_id}/events")

    def trials(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{job_id}/trials")

    def metrics(self, job_id: str, name: str | None = None) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{job_id}/metrics", name=name)

    def logs(self, job_id: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{job_id}/logs", after=after, limit=limit)

    def follow_logs(self, job_id: str, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-sent events of ``GET /logs?follow=true``: yields ``("log", line)`` ... then ``("end", status)``.

        An ``error`` event (the token was revoked while the stream was open, or the database became
        unavailable) raises :class:`ApiError` (401 / 503)."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true", "after": after},
                              timeout=httpx.Timeout(30.0, read=None)) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            event, data = "message", []
            for line in r.iter_lines():
                if line == "":
                    if data:
                        payload = json.loads("\n".join(data))
                        if event == "error":  # the server ended the stream: token revoked, database down
                            detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
                            raise ApiError(401 if "token" in str(detail) else 503, detail)
                        yield event, payload
                        if event == "end":
                            return
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    def results(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{job_id}/results")

    def artifacts(self, job_id: str) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{job_id}/artifacts")

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / Path(name).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        tmp.replace(dest)
        return dest

    def train_best(self, job_id: str, overrides: dict[str, Any] | None = None, *, priority: int = 0,
                   max_attempts: int | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/train-best``: queue a train job from a succeeded tune job's best configuration."""
        body: dict[str, Any] = {"overrides": overrides or {}, "priority": priority}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post(f"/v1/jobs/{job_id}/train-best", json=body, headers=headers)).json()

    # ------------------------------------------------------------------ models (docs/models.md)
    def upload_model(self, weights: list[str | Path], *, name: str, architecture: str, dataset: str,
                     version: str = "1", tags: list[str] | None = None, combine: str = "mean_logits",
                     input_range: tuple[float, float] = (0.0, 1.0), mean: list[float] | None = None,
                     std: list[float] | None = None, architecture_kwargs: dict[str, Any] | None = None,
                     training: str | dict[str, Any] | None = None, paper: dict[str, Any] | None = None,
                     timeout: float = 600.0) -> dict[str, Any]:
        """``POST /v1/models``: upload member weights (safetensors files, one per member or one for all)."""
        data: dict[str, str] = {"name": name, "architecture": architecture, "dataset": dataset, "version": version,
                                "combine": combine, "tags": ",".join(tags or []),
                                "input_range": ",".join(str(v) for v in input_range)}
        for key, value in (("mean", mean), ("std", std)):
            if value is not None:
                data[key] = ",".join(str(v) for v in value)
        if architecture_kwargs is not None:
            data["architecture_kwargs"] = json.dumps(architecture_kwargs)
        if training is not None:
            data["training"] = training if isinstance(training, str) else json.dumps(training)
        if paper is not None:
            data["paper"] = json.dumps(paper)
        handles = [open(p, "rb") for p in weights]  # noqa: SIM115 (closed below)
        try:
            files = [("weights", (Path(p).name, h, "application/octet-stream")) for p, h in zip(weights, handles,
                                                                                                strict=True)]
            return self._check(self.http.post("/v1/models", data=data, files=files, timeout=timeout)).json()
        finally:
            for h in handles:
                h.close()

    def register_model(self, job_id: str, *, name: str, version: str = "1", tags: list[str] | None = None,
                       paper: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/register``: a succeeded train job's ensemble as a model."""
        body: dict[str, Any] = {"name": name, "version": version, "tags": tags or []}
        if paper is not None:
            body["paper"] = paper
        return self._check(self.http.post(f"/v1/jobs/{job_id}/register", json=body, timeout=600.0)).json()

    def models(self, *, name: str | None = None, tag: str | None = None, limit: int = 50,
               offset: int = 0) -> dict[str, Any]:
        return self._get("/v1/models", name=name, tag=tag, limit=limit, offset=offset)

    def model(self, model_id: str) -> dict[str, Any]:
        return self._get(f"/v1/models/{model_id}")

    def model_evaluations(self, model_id: str) -> dict[str, Any]:
        return self._get(f"/v1/models/{model_id}/evaluations")

    def delete_model(self, model_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/models/{model_id}")).json()

    def export_robustbench(self, model_id: str, *, job_id: str | None = None, eps: float | None = None,
                           threat_model: str = "Linf") -> dict[str, Any]:
        """``GET /v1/models/{id}/export/robustbench``: a RobustBench ``model_info`` record."""
        return self._get(f"/v1/models/{model_id}/export/robustbench", job_id=job_id, eps=eps,
                         threat_model=threat_model)

    def export_huggingface(self, model_id: str, dest: str | Path) -> Path:
        """Download the model's Hugging Face-layout folder (config.json, model.safetensors, README.md) to ``dest``."""
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for f in self._get(f"/v1/models/{model_id}/export/huggingface")["files"]:
            name = f["name"]
            if "/" in name or name.startswith("."):  # the server names three fixed files; never write elsewhere
                raise ApiError(500, f"unexpected export file name {name!r}")
            tmp = out / f".{name}.part"
            with self.http.stream("GET", f"/v1/models/{model_id}/export/huggingface/{name}") as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                with open(tmp, "wb") as fh:
                    for chunk in r.iter_bytes():
                        fh.write(chunk)
            tmp.replace(out / name)
        return out

    def leaderboard(self, dataset: str | None = None) -> dict[str, Any]:
        """``GET /v1/leaderboard``: every method under one budget and attack protocol (optionally one data set)."""
        return self._get("/v1/leaderboard", dataset=dataset)

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the process is up (raises :class:`ApiError` otherwise)."""
        return self._get("/healthz")

    def dashboard_url(self, job_id: str | None = None) -> str:
        """The web dashboard's address (the job list, or one job's page)."""
        return f"{self.base_url}/ui/" + (f"#/jobs/{job_id}" if job_id else "")

    def methods(self) -> list[dict[str, Any]]:
        return self._get("/v1/methods")["items"]

    def method(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/methods/{name}")

    def specs(self) -> dict[str, Any]:
        """``GET /v1/specs``: the JSON schemas of a submission, ``job`` (the body's fields) and ``kinds`` (each
        kind's spec, registered names as enums); the dashboard's *New job* form is generated from them."""
        return self._get("/v1/specs")

    def attacks(self) -> dict[str, Any]:
        """``GET /v1/attacks``: every evaluation attack with its losses and parameters (bounds, defaults)."""
        return self._get("/v1/attacks")

    def attack(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/attacks/{name}")

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is finished; returns its final record."""
        start = time.monotonic()
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll)
