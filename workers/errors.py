"""Failure classes shared by the worker loop and the job runners.

The worker decides what happens to a job from the class of the exception its runner raised:

- ``JobCancelled``: the run stopped because ``should_stop()`` became true -> job ends ``cancelled``.
- ``UserError``: the user's spec or data is wrong -> job ends ``failed``, never retried.
- ``InfrastructureError``: the machine, Ray or storage failed -> retried (with backoff) up to ``max_attempts``.
- anything else: treated as transient and retried like ``InfrastructureError``.
"""

from __future__ import annotations


class JobCancelled(Exception):
    """The run was stopped because a cancel was requested for the job."""


class UserError(Exception):
    """A problem in the user's spec or data; retrying cannot help."""


class InfrastructureError(Exception):
    """A failure of the machine, Ray cluster or storage; the job may succeed on another attempt."""


__all__ = ["InfrastructureError", "JobCancelled", "UserError"]
