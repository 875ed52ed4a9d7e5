"""The warm DDP group for multi-worker train jobs (``workers/warm_ddp.py``, ``RE_WARM_DDP=1``) on a real local
Ray (two CPUs, two gloo ranks) and real MNIST.

The cold path's guarantees must hold here too (docs/reliability.md): the weights of Ray Train's own DDP run of
the same spec; the group kept and reused between jobs; a cancelled job resumed from its last epoch to the
weights of an uninterrupted run, with the group still serving; a killed rank restarted by Ray Train within the
attempt and the job resumed; the cold path resuming from the group's states; an idle group giving its cores
back.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from test_warm_train import Recorder as WarmRecorder  # the one-worker warm path's helpers
from test_warm_train import _assert_same, _weights

from workers.errors import JobCancelled

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = dict(method="baseline", dataset="mnist", members=2, epochs=2, batch_size=64,
                            train_subset=1536, val_size=0, eval_subset=200, workers=2, seed=7,
                            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
RANK0 = re.compile(r"warm group rank 0 of 2 on host .*, pid (\d+): job (\d+) of this group")
RANK_HOST = re.compile(r"warm group rank (\d) of 2 on host ([^,]+), pid \d+: job \d+ of this group")


class Recorder(WarmRecorder):
    def rank0(self) -> list[tuple[int, int]]:
        return [(int(m.group(1)), int(m.group(2))) for line in self.logs if (m := RANK0.search(line))]


def _run(tmp: Path, job_id: str, rec: Recorder, *, warm: bool, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    from workers.ray_train import run_train_job

    old = os.environ.get("RE_WARM_DDP")
    os.environ["RE_WARM_DDP"] = "1" if warm else "0"
    try:
        return run_train_job(spec or SPEC, job_id=job_id, storage_path=str(tmp / "storage"),
                             artifacts_dir=str(tmp / "artifacts" / job_id), on_epoch=rec.on_epoch,
                             should_stop=rec.should_stop, log=rec.log)
    finally:
        if old is None:
            os.environ.pop("RE_WARM_DDP", None)
        else:
            os.environ["RE_WARM_DDP"] = old


@pytest.fixture(scope="module")
def work(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from workers.warm import release_idle

    release_idle()  # another module's idle warm actor would hold a core the group needs
    yield tmp_path_factory.mktemp("warm-ddp")
    release_idle()  # the group gives the session's Ray its cores back


@pytest.fixture(scope="module")
def group_run(work: Path) -> Recorder:
    rec = Recorder()
    out = _run(work, "group-a", rec, warm=True)
    assert out["metrics"], out
    return rec


def test_a_warm_group_trains_the_weights_of_ray_trains_ddp_run(work: Path, group_run: Recorder) -> None:
    from workers.warm_ddp import GROUPS

    cold = Recorder()
    _run(work, "cold-a", cold, warm=False)  # closes the idle group first: it needs both cores
    assert GROUPS.live_count() == 0
    assert [e["epoch"] for e in group_run.epochs] == [e["epoch"] for e in cold.epochs] == [1, 2]
    assert group_run.rank0() and not cold.rank0()
    # every rank names its host (docker/cluster_test.py reads these lines to check the ranks spread over nodes)
    hosts = {int(m.group(1)): m.group(2) for line in group_run.logs if (m := RANK_HOST.search(line))}
    assert hosts == {0: socket.gethostname(), 1: socket.gethostname()}
    assert any("warm DDP group of 2 workers (new," in line for line in group_run.logs)
    _assert_same(_weights(work, "group-a"), _weights(work, "cold-a"))


def test_the_group_is_kept_and_reused_for_the_next_job(work: Path, group_run: Recorder) -> None:
    from workers.warm_ddp import GROUPS

    b, c = Recorder(), Recorder()
    _run(work, "group-b", b, warm=True)
    assert GROUPS.live_count() == 1  # kept after the job
    _run(work, "group-c", c, warm=True)
    (pid_b, n_b), = b.rank0()
    (pid_c, n_c), = c.rank0()
    assert pid_c == pid_b and n_c == n_b + 1, (b.logs, c.logs)
    assert any("(reused," in line for line in c.logs)
    # nothing of the earlier jobs leaked into the later ones
    _assert_same(_weights(work, "group-b"), _weights(work, "group-a"))
    _assert_same(_weights(work, "group-c"), _weights(work, "group-a"))


def test_a_cancelled_job_resumes_to_the_uninterrupted_weights(work: Path, group_run: Recorder) -> None:
    from workers.warm_ddp import GROUPS

    first = Recorder(stop_after_epoch=1)
    with pytest.raises(JobCancelled):
        _run(work, "group-cancel", first, warm=True)
    assert [e["epoch"] for e in first.epochs] == [1]
    assert (work / "storage" / "group-cancel" / "warm" / "epoch-00001.pt").is_file()
    assert GROUPS.live_count() == 1  # the group stopped the job, not itself
    again = Recorder()
    _run(work, "group-cancel", again, warm=True)
    assert [e["epoch"] for e in again.epochs] == [2]
    assert any("resuming from warm/epoch-00001.pt" in line for line in again.logs), again.logs
    assert any("(reused," in line for line in again.logs)
    _assert_same(_weights(work, "group-cancel"), _weights(work, "group-a"))


def test_the_cold_path_resumes_from_the_groups_states(work: Path, group_run: Recorder) -> None:
    with pytest.raises(JobCancelled):
        _run(work, "group-then-cold", Recorder(stop_after_epoch=1), warm=True)
    rec = Recorder()
    _run(work, "group-then-cold", rec, warm=False)
    assert any("resuming from the warm path's state epoch-00001.pt" in line for line in rec.logs), rec.logs
    assert [e["epoch"] for e in rec.epochs] == [2]
    _assert_same(_weights(work, "group-then-cold"), _weights(work, "group-a"))


def test_a_killed_rank_is_restarted_by_ray_train_and_the_job_resumes(work: Path, group_run: Recorder) -> None:
    def kill(rec: Recorder) -> None:  # epoch 1's state is on disk; two epochs remain
        (pid, _), = rec.rank0()[-1:]
        os.kill(pid, signal.SIGKILL)

    rec = Recorder(on_epoch_1=kill)
    _run(work, "group-kill", rec, warm=True, spec={**SPEC, "epochs": 3})
    pids = [pid for pid, _ in rec.rank0()]
    assert len(set(pids)) == 2, rec.logs  # the restarted group's rank 0 took the job again
    assert any("resuming from warm/epoch-0000" in line for line in rec.logs), rec.logs
    assert [e["epoch"] for e in rec.epochs] == [1, 2, 3]  # nothing redone but the epoch in progress


def test_an_idle_group_gives_its_cores_back(work: Path, group_run: Recorder,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.warm import release_idle
    from workers.warm_ddp import GROUPS

    _run(work, "group-idle", Recorder(), warm=True)
    assert GROUPS.live_count() == 1
    assert release_idle() >= 1
    assert GROUPS.live_count() == 0
    monkeypatch.setenv("RE_WARM_IDLE_SECONDS", "0")  # no idle group kept at all: closed after its job
    _run(work, "group-idle-0", Recorder(), warm=True)
    assert GROUPS.live_count() == 0
