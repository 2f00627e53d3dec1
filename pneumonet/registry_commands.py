"""``pneumonet models``: list versions, promote, roll back, show the history, resolve and pin aliases.

The parser is built here (argparse only, so ``--help`` stays instant) and hooked into ``pneumonet``'s
command list by :func:`add_models_parser`; the work is :mod:`pneumonet.registry` and :mod:`pneumonet.deploy`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from pneumonet.commandline import examples, verbose_parent

log = logging.getLogger(__name__)
STORAGE_ENV = "PNEUMONET_STORAGE"
MODELS_EPILOG = examples(
    "pneumonet models --storage s3://pneumonet",
    'pneumonet models promote transfer/20261204-101500-ab12 --alias production --reason "site check passed"',
    'pneumonet models rollback --alias production --reason "false positives at site A"',
    "pneumonet models pin production k8s/overlays/dev && kubectl apply -k k8s/overlays/dev/serve",
)


def _registry(args: argparse.Namespace, fallback: str | None = None):
    from pneumonet.errors import ConfigError
    from pneumonet.registry import Registry

    root = args.storage or os.environ.get(STORAGE_ENV) or fallback
    if not root:
        raise ConfigError(f"which registry? pass --storage (the training job's --storage) or set {STORAGE_ENV}")
    return Registry(root)


def _print(args: argparse.Namespace, data: object, lines: list[str]) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else "\n".join(lines))


def cmd_list(args: argparse.Namespace) -> None:
    registry = _registry(args)
    aliases = registry.aliases()
    named: dict[str, list[str]] = {}
    for alias, state in aliases.items():
        named.setdefault(state["version"], []).append(alias)
    versions = [{**v.describe(), "aliases": sorted(named.get(v.id, []))} for v in registry.versions()]
    lines = [f"{'VERSION':<36} {'CREATED':<20} {'VAL ROC-AUC (95% CI)':<24} {'SENS':>5} {'SPEC':>5} {'THRESH':>6}  ALIASES"]
    for v in versions:
        val = v["val"]
        ci = val.get("roc_auc_ci95")
        auc = f"{val['roc_auc']:.4f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "") if "roc_auc" in val else "-"
        fig = {k: f"{val[k]:.3f}" if k in val else "-" for k in ("sensitivity", "specificity")}
        lines.append(f"{v['version']:<36} {str(v['created_at'])[:19]:<20} {auc:<24} {fig['sensitivity']:>5} "
                     f"{fig['specificity']:>5} {v['threshold']:>6.3f}  {', '.join(v['aliases'])}")  # fmt: skip
    if not versions:
        lines.append(f"(no versions in {registry.models})")
    _print(args, {"registry": registry.models, "versions": versions, "aliases": aliases}, lines)


def _mirror(args: argparse.Namespace, registry, record: dict) -> None:
    """The alias move in W&B too, when tracking is on (a failure there is a warning: the move happened)."""
    from pneumonet import tracking
    from pneumonet.errors import TrackingError

    config, mode = args.tracking_config, args.tracking_mode
    if mode == "disabled":
        return
    version = registry.get(record["to"])
    try:
        with tracking.start_run(config, job_type="promote", name=f"{record['alias']}-{record['seq']}", out=registry.storage,
                                mode=mode, extra_config={"registry": registry.models, "move": record}) as run:  # fmt: skip
            run.log_alias(version.uri, version.meta, record["alias"])
            run.summary({"alias": record["alias"], "to": record["to"], "from": record["from"], "action": record["action"]})
    except TrackingError as exc:
        log.warning("the alias moved, but W&B did not record it: %s", exc)


def _tracking(args: argparse.Namespace) -> None:
    """Resolve (and, online, verify) tracking before anything moves."""
    from pneumonet import tracking
    from pneumonet.config import load_config

    args.tracking_config = load_config(args.config, [f"tracking.mode={args.tracking}"] if args.tracking else [])
    args.tracking_mode = tracking.preflight(args.tracking_config)


def _moved(args: argparse.Namespace, registry, record: dict) -> None:
    _mirror(args, registry, record)
    figures = record["metrics"]["to"]
    auc = f", val ROC-AUC {figures['roc_auc']:.4f}" if "roc_auc" in figures else ""
    _print(args, record, [f"{record['alias']}: {record['from'] or '(none)'} → {record['to']}{auc} "
                          f"({record['action']} #{record['seq']} by {record['who']}{', forced' if record['forced'] else ''})",
                          f"pointer: {registry.pointer_uri(record['alias'])}"])  # fmt: skip


def cmd_promote(args: argparse.Namespace) -> None:
    registry = _registry(args)
    _tracking(args)
    record = registry.promote(args.version, args.alias, force=args.force, reason=args.reason, who=args.who)
    _moved(args, registry, record)


def cmd_rollback(args: argparse.Namespace) -> None:
    registry = _registry(args)
    _tracking(args)
    _moved(args, registry, registry.rollback(args.alias, reason=args.reason, who=args.who))


def cmd_history(args: argparse.Namespace) -> None:
    records = _registry(args).history(args.alias)
    lines = [f"#{r['seq']:<4} {r['when']}  {r['action']:<8} {r['from'] or '(none)'} → {r['to']}  by {r['who']}"
             + (" (forced)" if r["forced"] else "") + (f": {r['reason']}" if r["reason"] else "") for r in records]  # fmt: skip
    _print(args, records, lines or [f"alias {args.alias} has no history"])


def cmd_resolve(args: argparse.Namespace) -> None:
    version = _registry(args).resolve(args.alias)
    _print(args, version.describe(), [version.uri])


def cmd_pin(args: argparse.Namespace) -> None:
    from pneumonet.deploy import pin, pinned_model, serve_patch
    from pneumonet.registry import version_of

    patch = serve_patch(args.overlay)
    located = version_of(pinned_model(patch))
    registry = _registry(args, fallback=located[0] if located else None)
    version = registry.resolve(args.alias)
    old = pin(patch, version.uri)
    _print(args, {"patch": str(patch), "from": old, "to": version.uri, "version": version.id},
           [f"{patch}: model {old} → {version.uri} ({args.alias} = {version.id})",
            f"roll it out: kubectl apply -k {args.overlay.rstrip('/')}/serve"])  # fmt: skip


def add_models_parser(commands: argparse._SubParsersAction) -> None:
    """``pneumonet models [SUBCOMMAND]`` (no subcommand: list the versions)."""
    common = argparse.ArgumentParser(add_help=False, parents=[verbose_parent()])
    # SUPPRESS: given after the subcommand it wins, not given it leaves the one before the subcommand alone.
    common.add_argument("--storage", default=argparse.SUPPRESS,
                        help=f"the registry: the training job's --storage, a folder or s3:// prefix (default: ${STORAGE_ENV})")  # fmt: skip
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    moving = argparse.ArgumentParser(add_help=False)
    moving.add_argument("--alias", required=True, help="the alias to move, e.g. production")
    moving.add_argument("--reason", help="why, for the audit log")
    moving.add_argument("--who", help="who, for the audit log (default: user@host)")
    moving.add_argument("--config", help="YAML config whose tracking section is used (pneumonet/config.py)")
    moving.add_argument("--tracking", choices=("auto", "online", "offline", "disabled"),
                        help="mirror the alias to W&B (default: tracking.mode, auto = online with WANDB_API_KEY, else offline)")  # fmt: skip

    models = commands.add_parser("models", help="model versions and aliases: list, promote, rollback, history, pin",
                                 parents=[verbose_parent()], epilog=MODELS_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    models.add_argument("--storage", help=f"the registry: the training job's --storage (default: ${STORAGE_ENV})")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_list)
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")

    def command(name: str, parents: list[argparse.ArgumentParser], help: str, *example_lines: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=parents, help=help, description=help, epilog=examples(*example_lines),
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    command("list", [common], "versions with validation figures and aliases",
            "pneumonet models list --storage s3://pneumonet --json").set_defaults(func=cmd_list)  # fmt: skip
    promote = command("promote", [common, moving], "point an alias at a version (audit-logged)",
                      'pneumonet models promote custom/20261204-101500-ab12 --alias production --reason "site check passed"')  # fmt: skip
    promote.add_argument("version", metavar="VERSION", help="<variant>/<run-id> (see pneumonet models) or its folder URI")
    promote.add_argument("--force", action="store_true", help="promote even with a lower validation ROC-AUC than the current one")
    promote.set_defaults(func=cmd_promote)
    command("rollback", [common, moving], "move an alias back to the version before its last promotion",
            'pneumonet models rollback --alias production --reason "false positives at site A"').set_defaults(func=cmd_rollback)  # fmt: skip
    history = command("history", [common], "the audit log of an alias, oldest first",
                      "pneumonet models history --alias production --storage s3://pneumonet")  # fmt: skip
    history.add_argument("--alias", required=True, help="e.g. production")
    history.set_defaults(func=cmd_history)
    resolve = command("resolve", [common], "print the version folder an alias names now", "pneumonet models resolve production")
    resolve.add_argument("alias", metavar="ALIAS", help="e.g. production")
    resolve.set_defaults(func=cmd_resolve)
    pin = command("pin", [common], "write the version an alias names into an overlay's RayService",
                  "pneumonet models pin production k8s/overlays/dev && kubectl apply -k k8s/overlays/dev/serve")  # fmt: skip
    pin.add_argument("alias", metavar="ALIAS", help="e.g. production")
    pin.add_argument("overlay", metavar="OVERLAY", help="e.g. k8s/overlays/dev (its RayService patch is edited)")
    pin.set_defaults(func=cmd_pin)
