"""Webhooks: per-owner subscriptions, signed deliveries with retries, and a delivery that cannot be turned
against the service's own network (docs/webhooks.md).

**Events.** Rows of ``webhook_deliveries`` are queued by database triggers (migration 0007) in the same
transaction as what they report, so none is lost: every transition of a job (``job.created``, ``job.started``,
``job.succeeded``, ``job.failed``, ``job.cancelled``, ``job.requeued``, ``job.cancel_requested``,
``job.preempted``, ``job.preempt_requested``; ``job.*`` for all) and a metric point meeting a subscription's
threshold (``metric.threshold``, once per job and threshold). ``ping`` is queued on request.

**Delivery** (:class:`Dispatcher`, run by the worker's housekeeping thread, never in a request): ``POST`` of the
JSON payload with ``X-RE-Event``, ``X-RE-Delivery``, ``X-RE-Timestamp`` and ``X-RE-Signature: sha256=<hex>``,
the HMAC-SHA256 of ``<timestamp>.<body>`` under the subscription's secret. A 2xx answer is success; anything
else (an error status, a redirect, which is never followed, a timeout, a refused address) is retried with
exponential backoff (``webhook_backoff_seconds`` x 2^(n-1), capped) up to ``webhook_max_attempts``; each
attempt is kept in the delivery's ``history``.

**Address policy** (:func:`address_problem`): the URL must be ``http`` or ``https`` with a host and no user
name or password in it. Its host is resolved at every delivery and **every** address it resolves to must be
allowed: loopback, private (RFC 1918, unique-local IPv6), shared (100.64/10), unspecified, multicast, reserved
and documentation addresses are refused unless ``RE_WEBHOOK_ALLOW_PRIVATE=1``; link-local addresses
(169.254/16 and fe80::/10, where cloud metadata services live: 169.254.169.254, fd00:ec2::254) and the
unspecified and multicast addresses are refused always. The connection is made to an address that was checked
(no second lookup a rebinding DNS server could answer differently) and the connected peer is checked again.
No proxy from the environment is used.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, text

from service.settings import Settings

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
USER_AGENT = "robust-ensembles-webhooks/1"
MAX_URL = 2000
MAX_RESPONSE_READ = 4096  # bytes of an answer kept for the log
MAX_HISTORY = 20
JOB_EVENTS = ("job.created", "job.started", "job.succeeded", "job.failed", "job.cancelled", "job.requeued",
              "job.cancel_requested", "job.preempted", "job.preempt_requested")
EVENTS = (*JOB_EVENTS, "job.*", "metric.threshold")
THRESHOLD_OPS = (">=", ">", "<=", "<")
# Never a target, whatever the setting: cloud metadata services and other link-local addresses.
ALWAYS_REFUSED = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
                  ipaddress.ip_network("fd00:ec2::254/128"))

# The resolver (a seam for tests of DNS rebinding); returns getaddrinfo's tuples.
resolve: Callable[..., list[Any]] = socket.getaddrinfo


class BlockedAddress(Exception):
    """The webhook's host is, or resolves to, an address the policy refuses."""


def new_secret() -> str:
    """A subscription's signing secret: ``whsec_`` + 32 random bytes."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret`` (header ``X-RE-Signature``)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float | None = 300.0,
           now: float | None = None) -> bool:
    """A receiver's check of a delivery: the signature matches and (with ``tolerance_s``) the timestamp is recent."""
    if tolerance_s is not None:
        try:
            if abs((now if now is not None else time.time()) - int(timestamp)) > tolerance_s:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# ------------------------------------------------------------------ the address policy
def address_problem(ip: str, allow_private: bool) -> str | None:
    """Why a delivery may not connect to ``ip`` (None: it may)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"{ip!r} is not an IP address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in ALWAYS_REFUSED if net.version == addr.version):
        return f"{addr} is a link-local address (cloud metadata services live there): never a webhook target"
    if addr.is_unspecified or addr.is_multicast:
        return f"{addr} is an unspecified or multicast address"
    if addr.is_global:
        return None
    if allow_private:
        return None
    kind = "loopback" if addr.is_loopback else "private" if addr.is_private else "non-public"
    return (f"{addr} is a {kind} address; webhooks to the service's own network need RE_WEBHOOK_ALLOW_PRIVATE=1")


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a webhook URL, by its form alone (None: it is one)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        return f"a URL of 1 to {MAX_URL} characters"
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        return "no spaces or control characters in the URL"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "no user name or password in the URL (the payload is signed with the subscription's secret)"
    if not parts.hostname:
        return "the URL has no host"
    if parts.fragment:
        return "no fragment (#...) in the URL"
    if port == 0:
        return "port 0 is not a port"
    return None


def resolve_allowed(host: str, port: int, allow_private: bool) -> list[tuple[Any, ...]]:
    """The addresses (getaddrinfo tuples) ``host`` resolves to, if **every** one is allowed; else
    :class:`BlockedAddress`."""
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise BlockedAddress(f"host {host!r} does not resolve: {e}") from None
    if not infos:
        raise BlockedAddress(f"host {host!r} does not resolve")
    for info in infos:
        problem = address_problem(str(info[4][0]), allow_private)
        if problem:
            raise BlockedAddress(f"host {host!r} resolves to {problem}")
    return infos


def check_url(url: str, allow_private: bool, *, resolve_host: bool = True) -> str | None:
    """Why ``url`` may not be subscribed (its form, then the addresses its host resolves to); None when it may."""
    problem = url_problem(url)
    if problem or not resolve_host:
        return problem
    parts = urlsplit(url)
    try:
        resolve_allowed(str(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80), allow_private)
    except BlockedAddress as e:
        return str(e)
    return None


def _connect(host: str, port: int, timeout: float, allow_private: bool) -> socket.socket:
    """A TCP connection to a checked address of ``host``; the peer is checked again once connected."""
    last: Exception | None = None
    for family, socktype, proto, _, sockaddr in resolve_allowed(host, port, allow_private):
        sock = socket.socket(family, socktype, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            peer = str(sock.getpeername()[0])
            problem = address_problem(peer, allow_private)
            if problem:
                raise BlockedAddress(f"connected to {problem}")
            return sock
        except BlockedAddress:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            last = e
    raise OSError(f"could not connect to {host}:{port}: {last}")


class _GuardedHTTP(http.client.HTTPConnection):
    allow_private = False

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, float(self.timeout or 10.0), self.allow_private)


class _GuardedHTTPS(http.client.HTTPSConnection):
    allow_private = False

    def connect(self) -> None:
        sock = _connect(self.host, self.port, float(self.timeout or 10.0), self.allow_private)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass
class Outcome:
    """One attempt's result."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    duration_s: float = 0.0


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float, allow_private: bool) -> Outcome:
    """POST ``body`` to ``url`` under the address policy; never follows a redirect."""
    t0 = time.monotonic()
    problem = url_problem(url)
    if problem:
        return Outcome(False, error=f"invalid URL: {problem}")
    parts = urlsplit(url)
    cls = _GuardedHTTPS if parts.scheme == "https" else _GuardedHTTP
    conn_cls = type(cls.__name__, (cls,), {"allow_private": allow_private})
    kwargs: dict[str, Any] = {"timeout": timeout}
    if parts.scheme == "https":
        kwargs["context"] = ssl.create_default_context()
    conn = conn_cls(str(parts.hostname), parts.port, **kwargs)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", target, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(MAX_RESPONSE_READ)
        code = resp.status
    except BlockedAddress as e:
        return Outcome(False, error=f"refused: {e}", duration_s=time.monotonic() - t0)
    except (OSError, http.client.HTTPException) as e:
        return Outcome(False, error=f"{type(e).__name__}: {e}"[:500], duration_s=time.monotonic() - t0)
    finally:
        conn.close()
    if 200 <= code < 300:
        return Outcome(True, code, duration_s=time.monotonic() - t0)
    why = "redirects are not followed" if 300 <= code < 400 else "the receiver answered an error"
    return Outcome(False, code, f"HTTP {code}: {why}", duration_s=time.monotonic() - t0)


# ------------------------------------------------------------------ storage
WEBHOOK_COLUMNS = "id, owner, url, events, thresholds, description, active, created_at, updated_at"
DELIVERY_COLUMNS = ("id, webhook_id, event, job_id, payload, status, attempts, next_attempt_at, last_status_code, "
                    "last_error, history, created_at, delivered_at")


class WebhookNotFound(LookupError):
    """No subscription with this id, or another owner's (the same answer: 404)."""


class WebhookStore:
    """The ``webhooks`` and ``webhook_deliveries`` tables, scoped to owners."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, owner: str | None, url: str, events: list[str], thresholds: list[dict[str, Any]],
               description: str | None) -> dict[str, Any]:
        """A new subscription; the returned row holds its ``secret`` (shown to the caller once)."""
        secret = new_secret()
        with self.engine.begin() as c:
            row = c.execute(text(f"INSERT INTO webhooks (id, owner, url, events, thresholds, secret, description) "
                                 "VALUES (:id, :owner, :url, CAST(:events AS text[]), CAST(:th AS jsonb), :secret, "
                                 f":desc) RETURNING {WEBHOOK_COLUMNS}"),
                            {"id": uuid.uuid4(), "owner": owner, "url": url, "events": events,
                             "th": json.dumps(thresholds), "secret": secret, "desc": description}).one()
        return {**dict(row._mapping), "secret": secret}

    def get(self, webhook_id: uuid.UUID, owner: str | None, *, admin: bool = False) -> dict[str, Any]:
        with self.engine.connect() as c:
            row = c.execute(text(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = :id"),
                            {"id": webhook_id}).first()
        if row is None or not (admin or (owner is not None and row.owner == owner)):
            raise WebhookNotFound(str(webhook_id))
        return dict(row._mapping)

    def list(self, owner: str | None, *, admin: bool = False) -> list[dict[str, Any]]:
        cond, params = ("", {}) if admin else ("WHERE owner = :owner", {"owner": owner})
        if owner is None and not admin:
            return []
        with self.engine.connect() as c:
            rows = c.execute(text(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks {cond} ORDER BY created_at, id"), params)
            return [dict(r._mapping) for r in rows]

    def update(self, webhook_id: uuid.UUID, changes: dict[str, Any]) -> dict[str, Any]:
        sets, params = [], {"id": webhook_id}
        for key, value in changes.items():
            if key == "events":
                sets.append("events = CAST(:events AS text[])")
            elif key == "thresholds":
                sets.append("thresholds = CAST(:thresholds AS jsonb)")
                value = json.dumps(value)
            else:
                sets.append(f"{key} = :{key}")
            params[key] = value
        with self.engine.begin() as c:
            row = c.execute(text(f"UPDATE webhooks SET {', '.join([*sets, 'updated_at = now()'])} WHERE id = :id "
                                 f"RETURNING {WEBHOOK_COLUMNS}"), params).one()
        return dict(row._mapping)

    def rotate_secret(self, webhook_id: uuid.UUID) -> dict[str, Any]:
        secret = new_secret()
        with self.engine.begin() as c:
            row = c.execute(text(f"UPDATE webhooks SET secret = :s, updated_at = now() WHERE id = :id "
                                 f"RETURNING {WEBHOOK_COLUMNS}"), {"id": webhook_id, "s": secret}).one()
        return {**dict(row._mapping), "secret": secret}

    def delete(self, webhook_id: uuid.UUID) -> None:
        with self.engine.begin() as c:
            c.execute(text("DELETE FROM webhooks WHERE id = :id"), {"id": webhook_id})

    def enqueue(self, webhook_id: uuid.UUID, event: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Queue one delivery (``ping``)."""
        with self.engine.begin() as c:
            row = c.execute(text(f"INSERT INTO webhook_deliveries (webhook_id, event, payload) VALUES (:w, :e, "
                                 f"CAST(:p AS jsonb)) RETURNING {DELIVERY_COLUMNS}"),
                            {"w": webhook_id, "e": event, "p": json.dumps(payload)}).one()
        return dict(row._mapping)

    def deliveries(self, webhook_id: uuid.UUID, *, status: str | None = None, event: str | None = None,
                   limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """The delivery log of one subscription, newest first."""
        where, params = ["webhook_id = :w"], {"w": webhook_id, "limit": limit, "offset": offset}
        if status is not None:
            where.append("status = :status")
            params["status"] = status
        if event is not None:
            where.append("event = :event")
            params["event"] = event
        cond = " AND ".join(where)
        with self.engine.connect() as c:
            total = int(c.execute(text(f"SELECT count(*) FROM webhook_deliveries WHERE {cond}"), params).scalar_one())
            rows = c.execute(text(f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {cond} "
                                  "ORDER BY id DESC LIMIT :limit OFFSET :offset"), params).all()
        return [dict(r._mapping) for r in rows], total


# ------------------------------------------------------------------ the dispatcher
SQL_CLAIM_DELIVERIES = """
UPDATE webhook_deliveries d SET attempts = d.attempts + 1,
       locked_until = clock_timestamp() + make_interval(secs => :lock)
FROM webhooks w
WHERE d.webhook_id = w.id AND d.id IN (
    SELECT x.id FROM webhook_deliveries x JOIN webhooks y ON y.id = x.webhook_id
    WHERE x.status = 'pending' AND x.next_attempt_at <= clock_timestamp() AND y.active
      AND (x.locked_until IS NULL OR x.locked_until < clock_timestamp())
    ORDER BY x.id
    LIMIT :n
    FOR UPDATE OF x SKIP LOCKED)
RETURNING d.id, d.event, d.payload, d.attempts, w.url, w.secret, w.id AS webhook_id"""

SQL_RECORD = """
UPDATE webhook_deliveries SET
    status = CASE WHEN :ok THEN 'delivered' WHEN attempts >= :max THEN 'failed' ELSE 'pending' END,
    delivered_at = CASE WHEN :ok THEN clock_timestamp() END,
    next_attempt_at = CASE WHEN :ok THEN next_attempt_at
        ELSE clock_timestamp() + make_interval(secs => LEAST(:base * power(2, GREATEST(attempts - 1, 0)), :cap)) END,
    locked_until = NULL, last_status_code = :code, last_error = :error,
    history = CASE WHEN jsonb_array_length(history) >= :keep THEN history - 0 ELSE history END
              || CAST(:entry AS jsonb)
WHERE id = :id"""


class Dispatcher:
    """Sends due deliveries: claimed with ``FOR UPDATE SKIP LOCKED`` and a short lock, so several workers share
    the work and a dispatcher that dies mid-delivery only delays it (the lock expires)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def run_once(self, limit: int = 20) -> int:
        """Send the deliveries due now (at most ``limit``); returns how many were attempted."""
        lock = self.settings.webhook_timeout_seconds * 2 + 30
        with self.engine.begin() as c:
            rows = c.execute(text(SQL_CLAIM_DELIVERIES), {"n": limit, "lock": lock}).all()
        for r in rows:
            self._send(r)
        return len(rows)

    def _send(self, r: Any) -> None:
        body = json.dumps({**r.payload, "delivery": r.id}, separators=(",", ":"), default=str).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-RE-Event": r.event,
                   "X-RE-Delivery": str(r.id), "X-RE-Webhook": str(r.webhook_id), "X-RE-Timestamp": ts,
                   "X-RE-Signature": sign(r.secret, ts, body)}
        out = post(r.url, body, headers, timeout=self.settings.webhook_timeout_seconds,
                   allow_private=self.settings.webhook_allow_private)
        entry = {"attempt": r.attempts, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "status_code": out.status_code, "error": out.error, "duration_s": round(out.duration_s, 3)}
        if not out.ok:
            log.info("webhook delivery %d (%s) attempt %d failed: %s", r.id, r.event, r.attempts, out.error)
        with self.engine.begin() as c:
            c.execute(text(SQL_RECORD), {
                "id": r.id, "ok": out.ok, "max": self.settings.webhook_max_attempts,
                "base": self.settings.webhook_backoff_seconds, "cap": self.settings.webhook_backoff_max_seconds,
                "code": out.status_code, "error": out.error, "entry": json.dumps([entry]), "keep": MAX_HISTORY})


__all__ = ["EVENTS", "JOB_EVENTS", "THRESHOLD_OPS", "BlockedAddress", "Dispatcher", "Outcome", "WebhookNotFound",
           "WebhookStore", "address_problem", "check_url", "new_secret", "post", "resolve_allowed", "sign",
           "url_problem", "verify"]
