"""A local Ray (the one ``robust-ensembles up`` / ``worker`` start) on loopback, with a private token file.

Imports no Ray: the settings here must be in place **before** ``import ray``.

- **Loopback.** On Linux, Ray computes its node address with its "cluster" mode on: the GCS server,
  the raylet and the workers then listen on every interface and the runtime-env agent on the machine's
  external address. Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray._private.ray_constants``
  is imported; with it at ``0`` the node address is 127.0.0.1 and every process of the local instance
  listens on loopback only. ``ray.init(_node_ip_address="127.0.0.1")`` alone does *not* do this
  (measured with Ray 2.60: the GCS, raylet and workers still bound ``::`` and the agent the external
  address). :func:`keep_local_ray_on_loopback` sets the variable (inherited by Ray's processes) and, when
  Ray was imported already, the constant it was read into.
- **Token file.** Ray 2.60 turns token authentication on for a new local cluster and, when no token
  exists, writes one to ``~/.ray/auth_token`` with the process's umask (0644: readable by every local
  user). :func:`private_ray_token` writes the token to a file of our own, created with mode 0600, and
  points Ray at it (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``), so Ray writes none.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TOKEN_FILE = "auth_token"
RAY_DEFAULT_TOKEN = Path("~/.ray/auth_token")


def loopback_env() -> dict[str, str]:
    """Environment variables that keep a Ray started with them on loopback (for a subprocess's env)."""
    return {CLUSTER_MODE_ENV: "0"}


def keep_local_ray_on_loopback() -> None:
    """Make a Ray started by this process (and its children) bind to 127.0.0.1 only.

    Call before ``ray.init()`` without an address (a cluster address is left alone). Works whether or
    not ``ray`` was imported already.
    """
    os.environ.update(loopback_env())
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported first: its copy of the setting was read already
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def private_ray_token(directory: str | os.PathLike[str]) -> Path | None:
    """Give a local Ray a token file readable by its owner only; returns its path (None: left to Ray).

    Skipped when token authentication is turned off (``RAY_AUTH_MODE=disabled``) or a token is given
    already (``RAY_AUTH_TOKEN``, or ``RAY_AUTH_TOKEN_PATH``, whose file is then made private). Also
    tightens a ``~/.ray/auth_token`` an earlier Ray left readable by others.
    """
    _tighten(RAY_DEFAULT_TOKEN.expanduser())
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in ("", "token") or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given:
        _tighten(Path(given))
        return Path(given)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / TOKEN_FILE
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # Ray's own format: 256 random bits, hex
    _tighten(path)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:  # Ray was imported first: refresh its cached config, as Ray itself does
        with contextlib.suppress(Exception):
            raylet.Config.initialize("")
    return path


def _tighten(path: Path) -> None:
    """chmod 0600 a token file of ours that others can read (a no-op when missing or not ours)."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            path.chmod(0o600)


__all__ = ["LOOPBACK", "keep_local_ray_on_loopback", "loopback_env", "private_ray_token"]
