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

from pollinate.errors import ConfigError, PollinateError, dependency_error
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
    from pollinate import __version__

    parser = argparse.ArgumentParser(
        prog="pollinate", description="Federated learning: train where the data lives."
    )
    parser.add_argument("--version", action="version", version=f"pollinate {__version__}")
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
    _limit_args(server)
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
    client.add_argument(
        "--app",
        help="package.module:function: your own client_fn (the current folder is importable)",
    )
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
    client.add_argument("-q", "--quiet", action="store_true", help="errors only (no line per task)")
    client.add_argument(
        "--max-retries", type=int, default=None, help="give up after N failed connections"
    )
    client.add_argument(
        "--state-dir",
        help="folder where the client keeps its state between rounds (SCAFFOLD's control "
        "variate, local DP's release count), saved after every task and loaded at start "
        "(default ./pollinate-client-<id>-state; written only when there is state to keep)",
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
    _security_args(status, "ca.crt and client-<id>.key")
    status.add_argument("--ca", help="CA certificate of the server (default CERTS/ca.crt)")
    status.add_argument(
        "--client-id",
        type=int,
        help="sign the request as this allow-listed client: a server with an allow-list shows "
        "its clients and tasks only then (default: counts only)",
    )
    status.add_argument("--key", help="that client's signing key (default CERTS/client-<id>.key)")
    return parser


def _limit_args(server: argparse.ArgumentParser) -> None:
    """``pollinate server``'s bounds on what one client may take (see README, Deployment)."""
    from pollinate.limits import DEFAULT_MAX_METRICS_BYTES, DEFAULT_MAX_METRICS_KEYS
    from pollinate.transport import (
        DEFAULT_MAX_CORRUPT_UPLOADS,
        DEFAULT_MAX_STREAMS,
        DEFAULT_MAX_UNREGISTERED,
        DEFAULT_MIN_RESULT_BYTES,
        DEFAULT_REGISTER_TIMEOUT_S,
        DEFAULT_RESULT_SIZE_FACTOR,
        DEFAULT_STALL_S,
    )

    add = server.add_argument
    add(
        "--result-size-factor",
        type=float,
        default=DEFAULT_RESULT_SIZE_FACTOR,
        help="a client's result may take this many times the model sent to it "
        f"(default {DEFAULT_RESULT_SIZE_FACTOR:g}) ...",
    )
    add(
        "--min-result-mib",
        type=int,
        default=DEFAULT_MIN_RESULT_BYTES >> 20,
        help=f"... and at least this many MiB (default {DEFAULT_MIN_RESULT_BYTES >> 20})",
    )
    add(
        "--stall-s",
        type=float,
        default=DEFAULT_STALL_S,
        help="a client whose result stops arriving for this long is dropped "
        f"(default {DEFAULT_STALL_S:g})",
    )
    add(
        "--max-streams",
        type=int,
        default=DEFAULT_MAX_STREAMS,
        help=f"client connections open at once (default {DEFAULT_MAX_STREAMS})",
    )
    add(
        "--max-unregistered",
        type=int,
        default=DEFAULT_MAX_UNREGISTERED,
        help="connections that have not registered yet; more are refused and retry "
        f"(default {DEFAULT_MAX_UNREGISTERED})",
    )
    add(
        "--register-timeout-s",
        type=float,
        default=DEFAULT_REGISTER_TIMEOUT_S,
        help=f"a connection must register within this (default {DEFAULT_REGISTER_TIMEOUT_S:g})",
    )
    add(
        "--max-metrics-keys",
        type=int,
        default=DEFAULT_MAX_METRICS_KEYS,
        help=f"metrics per result (default {DEFAULT_MAX_METRICS_KEYS})",
    )
    add(
        "--max-metrics-kib",
        type=int,
        default=DEFAULT_MAX_METRICS_BYTES >> 10,
        help=f"KiB of metrics per result, as JSON (default {DEFAULT_MAX_METRICS_BYTES >> 10})",
    )
    add(
        "--max-corrupt-uploads",
        type=int,
        default=DEFAULT_MAX_CORRUPT_UPLOADS,
        help="a result that fails its SHA-256 is rejected and the client stays; a client whose "
        "uploads fail it this many times in a row is dropped "
        f"(default {DEFAULT_MAX_CORRUPT_UPLOADS})",
    )


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
        unit = "server step" if cfg.strategy.name == "fedbuff" else "round"
        print(f"finished {n} {unit}{'' if n == 1 else 's'}: {', '.join(summary)}")
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
    if allow_list == out / "allow-list.txt":
        where = f"pollinate server --certs {out} reads it"
    else:
        where = f"pass it to pollinate server with --allow-list {allow_list}"
    print(f"allow-list: {allow_list} ({where}; delete a line to revoke that client)")
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
        unit = "server step" if cfg.strategy.name == "fedbuff" else "round"
        print(f"finished {n} {unit}{'' if n == 1 else 's'}; run folder: {cfg.output_dir}")
    return 0


def _transport_args(args: argparse.Namespace) -> dict[str, Any]:
    """``pollinate server``'s transport settings, checked, as keyword arguments of serve()."""
    if not args.heartbeat_s > 0:
        raise ConfigError(f"--heartbeat-s must be > 0, got {args.heartbeat_s}")
    if args.result_memory_mib < 1:
        raise ConfigError(f"--result-memory-mib must be >= 1, got {args.result_memory_mib}")
    for flag in ("stall_s", "register_timeout_s"):
        value = getattr(args, flag)
        if not 0 < value < float("inf"):
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if not 1 <= args.result_size_factor < float("inf"):
        raise ConfigError(f"--result-size-factor must be >= 1, got {args.result_size_factor}")
    for flag in (
        "min_result_mib",
        "max_streams",
        "max_unregistered",
        "max_metrics_keys",
        "max_metrics_kib",
        "max_corrupt_uploads",
    ):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
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
        "stall_s": args.stall_s,
        "max_streams": args.max_streams,
        "max_unregistered": args.max_unregistered,
        "register_timeout_s": args.register_timeout_s,
        "max_metrics_keys": args.max_metrics_keys,
        "max_metrics_bytes": args.max_metrics_kib << 10,
        "max_corrupt_uploads": args.max_corrupt_uploads,
        "result_size_factor": args.result_size_factor,
        "min_result_bytes": args.min_result_mib << 20,
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
    state_dir = args.state_dir or f"pollinate-client-{client_id}-state"
    connect(
        args.server,
        client_fn,
        client_id,
        security,
        max_retries=args.max_retries,
        state_dir=state_dir,
    )
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

    key = None
    if args.client_id is not None:
        key = _path(args.key, args.certs, f"client-{args.client_id}.key")
        if key is None:
            raise ConfigError("--client-id needs --key KEY or --certs DIR (its client-<id>.key)")
    elif args.key:
        raise ConfigError("--key needs --client-id N: the allow-listed id the key belongs to")
    security = Security(ca=_path(args.ca, args.certs, "ca.crt"), key=key, insecure=args.insecure)
    status = fetch_status(args.address, security, client_id=args.client_id)
    connected = status.pop("connected", None)
    count = status.pop("clients", len(connected or []))
    details = status.pop("details", None)
    status.pop("authenticated", None)
    status.pop("checked_at", None)
    for name, value in status.items():
        print(f"{name}: {value}")
    print(f"clients connected: {count}")
    if connected:
        print("  " + " ".join(str(c) for c in connected))
    if details is not None:
        print(f"(counts only: {details})")
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


class _Formatter(logging.Formatter):
    """Progress (INFO) as ``pollinate: message``; warnings and errors with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.INFO:
            return f"{record.name}: {text}"
        return f"{record.levelname} {record.name}: {text}"


def setup_logging(quiet: bool = False) -> None:
    """pollinate's progress (INFO) and warnings on stderr, errors only with ``quiet``; other
    libraries' warnings too. Leaves logging alone where the program has set it up already."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    handler.setLevel(logging.ERROR if quiet else logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("pollinate").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pollinate`` command."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C core logs handshakes otherwise
    setup_logging(quiet=getattr(args, "quiet", False))
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: completed rounds, plots, report
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PollinateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        hint = dependency_error(exc)  # an optional package imported where nothing checked it
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted; the rounds completed so far are saved in the run folder", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
