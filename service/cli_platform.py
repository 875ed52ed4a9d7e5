"""Organisation, clean-up, quotas and webhooks from the shell (issue #24).

Client commands (the REST API, ``--api`` / ``--token``)::

    robust-ensembles edit <job id> --tag best --untag draft --note "the run with the fixed lr"
    robust-ensembles delete <job id> [--cascade]
    robust-ensembles usage [--owner NAME] [--json]
    robust-ensembles retention [--keep-days N] [--keep-last N] [--clear] [--apply | --preview]
    robust-ensembles webhooks create --url https://... --event job.succeeded --event job.failed \\
                                     [--threshold 'val_clean_acc>=0.95'] [--description TEXT]
    robust-ensembles webhooks list | show <id> | delete <id> | pause <id> | resume <id> | ping <id>
    robust-ensembles webhooks deliveries <id> [--status failed]

Service commands (the database, ``--data-dir`` / ``--database-url``, like ``token``)::

    robust-ensembles cleanup [--owner NAME] [--dry-run] [--grace-seconds S]   # every owner's retention + orphans
    robust-ensembles quota set (--owner NAME | --default) [--max-running N] [--max-gpus G] [--clear]
    robust-ensembles quota list
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

THRESHOLD = re.compile(r"^\s*([A-Za-z0-9_.:/-]+)\s*(>=|<=|>|<)\s*(-?[0-9.eE+-]+)\s*$")


def _client(args: argparse.Namespace) -> Any:
    from service.client import Client

    return Client(args.api, token=getattr(args, "token", None))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# ------------------------------------------------------------------ client commands
def cmd_edit(args: argparse.Namespace) -> int:
    """Change a job's tags and note."""
    with _client(args) as c:
        job = c.update_job(args.job_id, add_tags=args.tag or None, remove_tags=args.untag or None,
                           note=args.note, clear_note=args.clear_note)
    print(f"job {job['id']}: tags [{', '.join(job['tags'])}]" + (f", note: {job['note']}" if job.get("note") else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a job with its artifacts and checkpoints."""
    with _client(args) as c:
        r = c.delete_job(args.job_id, cascade=args.cascade)
    print(f"deleted {', '.join(r['deleted'])}" + (f" and {r['trials']} trial(s)" if r["trials"] else "")
          + f"; freed {_bytes(r['freed_bytes'])}")
    if r["dependents_cancelled"]:
        print(f"cancelled queued dependents (they could never run): {', '.join(r['dependents_cancelled'])}")
    if r["dependents_kept"]:
        print(f"kept finished dependents with their results: {', '.join(r['dependents_kept'])}")
    for f in r["files_left"]:
        print(f"could not remove {f} (the orphan sweep retries)", file=sys.stderr)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Disk use and job counts."""
    with _client(args) as c:
        u = c.usage(args.owner)
    if args.json:
        _print_json(u)
        return 0
    jobs = u["jobs"]
    print(f"owner {u['owner'] or '(local)'}: {jobs['total']} jobs ("
          + ", ".join(f"{n} {s}" for s, n in sorted(jobs["by_status"].items())) + ")")
    print(f"  artifacts {_bytes(u['artifacts_bytes'])}, checkpoints {_bytes(u['checkpoints_bytes'])}, "
          f"models {u['models']['count']} / {_bytes(u['models']['bytes'])}; total {_bytes(u['total_bytes'])}")
    print(f"  running {u['running']['jobs']} job(s), {u['running']['gpus']:g} GPU(s); quota "
          f"max_running {u['quota']['max_running']}, max_gpus {u['quota']['max_gpus']}; retention keep_days "
          f"{u['retention']['keep_days']}, keep_last {u['retention']['keep_last']}")
    for j in u["largest_jobs"]:
        print(f"  {j['id']}  {_bytes(j['bytes'])}")
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Show or set the caller's retention rules; apply or preview them."""
    with _client(args) as c:
        rules: dict[str, int | None] = {}
        if args.clear:
            rules = {"keep_days": None, "keep_last": None}
        if args.keep_days is not None:
            rules["keep_days"] = args.keep_days or None
        if args.keep_last is not None:
            rules["keep_last"] = args.keep_last or None
        view = c.set_retention(**rules) if rules else c.retention()
        print(f"retention of {view['owner'] or '(local)'}: keep_days {view['effective']['keep_days']}, keep_last "
              f"{view['effective']['keep_last']} (jobs tagged 'keep' are exempt)")
        if args.apply or args.preview:
            run = c.apply_retention(dry_run=not args.apply)
            for o in run["owners"]:
                verb = "deleted" if args.apply else "would delete"
                ids = o["deleted"] if args.apply else o["selected"]
                print(f"{verb} {len(ids)} job(s)" + (f", freed {_bytes(o['freed_bytes'])}" if args.apply else ""))
                for i in ids:
                    print(f"  {i}")
    return 0


def parse_threshold(raw: str) -> dict[str, Any]:
    """``'val_clean_acc>=0.95'`` -> ``{"metric": "val_clean_acc", "op": ">=", "value": 0.95}``."""
    m = THRESHOLD.match(raw)
    if not m:
        raise SystemExit(f"--threshold expects METRIC OP VALUE with OP one of >=, >, <=, <; got {raw!r}")
    return {"metric": m.group(1), "op": m.group(2), "value": float(m.group(3))}


def _hook_line(w: dict[str, Any]) -> str:
    th = "; ".join(f"{t['metric']}{t['op']}{t['value']:g}" for t in w.get("thresholds") or [])
    return (f"{w['id']}  {'active' if w['active'] else 'paused':<6}  {w['url']}  events {','.join(w['events'])}"
            + (f"  thresholds {th}" if th else ""))


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Dispatch ``webhooks <action>``."""
    action = args.webhooks_command
    with _client(args) as c:
        if action == "create":
            w = c.create_webhook(args.url, args.event or [], thresholds=[parse_threshold(t) for t in args.threshold
                                                                        or []], description=args.description)
            if args.json:
                _print_json(w)
                return 0
            print(_hook_line(w))
            print(f"signing secret (shown once; HMAC-SHA256, header X-RE-Signature): {w['secret']}")
        elif action == "list":
            items = c.webhooks()["items"]
            if args.json:
                _print_json(items)
            for w in [] if args.json else items:
                print(_hook_line(w))
        elif action == "show":
            _print_json(c.webhook(args.webhook_id))
        elif action == "delete":
            c.delete_webhook(args.webhook_id)
            print(f"deleted webhook {args.webhook_id}")
        elif action in ("pause", "resume"):
            print(_hook_line(c.update_webhook(args.webhook_id, active=action == "resume")))
        elif action == "ping":
            d = c.ping_webhook(args.webhook_id)
            print(f"queued delivery {d['id']} ({d['event']})")
        else:
            page = c.webhook_deliveries(args.webhook_id, status=args.status, limit=args.limit)
            if args.json:
                _print_json(page)
                return 0
            for d in page["items"]:
                code = d["last_status_code"] if d["last_status_code"] is not None else "-"
                print(f"{d['id']:>8}  {d['event']:<22} {d['status']:<9} attempts {d['attempts']}  HTTP {code}  "
                      f"{str(d['created_at'])[:19]}" + (f"  {d['last_error']}" if d.get("last_error") else ""))
    return 0


# ------------------------------------------------------------------ service commands (the database)
def _with_engine(args: argparse.Namespace, body: Callable[[Any, Any], int]) -> int:
    from service import migrate
    from service.cli_common import Database, command_settings, setup_logging
    from service.db import make_engine

    setup_logging(args.verbose)
    settings = command_settings(args)
    with Database(settings) as url:
        current, head = migrate.current_revision(url), migrate.head_revision()
        if current != head:
            print(f"error: database schema at {current}, expected {head}: run `robust-ensembles db upgrade` first",
                  file=sys.stderr)
            return 2
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            return body(engine, settings.with_(database_url=url))
        finally:
            engine.dispose()


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Apply every owner's retention rules (or one owner's) and remove orphaned job folders."""
    from service.cleanup import apply_retention, sweep_orphans
    from service.policies import owner_key

    def body(engine: Any, settings: Any) -> int:
        keys = None if args.owner is None else [owner_key(None if args.owner == "-" else args.owner)]
        runs = apply_retention(engine, settings, keys=keys, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for r in runs:
            ids = r["selected"] if args.dry_run else r["deleted"]
            print(f"{r['owner'] or '(local)'}: keep_days {r['keep_days']}, keep_last {r['keep_last']}: {verb} "
                  f"{len(ids)} job(s)" + ("" if args.dry_run else f", freed {_bytes(r['freed_bytes'])}"))
            for i in ids:
                print(f"  {i}")
        if not runs:
            print("no owner has retention rules (robust-ensembles retention --keep-days N)")
        orphans = sweep_orphans(engine, settings, grace_seconds=args.grace_seconds, dry_run=args.dry_run)
        print(f"orphaned job folders: {verb} {len(orphans)}")
        for o in orphans:
            print(f"  {o}")
        return 0

    return _with_engine(args, body)


def cmd_quota(args: argparse.Namespace) -> int:
    """Set or list quotas."""
    from service.policies import DEFAULT_KEY, QUOTA_FIELDS, PolicyStore

    def body(engine: Any, settings: Any) -> int:
        store = PolicyStore(engine)
        if args.quota_command == "list":
            for r in store.all():
                print(f"{r['owner_key'] or '(local)':<24} max_running {r['max_running']}  max_gpus {r['max_gpus']}  "
                      f"keep_days {r['keep_days']}  keep_last {r['keep_last']}")
            return 0
        if (args.owner is None) == (not args.default):
            print("error: give --owner NAME or --default", file=sys.stderr)
            return 2
        values: dict[str, Any] = {f: None for f in QUOTA_FIELDS} if args.clear else {}
        if args.max_running is not None:
            if args.max_running < 0:
                print("error: --max-running must be >= 0", file=sys.stderr)
                return 2
            values["max_running"] = args.max_running
        if args.max_gpus is not None:
            if args.max_gpus < 0:
                print("error: --max-gpus must be >= 0", file=sys.stderr)
                return 2
            values["max_gpus"] = args.max_gpus
        key = DEFAULT_KEY if args.default else args.owner
        got = store.set(key, values)["own"]
        print(f"quota of {key}: max_running {got['max_running']}, max_gpus {got['max_gpus']}")
        return 0

    return _with_engine(args, body)


# ------------------------------------------------------------------ parsers
def add_platform_parsers(sub: Any, client_parser: Callable[[str, str], argparse.ArgumentParser],
                         common: argparse.ArgumentParser) -> None:
    """Add the commands to the ``robust-ensembles`` parser."""
    sp = client_parser("edit", "change a job's tags and note")
    sp.add_argument("job_id")
    sp.add_argument("--tag", action="append", help="add a tag (repeat)")
    sp.add_argument("--untag", action="append", help="remove a tag (repeat)")
    sp.add_argument("--note", help="set the note")
    sp.add_argument("--clear-note", action="store_true")
    sp.set_defaults(func=cmd_edit)

    sp = client_parser("delete", "delete a job with its artifacts and checkpoints (refused while it runs)")
    sp.add_argument("job_id")
    sp.add_argument("--cascade", action="store_true", help="also delete the jobs that depend on it")
    sp.set_defaults(func=cmd_delete)

    sp = client_parser("usage", "disk use and job counts of your owner")
    sp.add_argument("--owner", help="admins: another owner")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_usage)

    sp = client_parser("retention", "show or set your retention rules (0 removes a rule); apply or preview them")
    sp.add_argument("--keep-days", type=int, help="delete finished jobs older than N days")
    sp.add_argument("--keep-last", type=int, help="keep only the newest N finished jobs")
    sp.add_argument("--clear", action="store_true", help="remove both rules")
    sp.add_argument("--apply", action="store_true", help="apply them now")
    sp.add_argument("--preview", action="store_true", help="list what they would delete")
    sp.set_defaults(func=cmd_retention)

    sp = client_parser("webhooks", "webhook subscriptions and their delivery log (docs/webhooks.md)")
    wsub = sp.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--api", default=argparse.SUPPRESS, help="API base URL (default $RE_API_URL)")
    parent.add_argument("--token", default=argparse.SUPPRESS, help="API token (default $RE_API_TOKEN)")
    cr = wsub.add_parser("create", help="subscribe a URL", parents=[parent])
    cr.add_argument("--url", required=True)
    cr.add_argument("--event", action="append", help="job.succeeded, job.failed, job.*, metric.threshold, ...")
    cr.add_argument("--threshold", action="append", help="METRIC OP VALUE, e.g. 'val_clean_acc>=0.95'")
    cr.add_argument("--description")
    cr.add_argument("--json", action="store_true")
    ls = wsub.add_parser("list", help="your subscriptions", parents=[parent])
    ls.add_argument("--json", action="store_true")
    for name, help_ in (("show", "one subscription"), ("delete", "delete a subscription and its log"),
                        ("pause", "stop sending (events are kept)"), ("resume", "send again"),
                        ("ping", "queue a test event")):
        wsub.add_parser(name, help=help_, parents=[parent]).add_argument("webhook_id")
    dl = wsub.add_parser("deliveries", help="the delivery log", parents=[parent])
    dl.add_argument("webhook_id")
    dl.add_argument("--status", choices=["pending", "delivered", "failed"])
    dl.add_argument("--limit", type=int, default=50)
    dl.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_webhooks)

    sp = sub.add_parser("cleanup", help="apply every owner's retention rules and remove orphaned job folders",
                        description="apply every owner's retention rules and remove orphaned job folders",
                        parents=[common])
    sp.add_argument("--owner", help="only this owner's rules ('-': the local mode's jobs)")
    sp.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    sp.add_argument("--grace-seconds", type=float, default=3600.0,
                    help="orphaned folders unchanged this long are removed (default 3600)")
    sp.set_defaults(func=cmd_cleanup)

    sp = sub.add_parser("quota", help="per-owner quotas (concurrent jobs, GPUs), set in the database",
                        description="per-owner quotas (concurrent jobs, GPUs), set in the database")
    qsub = sp.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    qs = qsub.add_parser("set", help="set an owner's quotas (or the defaults)", parents=[common])
    qs.add_argument("--owner")
    qs.add_argument("--default", action="store_true", help="the defaults of owners without their own")
    qs.add_argument("--max-running", type=int)
    qs.add_argument("--max-gpus", type=float)
    qs.add_argument("--clear", action="store_true", help="remove the limits not given")
    qsub.add_parser("list", help="every owner's policies", parents=[common])
    sp.set_defaults(func=cmd_quota)


__all__ = ["add_platform_parsers", "cmd_cleanup", "cmd_delete", "cmd_edit", "cmd_quota", "cmd_retention",
           "cmd_usage", "cmd_webhooks", "parse_threshold"]
