"""``robust-ensembles``: run the service, and talk to it.

Service:   up | demo | serve | worker | db upgrade/downgrade/current | token create/list/revoke | cleanup | quota
Client:    submit | status | watch | logs | metrics | results | artifacts | cancel | methods | models | edit |
           delete | usage | retention | webhooks
Library:   train-local | reproduce | leaderboard | campaign

The client commands talk to the REST API at ``--api`` (default ``$RE_API_URL`` or
http://127.0.0.1:8000) with the API token ``--token`` (default ``$RE_API_TOKEN``; ``serve`` requires
one unless ``RE_AUTH=0``, the local ``up`` / ``demo`` do not unless ``RE_AUTH=1``). The service
commands keep their state in ``--data-dir`` (default
``$RE_DATA_DIR`` or ``~/.robust-ensembles``) and use ``DATABASE_URL`` when it is set, otherwise an
embedded PostgreSQL in ``<data-dir>/pg``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.cli_common import Database, command_settings, setup_logging, watch_job

log = logging.getLogger("robust_ensembles")

Command = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class EntryPoint:
    """What the composition root plugs into this command line.

    The ``robust-ensembles`` console script is :func:`workers.main.main`, which sits above ``service/`` and
    ``workers/``: it passes the ``worker`` command and how to start the program again, so ``service/`` never
    imports ``workers/``. :data:`SERVICE_ONLY` (``python -m service.cli``) has every command but ``worker``.
    """

    program: tuple[str, ...]
    """The command line that runs this program again: ``up`` starts its worker as ``program + ("worker", ...)``,
    ``demo`` its service as ``program + ("up", ...)``."""
    worker: Command | None = None
    """The ``worker`` command (None: the command answers with an error)."""
    worker_env: Mapping[str, str] = field(default_factory=dict)
    """Environment ``up`` adds for its worker when that worker starts a local Ray (set before Ray is imported)."""


SERVICE_ONLY = EntryPoint(program=(sys.executable, "-m", "service.cli"))


# ------------------------------------------------------------------------------------------ helpers
def _client(args: argparse.Namespace) -> Any:
    from service.client import Client

    return Client(args.api, token=getattr(args, "token", None))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def build_spec(spec_file: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """A spec from a JSON file (``-`` = stdin) and ``key.sub=value`` overrides (values parsed as JSON)."""
    spec: dict[str, Any] = {}
    if spec_file:
        text = sys.stdin.read() if spec_file == "-" else Path(spec_file).read_text()
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise SystemExit(f"{spec_file}: a spec must be a JSON object")
        spec = loaded
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = spec
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {key}: {p} is not an object")
        node[parts[-1]] = _parse_value(raw)
    return spec


def _fmt_time(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else "-"


def _job_line(j: dict[str, Any]) -> str:
    epoch = f"{j['epoch']}/{j['total_epochs']}" if j.get("epoch") and j.get("total_epochs") else "-"
    return (f"{j['id']}  {j['kind']:<8} {j['status']:<10} {100 * j['progress']:5.1f}%  epoch {epoch:<7} "
            f"attempts {j['attempts'] - j.get('infra_failures', 0)}/{j['max_attempts']}"
            + (f" (+{j['infra_failures']} infra)" if j.get("infra_failures") else "")
            + f"  {_fmt_time(j['created_at'])}"
            + (f"  [{', '.join(j['tags'])}]" if j.get("tags") else ""))


# ------------------------------------------------------------------------------------------ service commands
def _entry(args: argparse.Namespace) -> EntryPoint:
    return getattr(args, "entry", None) or SERVICE_ONLY


def _no_worker_command(command: str) -> int:
    print(f"error: `{command}` needs the job worker (workers/), which service.cli alone does not load: run "
          f"`robust-ensembles {command}` (or `python -m workers.main {command}`)", file=sys.stderr)
    return 2


def cmd_up(args: argparse.Namespace) -> int:
    from service.up import run_up

    entry = _entry(args)
    if entry.worker is None and not args.no_worker:
        return _no_worker_command("up")
    setup_logging(args.verbose)
    return run_up(command_settings(args), host=args.host, port=args.port, worker=not args.no_worker,
                  ray_address=args.address, num_cpus=args.num_cpus, worker_command=(*entry.program, "worker"),
                  worker_env=entry.worker_env)


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    entry = _entry(args)
    if entry.worker is None:
        return _no_worker_command("demo")
    setup_logging(args.verbose)
    return run_demo(command_settings(args), program=entry.program, port=args.port, epochs=args.epochs,
                    train_subset=args.train_subset, workers=args.workers, n_examples=args.n_examples,
                    keep_running=args.keep_running)


def cmd_worker_missing(args: argparse.Namespace) -> int:
    """``worker`` under :data:`SERVICE_ONLY`: the worker lives in ``workers/``, which ``service/`` never imports."""
    return _no_worker_command("worker")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    setup_logging(args.verbose)
    settings = command_settings(args, auth_default=True)  # a served API requires tokens unless RE_AUTH=0
    log.info("API authentication %s", "on (bearer tokens)" if settings.auth else "OFF (RE_AUTH=0)")
    with Database(settings) as url:
        app = create_app(settings.with_(database_url=url))
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from service import migrate

    setup_logging(args.verbose)
    settings = command_settings(args)
    with Database(settings) as url:
        if args.db_command == "upgrade":
            migrate.upgrade(url, args.revision)
        elif args.db_command == "downgrade":
            migrate.downgrade(url, args.revision)
        print(f"database schema at revision {migrate.current_revision(url)} (head {migrate.head_revision()})")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """API tokens: create (the secret is printed once, only its hash is stored), list, revoke."""
    from service import migrate
    from service.auth import TokenStore
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
            store = TokenStore(engine)
            if args.token_command == "create":
                try:
                    token, rec = store.create(args.owner, admin=args.admin, name=args.name)
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                if args.json:
                    _print_json({**rec, "token": token})
                else:
                    print(token)
                    print(f"token {rec['id']} for owner {rec['owner']!r} (scope {rec['scope']}). Store it now: only "
                          f"its hash is kept. Use it with `export RE_API_TOKEN=<token>` or --token.", file=sys.stderr)
            elif args.token_command == "list":
                rows = store.list(include_revoked=args.all)
                if args.json:
                    _print_json(rows)
                for r in [] if args.json else rows:
                    state = f"revoked {_fmt_time(r['revoked_at'])}" if r["revoked_at"] else "active"
                    print(f"{r['id']}  {r['prefix']}...  {r['owner']:<16} {r['scope']:<5}  created "
                          f"{_fmt_time(r['created_at'])}  last used {_fmt_time(r['last_used_at'])}  {state}"
                          + (f"  ({r['name']})" if r["name"] else ""))
            else:
                try:
                    revoked = store.revoke(args.token_id)
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                if not revoked:
                    print(f"error: no active token {args.token_id!r}", file=sys.stderr)
                    return 1
                for r in revoked:
                    print(f"revoked token {r['id']} ({r['prefix']}..., owner {r['owner']})")
        finally:
            engine.dispose()
    return 0


# ------------------------------------------------------------------------------------------ client commands
def cmd_submit(args: argparse.Namespace) -> int:
    spec = build_spec(args.spec, args.set or [])
    with _client(args) as c:
        job = c.submit(args.kind, spec, priority=args.priority, max_attempts=args.max_attempts,
                       idempotency_key=args.idempotency_key, tags=args.tag, note=args.note)
        if args.json:
            _print_json(job)
        else:
            print(job["id"])
        if args.watch:
            return watch_job(c, job["id"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.job_id:
            job = c.job(args.job_id)
            if args.json:
                _print_json(job)
                return 0
            print(_job_line(job))
            for key in ("stage", "waiting_reason", "error", "lease_owner", "depends_on", "started_at",
                        "finished_at", "tags", "note"):
                if job.get(key):
                    print(f"  {key}: {job[key]}")
            return 0
        page = c.jobs(status=args.status, kind=args.kind, limit=args.limit, method=args.method,
                      dataset=args.dataset, tags=args.tag, search=args.search, since=args.since, until=args.until)
        if args.json:
            _print_json(page)
            return 0
        for j in page["items"]:
            print(_job_line(j))
        print(f"({len(page['items'])} of {page['total']} jobs)")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return watch_job(c, args.job_id, show_logs=not args.no_logs)


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.follow:
            for event, data in c.follow_logs(args.job_id):
                if event == "log":
                    print(data["line"], flush=True)
                elif event == "end":
                    print(f"-- job {data['status']}" + (f": {data['error']}" if data.get("error") else ""))
            return 0
        after = 0
        while True:
            page = c.logs(args.job_id, after=after)
            for line in page["items"]:
                print(line["line"])
            if not page["items"]:
                break
            after = page["next_after"]
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = c.metrics(args.job_id, args.name)
    if args.json:
        _print_json(data)
        return 0
    by_step: dict[int, dict[str, float]] = {}
    for p in data["items"]:
        by_step.setdefault(p["step"], {})[p["name"]] = p["value"]
    names = [n for n in data["names"] if not n.startswith(("sel_member_acc", "test_member_acc"))]
    print("step  " + "  ".join(f"{n:>14}" for n in names))
    for step in sorted(by_step):
        row = by_step[step]
        print(f"{step:>4}  " + "  ".join(f"{row[n]:>14.4f}" if n in row else f"{'-':>14}" for n in names))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from service.report import format_results

    with _client(args) as c:
        job = c.job(args.job_id)
        results = c.results(args.job_id)
    if args.json:
        _print_json(results)
    else:
        print(format_results(job, results))
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.download:
            names = [a["name"] for a in c.artifacts(args.job_id)["items"]] if args.download == "all" else [
                args.download]
            out = Path(args.output or ".")
            for name in names:
                dest = out / name if (args.download == "all" or out.is_dir()) else out
                path = c.download(args.job_id, name, dest)
                print(f"{name} -> {path}")
            return 0
        items = c.artifacts(args.job_id)["items"]
    for a in items:
        print(f"{a['size']:>12,}  {_fmt_time(a['modified'])}  {a['name']}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.cancel(args.job_id)
    print(f"job {job['id']} {job['status']}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    with _client(args) as c:
        items = [c.method(args.name)] if args.name else c.methods()
    if args.json:
        _print_json(items)
        return 0
    for m in items:
        print(f"{m['name']}: {m.get('title') or ''}")
        if m.get("summary"):
            print(f"  {m['summary']}")
        print(f"  combine: {m.get('default_combine')}, min members: {m.get('min_members')}"
              + (f", spec: {m['spec']}" if m.get("spec") else ""))
        for hp, info in (m.get("hyperparameters") or {}).items():
            print(f"    {hp} = {json.dumps(info.get('default'))}  {info.get('description', '')}")
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        doc = c.attacks()
    items = [a for a in doc["attacks"] if not args.name or a["name"] == args.name]
    if args.name and not items:
        print(f"unknown attack {args.name!r}; expected one of {', '.join(a['name'] for a in doc['attacks'])}",
              file=sys.stderr)
        return 2
    if args.json:
        _print_json(items if args.name else doc)
        return 0
    for a in items:
        print(f"{a['name']} ({a['threat']}, {a['norm']}): {a['summary']}")
        print(f"  losses: {', '.join(a['losses'])}")
        for p, info in a["parameters"].items():
            ops = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<="}
            bounds = [f"{ops[k]} {v}" for k, v in info.items() if k in ops]
            enum = f"  one of {', '.join(map(str, info['enum']))}" if info.get("enum") else ""
            print(f"    {p} = {json.dumps(info.get('default'))}" + (f"  [{', '.join(bounds)}]" if bounds else "")
                  + enum + (f"  {info['description']}" if info.get("description") else ""))
    if not args.name:
        print("losses: " + "; ".join(f"{k}: {v}" for k, v in doc["losses"].items()))
    return 0


# ------------------------------------------------------------------------------------------ library commands
def cmd_train_local(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ensemble_core.spec import TrainSpec
    from service.submission import pydantic_errors

    spec_dict = build_spec(args.spec, args.set or [])
    try:
        spec = TrainSpec.model_validate(spec_dict)
    except ValidationError as e:
        for item in pydantic_errors(e, [], TrainSpec):
            print(f"invalid spec: {item['field'] or 'spec'}: {item['msg']}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.threads))
    from ensemble_core.training import train_local

    result, path = train_local(spec, args.out, resume=not args.no_resume)
    print(json.dumps(result.metrics, indent=2))
    print(f"ensemble: {path}")
    return 0


# ------------------------------------------------------------------------------------------ parser
def build_parser(entry: EntryPoint = SERVICE_ONLY) -> argparse.ArgumentParser:
    """Every command's parser; ``entry`` supplies the ``worker`` command (see :class:`EntryPoint`)."""
    p = argparse.ArgumentParser(prog="robust-ensembles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(entry=entry)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None,
                        help="state directory (default $RE_DATA_DIR or ~/.robust-ensembles)")
    common.add_argument("--database-url", default=None, help="PostgreSQL URL (default $DATABASE_URL, else embedded)")
    common.add_argument("-v", "--verbose", action="store_true")

    def service_parser(name: str, help_: str, with_common: bool = True) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common] if with_common else [])

    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--api", default=None, help="API base URL (default $RE_API_URL or http://127.0.0.1:8000)")
        sp.add_argument("--token", default=None, help="API token (default $RE_API_TOKEN)")
        return sp

    sp = service_parser("up", "embedded Postgres + migrations + local Ray + API + one worker, until Ctrl-C")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--address", default=None, help="connect the worker to this Ray cluster instead of a local one")
    sp.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    sp.add_argument("--no-worker", action="store_true", help="API only")
    sp.set_defaults(func=cmd_up)

    sp = service_parser("demo", "start the stack, train a 3-member baseline on MNIST, evaluate it, print results")
    sp.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    sp.add_argument("--epochs", type=int, default=2)
    sp.add_argument("--train-subset", type=int, default=10_000)
    sp.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    sp.add_argument("--n-examples", type=int, default=300, help="test images attacked")
    sp.add_argument("--keep-running", action="store_true", help="leave the service up afterwards")
    sp.set_defaults(func=cmd_demo)

    sp = service_parser("serve", "the API only (workers run elsewhere)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--host", default="127.0.0.1")
    sp.set_defaults(func=cmd_serve)

    sp = service_parser("worker", "lease jobs and run them with Ray")
    sp.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    sp.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    sp.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    sp.add_argument("--lease-seconds", type=float, default=None, help="lease length (default $RE_LEASE_SECONDS or 30)")
    sp.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    sp.set_defaults(func=entry.worker or cmd_worker_missing)

    sp = service_parser("db", "database migrations (Alembic)", with_common=False)
    dbsub = sp.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = dbsub.add_parser("upgrade", help="migrate to a revision (default head)", parents=[common])
    up.add_argument("revision", nargs="?", default="head")
    down = dbsub.add_parser("downgrade", help="migrate down to a revision (e.g. base)", parents=[common])
    down.add_argument("revision")
    dbsub.add_parser("current", help="print the current revision", parents=[common])
    sp.set_defaults(func=cmd_db)

    sp = service_parser("token", "API tokens of the service (stored hashed in its database)", with_common=False)
    toksub = sp.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tc = toksub.add_parser("create", help="create a token (printed once)", parents=[common])
    tc.add_argument("--owner", required=True, help="the tenant the token acts for (its jobs)")
    tc.add_argument("--admin", action="store_true", help="admin scope: sees every owner's jobs")
    tc.add_argument("--name", default=None, help="a label shown by `token list`")
    tc.add_argument("--json", action="store_true")
    tl = toksub.add_parser("list", help="tokens (never their secrets)", parents=[common])
    tl.add_argument("--all", action="store_true", help="include revoked tokens")
    tl.add_argument("--json", action="store_true")
    tr = toksub.add_parser("revoke", help="revoke a token by id or prefix", parents=[common])
    tr.add_argument("token_id", help="the token's id, or at least 6 characters of its prefix (re_...)")
    sp.set_defaults(func=cmd_token)

    sp = client_parser("submit", "submit a job")
    sp.add_argument("kind", choices=["train", "evaluate", "tune"])
    sp.add_argument("--spec", help="JSON file with the spec ('-' = stdin)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key (dotted; JSON values)")
    sp.add_argument("--priority", type=int, default=0)
    sp.add_argument("--max-attempts", type=int, default=None)
    sp.add_argument("--idempotency-key", default=None)
    sp.add_argument("--tag", action="append", help="a tag of the job (repeat)")
    sp.add_argument("--note", help="a free-text note on the job")
    sp.add_argument("--watch", action="store_true", help="follow the job until it finishes")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_submit)

    sp = client_parser("status", "one job, or a list of jobs")
    sp.add_argument("job_id", nargs="?")
    sp.add_argument("--status", help="filter (comma-separated)")
    sp.add_argument("--kind", help="filter (comma-separated)")
    sp.add_argument("--method", help="filter: train / tune jobs' method (comma-separated)")
    sp.add_argument("--dataset", help="filter: train / tune jobs' data set (comma-separated)")
    sp.add_argument("--tag", action="append", help="filter: jobs with this tag (repeat: every one)")
    sp.add_argument("--search", help="text in the job's id, note, tags, error or spec")
    sp.add_argument("--since", help="created at or after (ISO date or time, e.g. 2026-12-01)")
    sp.add_argument("--until", help="created before (ISO date or time)")
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = client_parser("watch", "follow a job with a progress bar")
    sp.add_argument("job_id")
    sp.add_argument("--no-logs", action="store_true")
    sp.set_defaults(func=cmd_watch)

    sp = client_parser("logs", "a job's log lines")
    sp.add_argument("job_id")
    sp.add_argument("-f", "--follow", action="store_true", help="stream until the job finishes")
    sp.set_defaults(func=cmd_logs)

    sp = client_parser("metrics", "a job's metrics per epoch")
    sp.add_argument("job_id")
    sp.add_argument("--name")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_metrics)

    sp = client_parser("results", "a finished job's results")
    sp.add_argument("job_id")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_results)

    sp = client_parser("artifacts", "list or download a job's files")
    sp.add_argument("job_id")
    sp.add_argument("--download", metavar="NAME", help="an artifact name, or 'all'")
    sp.add_argument("-o", "--output", help="file or directory to write to (default .)")
    sp.set_defaults(func=cmd_artifacts)

    sp = client_parser("cancel", "cancel a job")
    sp.add_argument("job_id")
    sp.set_defaults(func=cmd_cancel)

    sp = client_parser("methods", "training methods and their hyperparameters")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_methods)

    sp = client_parser("attacks", "evaluation attacks with their losses and parameters (bounds, defaults)")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_attacks)

    from service.cli_models import add_models_parser

    add_models_parser(sub, client_parser)  # models upload | register | list | show | delete | export

    from service.cli_platform import add_platform_parsers

    # edit | delete | usage | retention | webhooks (client); cleanup | quota (database)
    add_platform_parsers(sub, client_parser, common)

    sp = sub.add_parser("train-local", help="train on this machine without the service",
                        description="train on this machine without the service (checkpoints every epoch, resumes)")
    sp.add_argument("--spec", required=True, help="JSON file with a train spec ('-' = stdin)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE")
    sp.add_argument("--out", required=True, help="output directory (checkpoint.pt, ensemble.pt, results.json)")
    sp.add_argument("--no-resume", action="store_true")
    sp.add_argument("--threads", type=int, default=2, help="torch threads")
    sp.set_defaults(func=cmd_train_local)

    # handled in main() before parsing (all its arguments belong to ensemble_core.reproduce)
    sub.add_parser("reproduce", help="the reproduction protocol (ensemble_core.reproduce); arguments passed on",
                   add_help=False)
    sub.add_parser("leaderboard", help="every method, one budget and protocol (ensemble_core.leaderboard); "
                   "arguments passed on", add_help=False)
    sub.add_parser("campaign", help="a declared, resumable grid of training and evaluation units "
                   "(ensemble_core.campaign); arguments passed on", add_help=False)
    return p


def main(argv: Sequence[str] | None = None, entry: EntryPoint = SERVICE_ONLY) -> int:
    """Run one command; the exit code. The console script calls this through :func:`workers.main.main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reproduce":  # everything after it belongs to ensemble_core.reproduce
        from ensemble_core.reproduce import main as reproduce_main

        return int(reproduce_main(argv[1:]) or 0)
    if argv and argv[0] == "leaderboard":  # likewise for ensemble_core.leaderboard
        from ensemble_core.leaderboard import main as leaderboard_main

        return int(leaderboard_main(argv[1:]) or 0)
    if argv and argv[0] == "campaign":  # likewise for ensemble_core.campaign
        from ensemble_core.campaign import main as campaign_main

        return int(campaign_main(argv[1:]) or 0)
    parser = build_parser(entry)
    args = parser.parse_args(argv)
    from service.client import ApiError

    try:
        return int(args.func(args) or 0)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import httpx

        if isinstance(e, httpx.ConnectError):
            api = getattr(args, "api", None) or os.environ.get("RE_API_URL") or "http://127.0.0.1:8000"
            print(f"error: cannot reach the API at {api} ({e}); is `robust-ensembles up` running?", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
