"""``pollinate run | analyze | partition | report | server | client | ...``: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError, PollinateError
from pollinate.transport import DEFAULT_RESULT_MEMORY_BYTES

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

    run = sub.add_parser(
        "run",
        help="run one federated experiment in simulation (an interrupted run of the same "
        "config in the run folder is resumed)",
    )
    _config_args(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="move an existing run folder aside (to <folder>.<timestamp>) and start again",
    )

    analyze = sub.add_parser(
        "analyze", help="answer an analytics config's queries over simulated clients"
    )
    analyze.add_argument("config", help="analytics config (TOML with [[query]] tables)")
    analyze.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key, e.g. --set policy.min_group_size=10 (repeatable)",
    )
    analyze.add_argument("-q", "--quiet", action="store_true", help="no progress output")

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

    server = sub.add_parser("server", help="run a config's rounds over connected clients (gRPC)")
    _config_args(server)
    server.add_argument("--address", default="127.0.0.1:8080", help="HOST:PORT to listen on")
    _security_args(server, "server.crt, server.key and allow-list.txt")
    server.add_argument("--cert", help="TLS certificate (default CERTS/server.crt)")
    server.add_argument("--key", help="TLS private key (default CERTS/server.key)")
    server.add_argument(
        "--allow-list", help="client ids and public keys let in (default CERTS/allow-list.txt)"
    )
    server.add_argument(
        "--fresh", action="store_true", help="start over: move the saved run state aside"
    )
    server.add_argument(
        "--heartbeat-s",
        type=float,
        default=2.0,
        help="heartbeat period; a client silent for 3 periods is dead (default 2)",
    )
    server.add_argument(
        "--result-memory-mib",
        type=int,
        default=DEFAULT_RESULT_MEMORY_BYTES >> 20,
        help="client results held in memory at once; past it clients wait (default 256)",
    )
    server.add_argument(
        "--grpc-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a gRPC channel argument, e.g. grpc.http2.bdp_probe=0 (repeatable)",
    )
    server.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    client = sub.add_parser("client", help="serve a server's tasks with local data (gRPC)")
    client.add_argument("--server", required=True, help="the server's HOST:PORT")
    client.add_argument("--config", help="run config whose data partition this client holds")
    client.add_argument("--partition", type=int, help="which partition of --config's data")
    client.add_argument("--app", help="package.module:function: your own client_fn")
    client.add_argument("--client-id", type=int, help="this client's id (with --app)")
    client.add_argument(
        "--expose",
        help="analytics: the columns this data holder answers about, comma-separated "
        "(default: the config's policy.exposed, else all)",
    )
    client.add_argument(
        "--min-group-size",
        type=int,
        help="analytics: refuse answers resting on fewer rows in any cell",
    )
    client.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    _security_args(client, "ca.crt and client-<id>.key")
    client.add_argument("--ca", help="CA certificate of the server (default CERTS/ca.crt)")
    client.add_argument("--key", help="this client's signing key (default CERTS/client-<id>.key)")
    client.add_argument(
        "--max-retries", type=int, default=None, help="give up after N failed connections"
    )
    client.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for training (default: the framework's; use 1 when many clients "
        "share one machine)",
    )

    status = sub.add_parser("status", help="show a running server's clients and progress")
    status.add_argument("address", help="the server's HOST:PORT")
    _security_args(status, "ca.crt")
    status.add_argument("--ca", help="CA certificate of the server (default CERTS/ca.crt)")
    return parser


def _security_args(parser: argparse.ArgumentParser, holds: str) -> None:
    parser.add_argument("--certs", help=f"folder made by pollinate certs/keys ({holds})")
    parser.add_argument(
        "--insecure", action="store_true", help="no TLS: for local testing only (warns)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.experiment import run_experiment

    cfg = config.load(args.config, args.overrides)
    result = run_experiment(cfg, quiet=args.quiet, fresh=args.fresh)
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
        n = len(result.history.rounds)
        print(f"finished {n} round{'' if n == 1 else 's'}: {', '.join(summary)}")
        print(f"history: {out / 'history.json'}")
        print(f"plots:   {', '.join(str(p) for p in sorted(out.glob('*.png')))}")
        print(f"report:  {out / 'report.html'}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pollinate.analytics import config
    from pollinate.analytics.session import ANALYTICS_JSON, format_table
    from pollinate.experiment import run_analytics

    cfg = config.load(args.config, args.overrides)
    answers = run_analytics(cfg, quiet=args.quiet)
    print(format_table(answers))
    if not args.quiet:
        print(f"answers: {cfg.output_dir / ANALYTICS_JSON}")
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


def _path(explicit: str | None, certs: str | None, name: str) -> Path | None:
    if explicit:
        return Path(explicit)
    if certs:
        return Path(certs) / name
    return None


def _cmd_server(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.analytics.config import is_analytics
    from pollinate.deploy import Security, serve

    analytics = args.config is not None and is_analytics(args.config)
    allow_list = _path(args.allow_list, args.certs, "allow-list.txt")
    if allow_list is not None and not allow_list.is_file():
        if args.allow_list:
            raise ConfigError(
                f"allow-list {allow_list} does not exist (make it with pollinate keys)"
            )
        allow_list = None
    if allow_list is None:
        log.warning("no allow-list: any client may join (make one with pollinate keys)")
    if args.insecure:
        log.warning("running WITHOUT TLS (--insecure): traffic is readable and forgeable")
    security = Security(
        cert=_path(args.cert, args.certs, "server.crt"),
        key=_path(args.key, args.certs, "server.key"),
        allow_list=allow_list,
        insecure=args.insecure,
    )
    transport = _transport_args(args)
    if analytics:
        from pollinate.analytics import config as analytics_config
        from pollinate.analytics.session import format_table
        from pollinate.deploy import serve_analytics

        acfg = analytics_config.load(args.config, args.overrides)
        answers = serve_analytics(acfg, args.address, security, quiet=args.quiet, **transport)
        print(format_table(answers))
        return 0
    cfg = config.load(args.config, args.overrides)
    result = serve(cfg, args.address, security, fresh=args.fresh, quiet=args.quiet, **transport)
    if not args.quiet:
        n = len(result.history.rounds)
        print(f"finished {n} round{'' if n == 1 else 's'}; run folder: {cfg.output_dir}")
    return 0


def _transport_args(args: argparse.Namespace) -> dict[str, Any]:
    """``pollinate server``'s transport settings, checked, as keyword arguments of serve()."""
    if not args.heartbeat_s > 0:
        raise ConfigError(f"--heartbeat-s must be > 0, got {args.heartbeat_s}")
    if args.result_memory_mib < 1:
        raise ConfigError(f"--result-memory-mib must be >= 1, got {args.result_memory_mib}")
    options: list[tuple[str, int | str]] = []
    for item in args.grpc_option:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("grpc."):
            raise ConfigError(
                f"--grpc-option {item!r}: write KEY=VALUE with a gRPC channel argument, "
                "e.g. --grpc-option grpc.http2.bdp_probe=0"
            )
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return {
        "heartbeat_s": args.heartbeat_s,
        "result_memory_bytes": args.result_memory_mib << 20,
        "grpc_options": options,
    }


def _cmd_client(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.analytics.config import is_analytics
    from pollinate.deploy import Security, config_client_fn, connect, load_app

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # read by torch/numpy when they load
    if args.app:
        if args.client_id is None:
            raise ConfigError("--app needs --client-id N")
        client_fn, client_id = load_app(args.app), args.client_id
    elif args.config is not None and args.partition is not None:
        client_id = args.partition if args.client_id is None else args.client_id
        if is_analytics(args.config):
            client_fn = _analytics_client(args, client_id)
        else:
            client_fn = config_client_fn(config.load(args.config, args.overrides), args.partition)
    else:
        raise ConfigError("give --config CONFIG --partition I, or --app package.module:function")
    security = Security(
        key=_path(args.key, args.certs, f"client-{client_id}.key"),
        ca=_path(args.ca, args.certs, "ca.crt"),
        insecure=args.insecure,
    )
    connect(args.server, client_fn, client_id, security, max_retries=args.max_retries)
    return 0


def _analytics_client(args: argparse.Namespace, client_id: int) -> Any:
    """The data holder for an analytics config, with its own --expose / --min-group-size."""
    from pollinate.analytics import config
    from pollinate.deploy import analytics_client_fn

    cfg = config.load(args.config, args.overrides)
    policy = cfg.policy
    if args.expose is not None:
        policy.exposed = [c.strip() for c in args.expose.split(",") if c.strip()]
    if args.min_group_size is not None:
        if args.min_group_size < 1:
            raise ConfigError(f"--min-group-size must be >= 1, got {args.min_group_size}")
        policy.min_group_size = args.min_group_size
    return analytics_client_fn(cfg, args.partition, client_id)


def _cmd_status(args: argparse.Namespace) -> int:
    from pollinate.deploy import Security, fetch_status

    security = Security(ca=_path(args.ca, args.certs, "ca.crt"), insecure=args.insecure)
    status = fetch_status(args.address, security)
    connected = status.pop("connected", [])
    status.pop("clients", None)
    status.pop("checked_at", None)
    for key, value in status.items():
        print(f"{key}: {value}")
    print(f"clients connected: {len(connected)}")
    if connected:
        print("  " + " ".join(str(c) for c in connected))
    return 0


COMMANDS = {
    "run": _cmd_run,
    "analyze": _cmd_analyze,
    "partition": _cmd_partition,
    "report": _cmd_report,
    "certs": _cmd_certs,
    "keys": _cmd_keys,
    "server": _cmd_server,
    "client": _cmd_client,
    "status": _cmd_status,
}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pollinate`` command."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C core logs handshakes otherwise
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: completed rounds, plots, report
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
