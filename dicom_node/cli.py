"""Command line: ``dicom-node serve | worker | check-config | echo | send | status | ...``.

``dicom-node evaluate`` (site acceptance testing) needs no config.

Parses arguments, loads the config, configures logging, calls into the app.
Exit codes: 0 success, 1 operation failed, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node import __version__, ops
from dicom_node.config import ConfigError, NodeConfig, load_config
from dicom_node.logs import LOG_FORMAT_ENV_VAR, LOG_FORMATS, configure_logging

log = logging.getLogger("dicom_node")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
CONFIGLESS_COMMANDS = frozenset({"evaluate"})  # local tools: no node config needed


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    """Any case, as $DICOM_NODE_LOG_LEVEL; anything else as typed, for argparse's error."""
    return text.upper() if text.upper() in LOG_LEVELS else text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom_node {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DICOM_NODE_LOG_LEVEL", "INFO"),
        type=_log_level,
        choices=LOG_LEVELS,
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get(LOG_FORMAT_ENV_VAR, "text"),
        choices=LOG_FORMATS,
        help=f"text or one JSON object per line (default: ${LOG_FORMAT_ENV_VAR} or text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    with_config(sub, "serve", "run the node until SIGTERM/SIGINT")
    with_config(sub, "check-config", "validate a config file")
    echo = with_config(sub, "echo", "C-ECHO a configured destination")
    echo.add_argument("destination")
    send = with_config(sub, "send", "C-STORE files or folders to a configured destination")
    send.add_argument("destination")
    send.add_argument("paths", nargs="+", type=Path)
    _ops_commands(sub)
    _cluster_commands(sub)
    _evaluate_command(sub)
    return parser


def with_config(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=help_text, description=help_text)
    command.add_argument(
        "--config", help="YAML config file (default: $DICOM_NODE_CONFIG)", default=None
    )
    return command


def _ops_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = sub.add_parser("rules", help="inspect the routing rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    explain = with_config(
        rules_sub, "explain", "show which routes match the series in DICOM files, and why"
    )
    explain.add_argument("paths", nargs="+", type=Path)
    status = with_config(sub, "status", "counts by state, recent and stuck jobs (journal)")
    status.add_argument(
        "--limit", type=_positive_int, default=10, help="recent jobs shown (default 10)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    retry = with_config(sub, "retry", "retry failed jobs and resend dead-letter jobs")
    retry.add_argument("job_ids", nargs="*", type=int, metavar="JOB_ID")
    retry.add_argument("--dead-letter", action="store_true", help="every dead-letter job")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.set_defaults(command_parser=retry)  # its usage, for the check in main()


def _positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more (SQLite reads a negative LIMIT as none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more")
    return value


def _cluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = with_config(
        sub, "worker", "run analysis jobs from the broker until SIGTERM (docs/scale-out.md)"
    )
    worker.add_argument(
        "--name", help="worker name in the shared storage (default: HOST-worker, numbered)"
    )
    worker.add_argument(
        "--concurrency", type=int, help="jobs at once (default: analysis.workers; one per GPU)"
    )
    worker.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve /metrics on web.host:PORT"
    )
    with_config(sub, "migrate", "create or upgrade the journal's tables, then exit")


def _evaluate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from dicom_node.config import AnalysisSection

    help_text = "compare a pipeline's segments with reference segmentations (no config)"
    evaluate = sub.add_parser("evaluate", help=help_text, description=help_text)
    evaluate.add_argument(
        "--pipeline", required=True, help="a built-in pipeline (ct-chest) or a model package"
    )
    evaluate.add_argument(
        "--models",
        type=Path,
        default=AnalysisSection.model_fields["models_path"].default,
        metavar="DIR",
        help="folder of model packages (default: %(default)s)",
    )
    evaluate.add_argument("dicom_dir", type=Path, metavar="DICOM_DIR")
    evaluate.add_argument("reference", type=Path, metavar="REFERENCE_DIR", help="or one file")
    evaluate.add_argument("--csv", type=Path, metavar="OUT.csv", help="write the rows as CSV")
    evaluate.add_argument(
        "--labels", metavar="MAP", help="YAML/JSON file or key=value,... (lung_left=10,11)"
    )
    evaluate.add_argument("--device", default="auto", help="auto (default), cpu or cuda")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "retry" and not (args.job_ids or args.dead_letter or args.failed):
        args.command_parser.error("give JOB_IDs, --dead-letter or --failed")
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:  # from $DICOM_NODE_LOG_LEVEL / $DICOM_NODE_LOG_FORMAT
        parser.error(str(exc))
    if args.command in CONFIGLESS_COMMANDS:
        return _dispatch_configless(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{exc.source}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args, config)
    except BrokenPipeError:  # `dicom-node status | head`: the reader has gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # or the interpreter's last flush fails again
        return EXIT_FAILED


def _dispatch_configless(args: argparse.Namespace) -> int:
    from dicom_node import evaluate

    return evaluate.run(
        args.pipeline,
        args.dicom_dir,
        args.reference,
        args.csv,
        args.labels,
        args.device,
        args.models,
    )


def _dispatch(args: argparse.Namespace, config: NodeConfig) -> int:
    if args.command == "check-config":
        print(f"{args.config or os.environ.get('DICOM_NODE_CONFIG')}: OK")
        return EXIT_OK
    if args.command == "serve":
        from dicom_node.app import run

        return run(config)
    if args.command == "worker":
        from dicom_node.cluster_worker import run_worker

        return run_worker(config, args.name, args.concurrency, args.metrics_port)
    if args.command == "migrate":
        return ops.migrate(config)
    if args.command == "echo":
        return _echo(config, args.destination)
    if args.command == "rules":
        return ops.explain_rules(config, args.paths)
    if args.command == "status":
        return ops.status(config, args.limit, args.json)
    if args.command == "retry":
        return ops.retry(config, args.job_ids, args.dead_letter, args.failed)
    return _send(config, args.destination, args.paths)


def _destination(config: NodeConfig, name: str) -> tuple[str, int, str] | None:
    dest = config.destinations.get(name)
    if dest is None:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        print(f"unknown destination {name!r} (known: {known})", file=sys.stderr)
        return None
    return dest.host, dest.port, dest.ae_title


def _echo(config: NodeConfig, name: str) -> int:
    from dicom_node.send import Peer, SendError, echo

    found = _destination(config, name)
    if found is None:
        return EXIT_USAGE
    host, port, ae_title = found
    try:
        echo(config.node.ae_title, Peer(ae_title, host, port, config.destinations[name].tls))
    except SendError as exc:
        print(f"echo {name}: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"echo {name} ({ae_title}@{host}:{port}): OK")
    return EXIT_OK


def _send(config: NodeConfig, name: str, paths: Sequence[Path]) -> int:
    from rich.progress import Progress

    from dicom_node.send import Peer, SendError, dicom_files, store_files

    found = _destination(config, name)
    if found is None:
        return EXIT_USAGE
    host, port, ae_title = found
    try:
        files, skipped = dicom_files(ops.collect_files(paths))
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    for path in skipped:
        print(f"skipped (not a DICOM file): {path}", file=sys.stderr)
    if not files:
        print(f"send {name}: no DICOM files in the paths given", file=sys.stderr)
        return EXIT_USAGE
    with Progress(transient=False) as progress:
        task = progress.add_task(f"sending to {name}", total=len(files))
        try:
            store_files(
                config.node.ae_title,
                Peer(ae_title, host, port, config.destinations[name].tls),
                files,
                timeout=config.sending.timeout_seconds,
                progress=lambda _path, _status: progress.advance(task),
            )
        except SendError as exc:
            print(f"send {name}: FAILED: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(f"sent {len(files)} file(s) to {name}")
    return EXIT_OK
