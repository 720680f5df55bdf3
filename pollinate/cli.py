"""``pollinate run | partition | report``: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pollinate.errors import ConfigError, PollinateError

log = logging.getLogger("pollinate")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run config (TOML); default: the digits demo")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key, e.g. --set run.rounds=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollinate", description="Federated learning: train where the data lives."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated experiment in simulation")
    _config_args(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    part = sub.add_parser("partition", help="show how a config splits its data over clients")
    _config_args(part)

    report = sub.add_parser("report", help="write report.html for a run folder")
    report.add_argument("run_dir", help="a run folder (holds history.json)")

    certs = sub.add_parser("certs", help="make a development CA and a TLS server certificate")
    certs.add_argument("out_dir", help="folder for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=None,
        help="a name or IP clients dial the server at (repeatable; default 127.0.0.1, localhost)",
    )
    certs.add_argument("--force", action="store_true", help="overwrite existing files")

    keys = sub.add_parser("keys", help="make client key pairs and add them to an allow-list")
    keys.add_argument("out_dir", help="folder for client-<id>.key / client-<id>.pub")
    keys.add_argument("client_ids", nargs="+", type=int, metavar="CLIENT_ID")
    keys.add_argument(
        "--allow-list",
        default=None,
        help="the server's allow-list file to append to (default OUT_DIR/allow-list.txt)",
    )
    keys.add_argument("--force", action="store_true", help="overwrite existing key files")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.experiment import run_experiment

    cfg = config.load(args.config, args.overrides)
    result = run_experiment(cfg, quiet=args.quiet)
    out = cfg.output_dir
    if not args.quiet:
        last = result.history.last
        acc = last.get("centralized", {}).get("accuracy")
        fed = last.get("federated", {}).get("accuracy")
        summary = []
        if acc is not None:
            summary.append(f"centralized accuracy {acc:.4f}")
        if fed is not None:
            summary.append(f"federated accuracy {fed:.4f}")
        print(f"finished {len(result.history.rounds)} rounds: {', '.join(summary)}")
        print(f"history: {out / 'history.json'}")
        print(f"plots:   {', '.join(str(p) for p in sorted(out.glob('*.png')))}")
        print(f"report:  {out / 'report.html'}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.experiment import build_data
    from pollinate.report import plot_label_distribution

    cfg = config.load(args.config, args.overrides)
    fed = build_data(cfg)
    counts = fed.label_counts()
    sizes = counts.sum(axis=1)
    print(f"{cfg.data.dataset}: {fed.num_clients} clients, partition {cfg.data.partition}")
    print(f"{'client':>8} {'examples':>9}  labels (count per class)")
    shown = min(fed.num_clients, 50)
    for cid in range(shown):
        print(f"{cid:>8} {int(sizes[cid]):>9}  {' '.join(str(int(c)) for c in counts[cid])}")
    if fed.num_clients > shown:
        print(f"… {fed.num_clients - shown} more clients")
    print(
        f"sizes: min {int(sizes.min())}, median {int(sorted(sizes)[len(sizes) // 2])}, "
        f"max {int(sizes.max())}"
    )
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    path = plot_label_distribution(counts, out / "partitions.png")
    print(f"plot: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pollinate.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "history.json").is_file():
        raise ConfigError(f"{run_dir} holds no history.json; pass a run folder written by a run")
    print(f"report: {write_report(run_dir)}")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from pollinate.security import DEFAULT_HOSTS, make_ca, make_server_cert

    out = Path(args.out_dir)
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    if args.force or not (ca_cert.exists() and ca_key.exists()):
        ca_cert, ca_key = make_ca(out, overwrite=args.force)
        print(f"CA:     {ca_cert} (give to clients), {ca_key} (keep private, off the server)")
    else:
        print(f"CA:     reusing {ca_cert}")
    hosts = args.hosts or list(DEFAULT_HOSTS)
    cert, key = make_server_cert(out, ca_cert, ca_key, hosts, overwrite=args.force)
    print(f"server: {cert}, {key} (for {', '.join(hosts)})")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from pollinate.security import make_client_key

    out = Path(args.out_dir)
    allow_list = Path(args.allow_list) if args.allow_list else out / "allow-list.txt"
    for client_id in args.client_ids:
        key, _ = make_client_key(out, client_id, allow_list, overwrite=args.force)
        print(f"client {client_id}: {key} (copy to that client only)")
    print(f"allow-list: {allow_list} (pass to pollinate server --allow-list)")
    return 0


COMMANDS = {
    "run": _cmd_run,
    "partition": _cmd_partition,
    "report": _cmd_report,
    "certs": _cmd_certs,
    "keys": _cmd_keys,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pollinate`` command."""
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PollinateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted; the rounds completed so far are saved in the run folder", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
