"""``dicom-node worker``: analysis on any host, jobs from the broker (docs/scale-out.md).

One process per GPU (or per group of CPU cores). It loads the routes' pipelines
at start and keeps them (warm), runs ``--concurrency`` jobs at once (default
``analysis.workers``: one), and for each message:

1. claims the job in the shared journal under a lease (a duplicate is skipped);
2. reads the series from the shared storage, analyses it, writes SEG and SR to
   ``results/<job>/`` there;
3. records the deliveries in the journal (fenced by the lease), which the
   receivers' senders pick up and send.

The message is acknowledged only then. SIGTERM finishes the jobs in hand (warm
shutdown); SIGKILL leaves them to their leases running out.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import start_http_server

from dicom_node.broker import QUEUE, TASK_ANALYSE, celery_app
from dicom_node.config import NodeConfig
from dicom_node.journal import Journal
from dicom_node.leases import LeaseKeeper
from dicom_node.store import NameInUse, Spool
from dicom_node.web.metrics import Metrics

if TYPE_CHECKING:
    from celery import Celery

    from dicom_node.worker import Worker

log = logging.getLogger(__name__)

MAX_WORKERS_PER_NAME = 64
RETRY_SECONDS = 5.0  # the journal was unreachable while claiming: the message comes back


def worker_spool(config: NodeConfig, name: str | None) -> Spool:
    """The worker's view of the shared storage, under the first free ``<name>-N``."""
    from dicom_node.app import object_store

    base = name or f"{config.cluster.name()}-worker"
    objects = object_store(config)
    for index in range(1, MAX_WORKERS_PER_NAME + 1):
        spool = Spool(config.storage.path, 0, f"{base}-{index}", objects)
        try:
            spool.create()
        except NameInUse:
            continue
        return spool
    raise NameInUse(f"{MAX_WORKERS_PER_NAME} workers named {base}-N are running already")


def run_worker(
    config: NodeConfig,
    name: str | None = None,
    concurrency: int | None = None,
    metrics_port: int | None = None,
) -> int:
    """Consume analysis jobs until SIGTERM; returns the exit code.

    ``metrics_port``: serve this worker's Prometheus metrics (jobs analysed, stage
    times, CPU fallbacks, GPU memory) on ``web.host`` at that port.
    """
    from dicom_node.app import build_worker

    cluster = config.cluster
    if cluster.broker_url is None or cluster.journal_url is None:
        log.error("dicom-node worker needs cluster.journal_url and cluster.broker_url")
        return 2
    opened = _open_storage(config, name)
    if opened is None:
        return 1
    spool, journal = opened
    assert spool.name is not None
    spool.clear_tmp()
    owner = f"{spool.name}@{socket.gethostname()}:{os.getpid()}"
    leases = LeaseKeeper(journal, owner, cluster.lease_seconds, time.time)
    threads = concurrency or config.analysis.workers
    metrics = Metrics()
    metrics.watch_gpu()
    if metrics_port is not None and not _serve_metrics(metrics, config.web.host, metrics_port):
        return 1
    worker = build_worker(config, journal, spool, metrics, lambda: None, threads, leases)
    app = celery_app(cluster.broker_url.get_secret_value(), cluster.lease_seconds)
    _register_analyse(app, worker)
    # before taking a message (an idle warm worker should get it instead), and with a sample
    # run, so that its first job is as fast as the next (dicom_node.analysis.warm)
    worker.warm_up(sample=True)
    leases.start()
    log.info(
        "worker %s ready: %d job(s) at a time on %s, journal %s",
        owner,
        threads,
        worker.device,
        journal.path,
    )
    try:
        code = _consume(app, f"{spool.name}@{socket.gethostname()}", threads)
    finally:
        worker.stop(5.0)
        leases.stop()
        journal.close()
        spool.release()
    log.info("worker %s stopped", owner)
    return code


def _open_storage(config: NodeConfig, name: str | None) -> tuple[Spool, Journal] | None:
    """The worker's spool and the shared journal (created or upgraded); None, logged,
    when either cannot be opened."""
    try:
        spool = worker_spool(config, name)
        journal = Journal(config.cluster.journal_location(spool.journal_path))
        journal.create()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return None
    except sa.exc.OperationalError as exc:
        log.error("cannot start: journal database unreachable: %s", exc.orig)
        return None
    return spool, journal


def _serve_metrics(metrics: Metrics, host: str, port: int) -> bool:
    try:
        start_http_server(port, host, registry=metrics.registry)
    except OSError as exc:
        log.error("cannot start: metrics port %d: %s", port, exc.strerror)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True


def _register_analyse(app: Celery, worker: Worker) -> None:
    """The task that runs one queued job; a journal that is away retries it later."""

    @app.task(name=TASK_ANALYSE, bind=True, acks_late=True, max_retries=None)  # type: ignore[untyped-decorator]
    def analyse(task: Any, job_id: int) -> None:
        try:
            worker.run_claimed(int(job_id))
        except sa.exc.OperationalError as exc:
            log.error("job %s: journal unreachable (%s); retrying", job_id, type(exc).__name__)
            raise task.retry(countdown=RETRY_SECONDS) from None


def _consume(app: Celery, hostname: str, threads: int) -> int:
    """Run Celery's consumer on the analysis queue until it stops; its exit code."""
    consumer = app.Worker(
        hostname=hostname,
        pool_cls="threads" if threads > 1 else "solo",
        concurrency=threads,
        queues=[QUEUE],
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        loglevel=logging.getLevelName(logging.getLogger("dicom_node").getEffectiveLevel()),
        optimization="fair",
        quiet=True,  # no banner: our own "ready" line says it
    )
    consumer.start()
    return int(getattr(consumer, "exitcode", 0) or 0)
