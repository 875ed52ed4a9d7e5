"""Failure classes shared by the worker loop and the job runners.

The worker decides what happens to a job from the class of the exception its runner raised:

- ``JobCancelled``: the run stopped because ``should_stop()`` became true -> job ends ``cancelled``.
- ``JobPreempted``: the run stopped at an epoch checkpoint for a job of higher priority -> back to ``queued``,
  the attempt not counted; it resumes from the checkpoint.
- ``UserError``: the user's spec or data is wrong -> job ends ``failed``, never retried.
- ``InfrastructureError``: the machine or Ray failed -> retried with its own backoff, not charged to the job's
  ``max_attempts``, up to the queue's ``max_infra_failures`` (a worker that died is counted the same way when its
  lease expires).
- anything else: transient -> retried with backoff up to ``max_attempts``.
"""

from __future__ import annotations


class JobCancelled(Exception):
    """The run was stopped because a cancel was requested for the job."""


class JobPreempted(Exception):
    """The run stopped at an epoch checkpoint because a job of higher priority waits: the job goes back to the
    queue (its attempt not counted) and resumes from that checkpoint."""


class UserError(Exception):
    """A problem in the user's spec or data; retrying cannot help."""


class InfrastructureError(Exception):
    """A failure of the machine, Ray cluster or storage; the job may succeed on another attempt."""


__all__ = ["InfrastructureError", "JobCancelled", "JobPreempted", "UserError"]
