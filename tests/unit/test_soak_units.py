"""The kill soak's job stream and its way of finding a run's process (bench/soak.py), without running it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import GROUP_PID, TRAIN, WARM_PID, Soak, SoakConfig


def test_the_ddp_share_draws_apart_from_the_job_stream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = Soak(SoakConfig(seed=3), root=tmp_path / "a")
    mixed = Soak(SoakConfig(seed=3, ddp_share=0.5), root=tmp_path / "b")
    jobs_plain = [plain._next_job(n) for n in range(40)]
    jobs_mixed = [mixed._next_job(n) for n in range(40)]
    assert all(j["spec"].get("workers", TRAIN["workers"]) == 1 for j in jobs_plain if j["kind"] == "train")
    # the same kinds, seeds and targets in the same order: only the train jobs' workers differ
    assert [(j["kind"], j["spec"]["seed"]) for j in jobs_plain] == [(j["kind"], j["spec"]["seed"]) for j in jobs_mixed]
    workers = [j["spec"]["workers"] for j in jobs_mixed if j["kind"] == "train"]
    assert set(workers) == {1, 2} and 0.2 < workers.count(2) / len(workers) < 0.8
    monkeypatch.setenv("RE_SOAK_DDP_SHARE", "0.25")
    assert SoakConfig.from_env().ddp_share == 0.25


def test_the_run_processes_are_named_by_the_attempts_log() -> None:
    group = ("warm group rank 0 of 2 on host box, pid 4242: job 3 of this group, resuming from "
             "warm/epoch-00001.pt")  # the line workers/warm_ddp.py logs
    m = GROUP_PID.search(group)
    assert m is not None and m.group(1) == "4242"
    assert WARM_PID.search(group) is None
    warm = "warm trainer on host box, Ray node abc, pid 77: job 1 of this process"
    assert WARM_PID.search(warm).group(1) == "77" and GROUP_PID.search(warm) is None
