"""Command line: ``dicom-node serve | check-config | echo | send``.

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

from dicom_node import __version__
from dicom_node.config import ConfigError, NodeConfig, load_config

log = logging.getLogger("dicom_node")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom_node {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DICOM_NODE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument(
            "--config", help="YAML config file (default: $DICOM_NODE_CONFIG)", default=None
        )
        return command

    with_config("serve", "run the node until SIGTERM/SIGINT")
    with_config("check-config", "validate a config file")
    echo = with_config("echo", "C-ECHO a configured destination")
    echo.add_argument("destination")
    send = with_config("send", "C-STORE files or folders to a configured destination")
    send.add_argument("destination")
    send.add_argument("paths", nargs="+", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{exc.source}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"{args.config or os.environ.get('DICOM_NODE_CONFIG')}: OK")
        return EXIT_OK
    if args.command == "serve":
        from dicom_node.app import run

        return run(config)
    if args.command == "echo":
        return _echo(config, args.destination)
    return _send(config, args.destination, args.paths)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU and APScheduler every timer at INFO: keep their warnings.
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in ("pynetdicom", "apscheduler"):
        logging.getLogger(name).setLevel(quiet)


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
        echo(config.node.ae_title, Peer(ae_title, host, port))
    except SendError as exc:
        print(f"echo {name}: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"echo {name} ({ae_title}@{host}:{port}): OK")
    return EXIT_OK


def _collect(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def _send(config: NodeConfig, name: str, paths: Sequence[Path]) -> int:
    from rich.progress import Progress

    from dicom_node.send import Peer, SendError, dicom_files, store_files

    found = _destination(config, name)
    if found is None:
        return EXIT_USAGE
    host, port, ae_title = found
    try:
        files, skipped = dicom_files(_collect(paths))
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    for path in skipped:
        print(f"skipped (not a DICOM file): {path}", file=sys.stderr)
    with Progress(transient=False) as progress:
        task = progress.add_task(f"sending to {name}", total=len(files))
        try:
            store_files(
                config.node.ae_title,
                Peer(ae_title, host, port),
                files,
                timeout=config.sending.timeout_seconds,
                progress=lambda _path, _status: progress.advance(task),
            )
        except SendError as exc:
            print(f"send {name}: FAILED: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(f"sent {len(files)} file(s) to {name}")
    return EXIT_OK
