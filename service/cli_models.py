"""``robust-ensembles models upload | register | list | show | delete | export``: the model registry from the shell.

    robust-ensembles models upload m0.safetensors m1.safetensors --name mine --architecture lenet5 --dataset mnist
    robust-ensembles models register <train job id> --name baseline --version 2 --tag mnist
    robust-ensembles models list
    robust-ensembles models show <model id>
    robust-ensembles models export <model id> --format robustbench -o Mine2026.json
    robust-ensembles models export <model id> --format huggingface -o mine/
    robust-ensembles models delete <model id>
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _client(args: argparse.Namespace) -> Any:
    from service.client import Client

    return Client(args.api, token=getattr(args, "token", None))


def _floats(raw: str | None) -> list[float] | None:
    return None if raw is None else [float(v) for v in raw.split(",") if v.strip()]


def _line(m: dict[str, Any]) -> str:
    tags = ",".join(m.get("tags") or []) or "-"
    return (f"{m['id']}  {m['name']:<24} v{m['version']:<6} {m['members']} x {m['architecture']:<10} "
            f"{m['dataset']:<13} {m['combine']:<14} {m['source']:<9} tags {tags}")


def cmd_models(args: argparse.Namespace) -> int:
    """Dispatch ``models <action>``."""
    with _client(args) as c:
        action = args.models_command
        if action == "upload":
            paper = json.loads(Path(args.paper).read_text()) if args.paper else None
            training: Any = Path(args.training).read_text() if args.training else None
            m = c.upload_model(args.weights, name=args.name, architecture=args.architecture, dataset=args.dataset,
                               version=args.version, tags=args.tag or [], combine=args.combine,
                               input_range=tuple(_floats(args.input_range) or (0.0, 1.0)),  # type: ignore[arg-type]
                               mean=_floats(args.mean), std=_floats(args.std),
                               architecture_kwargs=json.loads(args.architecture_kwargs)
                               if args.architecture_kwargs else None, training=training, paper=paper)
            print(json.dumps(m, indent=2, default=str) if args.json else f"registered {_line(m)}")
        elif action == "register":
            m = c.register_model(args.job_id, name=args.name, version=args.version, tags=args.tag or [])
            print(json.dumps(m, indent=2, default=str) if args.json else f"registered {_line(m)}")
        elif action == "list":
            out = c.models(name=args.name, tag=args.tag, limit=args.limit)
            if args.json:
                print(json.dumps(out, indent=2, default=str))
            else:
                for m in out["items"]:
                    print(_line(m))
                print(f"{len(out['items'])} of {out['total']} model(s)")
        elif action == "show":
            m = c.model(args.model_id)
            evals = c.model_evaluations(args.model_id)["items"]
            if args.json:
                print(json.dumps({**m, "evaluations": evals}, indent=2, default=str))
            else:
                print(_line(m))
                val = m["config"].get("validation") or {}
                if val:
                    print(f"validation: {val.get('source')}: accuracy {val.get('accuracy')}")
                for e in evals:
                    print(f"  evaluation {e['id']}  {e['status']}")
        elif action == "delete":
            m = c.delete_model(args.model_id)
            print(f"deleted {_line(m)}")
        elif action == "export":
            if args.format == "robustbench":
                rec = c.export_robustbench(args.model_id, job_id=args.job_id, eps=args.eps,
                                           threat_model=args.threat_model)
                text = json.dumps(rec, indent=2) + "\n"
                if args.output:
                    Path(args.output).write_text(text)
                    print(f"wrote {args.output}")
                else:
                    print(text, end="")
            else:
                out = c.export_huggingface(args.model_id, args.output or f"model-{args.model_id}")
                print(f"wrote {out}/ (config.json, model.safetensors, README.md)")
    return 0


def add_models_parser(sub: Any, client_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``models`` and its actions to the CLI's subparsers."""
    sp = client_parser("models", "the model registry: upload, register, list, show, delete, export ensembles")
    act = sp.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    conn = argparse.ArgumentParser(add_help=False)  # --api / --token also after the action
    conn.add_argument("--api", default=argparse.SUPPRESS, help="API base URL (default $RE_API_URL)")
    conn.add_argument("--token", default=argparse.SUPPRESS, help="API token (default $RE_API_TOKEN)")

    def action(name: str, help_: str) -> argparse.ArgumentParser:
        p = act.add_parser(name, help=help_, description=help_, parents=[conn])
        return p

    up = action("upload", "upload member weights (safetensors) as a model")
    up.add_argument("weights", nargs="+", help="safetensors files: one per member, or one with members.<i>.*")
    up.add_argument("--name", required=True)
    up.add_argument("--architecture", required=True, help="a registered architecture (lenet5, resnet20, ...)")
    up.add_argument("--dataset", required=True)
    up.add_argument("--version", default="1")
    up.add_argument("--tag", action="append", help="repeatable")
    up.add_argument("--combine", default="mean_logits")
    up.add_argument("--input-range", default="0,1", help="pixel range the members were trained on (0,1 / 0,255)")
    up.add_argument("--mean", help="normalisation mean, comma-separated")
    up.add_argument("--std", help="normalisation std, comma-separated")
    up.add_argument("--architecture-kwargs", help="JSON object")
    up.add_argument("--training", help="a file describing how the members were trained (text or JSON)")
    up.add_argument("--paper", help="a JSON file: title, link, authors, venue, reported, additional_data")
    up.add_argument("--json", action="store_true")
    rg = action("register", "register a succeeded train job's ensemble")
    rg.add_argument("job_id")
    rg.add_argument("--name", required=True)
    rg.add_argument("--version", default="1")
    rg.add_argument("--tag", action="append")
    rg.add_argument("--json", action="store_true")
    ls = action("list", "your models")
    ls.add_argument("--name")
    ls.add_argument("--tag")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    sh = action("show", "one model and its evaluations")
    sh.add_argument("model_id")
    sh.add_argument("--json", action="store_true")
    de = action("delete", "delete a model and its files")
    de.add_argument("model_id")
    ex = action("export", "a RobustBench record or a Hugging Face-layout folder")
    ex.add_argument("model_id")
    ex.add_argument("--format", choices=["robustbench", "huggingface"], default="robustbench")
    ex.add_argument("-o", "--output", help="file (robustbench; default stdout) or folder (huggingface)")
    ex.add_argument("--job-id", help="the evaluate job (default: the newest succeeded)")
    ex.add_argument("--eps", type=float)
    ex.add_argument("--threat-model", choices=["Linf", "L2"], default="Linf")
    sp.set_defaults(func=cmd_models)


__all__ = ["add_models_parser", "cmd_models"]
