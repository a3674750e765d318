"""Configuration: pydantic models, the only place where defaults live.

The keys fixed by ``shared/spec/interface.md`` are ``node``, ``storage``,
``completion``, ``destinations``, ``routes`` and ``web``; ``sending`` and
``analysis`` are ours. Unknown keys are an error everywhere; the problems of a
configuration are found by :mod:`dicom_node.config_problems`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dicom_node.config_problems import format_error, reference_problems

SOURCE_DESTINATION = "source"
CONFIG_ENV_VAR = "DICOM_NODE_CONFIG"

# AE VR (PS3.5 6.2): 1-16 characters, default character repertoire without
# backslash or control characters; leading/trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]
ListenPort = Annotated[int, Field(ge=0, le=65535)]

# Upper bounds of the durations (seconds). Each is far above any sensible setting; they
# exist so that a typo (or .inf) is refused here instead of overflowing a timer later.
# Every seconds field also refuses NaN and infinity (allow_inf_nan=False).
MINUTE = 60
HOUR = 3600
DAY = 86400
WEEK = 7 * DAY


def _check_host(value: str) -> str:
    """A host name or address: not empty (which would mean every interface, or this host)."""
    if not value.strip():
        raise ValueError("must not be empty: give an address or host name")
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an address or host name (it holds spaces)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MiB = 1024 * 1024


class ServerTLS(_Section):
    """DICOM TLS on the listener (PS3.15 B.9 / BCP 195): TLS 1.2 or newer."""

    certificate: FilePath
    private_key: FilePath
    ca_bundle: FilePath | None = None  # CAs whose client certificates are trusted
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_certs_need_a_ca(self) -> ServerTLS:
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError("require_client_certificate needs ca_bundle")
        return self


class ClientTLS(_Section):
    """DICOM TLS to a destination."""

    ca_bundle: FilePath | None = None  # None: the system's trusted CAs
    certificate: FilePath | None = None  # our client certificate, if the peer wants one
    private_key: FilePath | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _key_with_certificate(self) -> ClientTLS:
        # format_error adds ctx "key" to the path: destinations.NAME.tls.private_key: ...
        # (a certificate alone is a file holding the key as well: dicom_node.tls)
        if self.private_key is not None and self.certificate is None:
            raise PydanticCustomError(
                "config_key", "given without certificate", {"key": "private_key"}
            )
        return self


class NodeSection(_Section):
    ae_title: AETitle
    host: str = "127.0.0.1"  # 0.0.0.0: every interface; "" is refused (it means the same)
    port: ListenPort = 11112
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    check_called_aet: bool = True  # reject associations addressed to another AE title
    allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)  # empty: any source
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 32
    max_connections: Annotated[int, Field(ge=1, le=10000)] = 64  # open sockets, held or not
    max_associations_per_source: Annotated[int, Field(ge=1, le=1000)] = 8
    max_pdu_bytes: Annotated[int, Field(ge=4096, le=64 * MiB)] = 1 * MiB  # advertised and enforced
    max_instance_bytes: Annotated[int, Field(ge=MiB, le=8192 * MiB)] = 2048 * MiB
    # per PDU, slow senders
    idle_timeout_seconds: Annotated[float, Field(gt=0, le=HOUR, allow_inf_nan=False)] = 60.0
    accept_deflate: bool = False  # Deflated Explicit VR LE invites decompression bombs
    tls: ServerTLS | None = None
    # Processes that receive, this one included: the main process accepts each connection
    # and hands it to the least busy (dicom_node.receivers). More than 1 uses more cores.
    # "auto": see receive_process_count.
    receive_processes: int | Literal["auto"] = "auto"
    # On SIGTERM, associations in progress may finish for this long; then they are aborted.
    # A receiving process whose main process died does the same. Give the service manager
    # about 15 s more than this (systemd TimeoutStopSec, docker stop -t): the receiving
    # processes get 5 s more to exit, and a start in progress finishes first.
    drain_seconds: Annotated[float, Field(gt=0, le=10 * MINUTE, allow_inf_nan=False)] = 30.0

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_host)

    @field_validator("receive_processes", mode="before")
    @classmethod
    def _check_processes(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        problem = ValueError("a whole number from 1 to 64, or auto")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise problem
        try:
            number = float(value)  # "2" and 2.0 as before (pydantic's lax int)
        except ValueError:
            raise problem from None
        if not number.is_integer() or not 1 <= number <= 64:
            raise problem
        return int(number)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class ObjectStoreSection(_Section):
    """An S3-compatible bucket shared by receivers and workers (docs/scale-out.md)."""

    bucket: Annotated[str, Field(min_length=3, max_length=63)]
    endpoint_url: str | None = None  # e.g. http://minio:9000; None: AWS S3
    region: str | None = None
    prefix: str = ""  # key prefix inside the bucket, e.g. "site-a/"
    # None: boto3's usual sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, roles)
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=5 * MINUTE, allow_inf_nan=False)] = 30.0


class StorageSection(_Section):
    path: Path = Path("./var")
    # Below this much free space new instances are refused with 0xA700 (out of resources),
    # before the disk is full; accepted again by itself once space returns.
    min_free_bytes: Annotated[int, Field(ge=0)] = 1024 * MiB
    # Shared by every receiver and worker instead of `path` (then each one's own folder).
    object_store: ObjectStoreSection | None = None


class CompletionSection(_Section):
    study_idle_seconds: Annotated[float, Field(gt=0, le=DAY, allow_inf_nan=False)] = 10


class Destination(_Section):
    ae_title: AETitle
    host: str
    port: Port
    tls: ClientTLS | None = None
    storage_commitment: bool = False  # done only when N-EVENT-REPORT confirms every object

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_host)


Scalar = str | int | float
Operator = Literal["equals", "one_of", "not", "contains", "regex", "present"]


class Condition(_Section):
    """One test on a DICOM keyword; exactly one operator is set."""

    equals: Scalar | None = None
    one_of: list[Scalar] | None = None
    not_: Scalar | list[Scalar] | None = Field(default=None, alias="not")
    contains: str | None = None
    regex: str | None = None
    present: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a condition needs exactly one of equals, one_of, not, contains, regex, present"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from exc
        return self


class Route(_Section):
    name: Annotated[str, Field(min_length=1)]
    when: dict[str, Scalar | list[Scalar] | Condition] = Field(default_factory=dict)
    pipeline: Annotated[str, Field(min_length=1)]
    send_to: Annotated[list[str], Field(min_length=1)]
    # urgent studies are analysed before normal ones waiting in the queue
    priority: Literal["normal", "urgent"] = "normal"

    @field_validator("when", mode="before")
    @classmethod
    def _conditions(cls, when: Any) -> Any:
        """Every keyword and every test checked, one line each (``.KEYWORD: problem``,
        see config_problems.format_error): left to pydantic, a test of the wrong shape
        gave a line per member of the union, and a bad keyword went unreported."""
        if not isinstance(when, dict):
            return when  # pydantic says what it should be
        problems = [
            f".{keyword}: {problem}"
            for keyword, test in when.items()
            for problem in (_keyword_problem(keyword), _test_problem(test))
            if problem is not None
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return when


_OPERATORS = "equals, one_of, not, contains, regex, present"


def _keyword_problem(keyword: object) -> str | None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword) if isinstance(keyword, str) else None
    if tag is None:
        return f"{keyword!r} is not a DICOM keyword"
    if dictionary_VR(tag) == "SQ":
        return f"{keyword!r} is a sequence; rules test plain attributes"
    return None


def _test_problem(test: object) -> str | None:
    """What is wrong with one keyword's test: a value, a list of values, or one operator."""
    scalar = (str, int, float)
    if test is None:
        return f"no value to test; give a value, a list of values, or one of {_OPERATORS}"
    if isinstance(test, bool):
        return f"{str(test).lower()} is not a value to compare; to test presence: {{present: true}}"
    if isinstance(test, scalar):
        return None
    if isinstance(test, list):
        if all(isinstance(item, scalar) and not isinstance(item, bool) for item in test):
            return None
        return "a list of values must hold plain values (text or numbers) only"
    if not isinstance(test, dict):
        return f"a {type(test).__name__} is not a test; give a value, a list, or an operator"
    unknown = [str(name) for name in test if name not in Condition.model_fields and name != "not"]
    if unknown:
        return f"unknown operator {unknown[0]!r} (one of {_OPERATORS})"
    try:
        Condition.model_validate(test)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return None


class SendingSection(_Section):
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 8
    # the wait before a retry doubles from backoff_initial_seconds up to backoff_max_seconds
    backoff_initial_seconds: Annotated[float, Field(gt=0, le=DAY, allow_inf_nan=False)] = 2.0
    backoff_max_seconds: Annotated[float, Field(gt=0, le=DAY, allow_inf_nan=False)] = 300.0
    # network timeout of one association's steps (connect, each PDU/response), not its total
    timeout_seconds: Annotated[float, Field(gt=0, le=HOUR, allow_inf_nan=False)] = 30.0
    # storage commitment: how long to wait for the N-EVENT-REPORT before retrying
    commitment_timeout_seconds: Annotated[float, Field(gt=0, le=WEEK, allow_inf_nan=False)] = 300.0


class AnalysisSection(_Section):
    # auto: the first CUDA device when there is one, else the CPU; or cpu, cuda, cuda:N
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")] = "auto"
    # model packages: one folder per model with a model.yaml (see docs/model-packages.md)
    models_path: Path = Path("./models")
    # load the routes' pipelines at start (in the background), so the first study is not slower
    warm_up: bool = True
    workers: Annotated[int, Field(ge=1, le=16)] = 1


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ClusterSection(_Section):
    """Scale-out (docs/scale-out.md): a shared journal, a broker and ``dicom-node worker``s.

    Nothing set (the default): one process, a SQLite journal in ``storage.path`` and
    analysis inside ``serve``.
    """

    # PostgreSQL shared by every receiver and worker; ``storage.path`` must then be one
    # shared folder (NFS or similar) mounted at the same path on every host.
    journal_url: SecretStr | None = None  # postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB
    # Celery broker: analysis runs on `dicom-node worker` processes instead of in `serve`.
    broker_url: SecretStr | None = None  # redis://HOST:PORT/N
    # Names this process's folders in the shared storage; unique per receiver.
    node_name: str | None = None  # default: the host name
    # a worker's hold on a job
    lease_seconds: Annotated[float, Field(ge=2, le=HOUR, allow_inf_nan=False)] = 60.0
    # look for others' work this often
    poll_seconds: Annotated[float, Field(gt=0, le=MINUTE, allow_inf_nan=False)] = 1.0
    # a job handed to the broker this long ago and still queued (its message was lost with
    # a broker restart) is handed over again; shorter than a backlog takes, it duplicates
    # messages (harmless: a worker skips a job that is no longer queued)
    redispatch_seconds: Annotated[float, Field(ge=10, le=DAY, allow_inf_nan=False)] = 3600.0

    @field_validator("node_name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and not _NODE_NAME.match(value):
            raise ValueError("1-63 letters, digits, '.', '_' or '-', starting with a letter/digit")
        return value

    @field_validator("journal_url")
    @classmethod
    def _check_journal(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgresql+psycopg://")
        ):
            raise ValueError("must be a postgresql+psycopg:// URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "amqp://", "amqps://")
        ):
            raise ValueError("must be a redis:// (or amqp://) URL")
        return value

    @model_validator(mode="after")
    def _broker_needs_journal(self) -> ClusterSection:
        if self.broker_url is not None and self.journal_url is None:
            raise ValueError("broker_url needs journal_url: workers on other hosts share it")
        return self

    @property
    def enabled(self) -> bool:
        return self.journal_url is not None

    def journal_location(self, sqlite_path: Path) -> Path | str:
        if self.journal_url is None:
            return sqlite_path
        url = self.journal_url.get_secret_value()
        return url.replace("postgresql://", "postgresql+psycopg://", 1)

    def name(self) -> str:
        import socket

        return self.node_name or socket.gethostname().split(".")[0]


class BasicAuth(_Section):
    username: Annotated[str, Field(min_length=1)]
    password: Annotated[SecretStr, Field(min_length=1)]


class AuditSection(_Section):
    """Append-only audit trail (JSON lines, PS3.15 A.5 event types)."""

    enabled: bool = True
    path: Path | None = None  # default: <storage.path>/audit.jsonl


class WebSection(_Section):
    host: str = "127.0.0.1"  # 0.0.0.0: every interface; "" is refused (it means the same)
    port: ListenPort = 8080
    enabled: bool = True
    # Either protects everything but /healthz: "Authorization: Bearer TOKEN" or basic auth.
    token: Annotated[SecretStr, Field(min_length=16)] | None = None
    basic_auth: BasicAuth | None = None
    refresh_seconds: Annotated[int, Field(ge=0, le=3600)] = 5  # dashboard auto-refresh; 0: off
    # destination C-ECHO status, this often
    echo_interval_seconds: Annotated[float, Field(gt=0, le=DAY, allow_inf_nan=False)] = 30.0

    _host = field_validator("host")(_check_host)


class NodeConfig(_Section):
    node: NodeSection
    storage: StorageSection = StorageSection()
    completion: CompletionSection = CompletionSection()
    destinations: dict[str, Destination] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    sending: SendingSection = SendingSection()
    audit: AuditSection = AuditSection()
    analysis: AnalysisSection = AnalysisSection()
    web: WebSection = WebSection()
    cluster: ClusterSection = ClusterSection()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section whose entries are all commented out is YAML null: read it as empty
        (``destinations``, ``routes``) or as all defaults (the other optional sections)."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or key == "node"}

    @model_validator(mode="after")
    def _references(self) -> NodeConfig:
        problems = reference_problems(self.model_dump(by_alias=True))
        if self.storage.object_store is not None and not self.cluster.enabled:
            problems.append(
                "storage.object_store: needs cluster.journal_url (it is shared storage)"
            )
        explicit = self.node.receive_processes
        if isinstance(explicit, int) and explicit > 1 and self.cluster.enabled:
            problems.append(
                "node.receive_processes: more than 1 needs the node's own SQLite journal;"
                " with cluster.journal_url run more receivers instead (docs/scale-out.md)"
            )
        if self.sending.backoff_max_seconds < self.sending.backoff_initial_seconds:
            problems.append("sending.backoff_max_seconds: smaller than backoff_initial_seconds")
        if _same_listener(self.node.host, self.node.port, self.web.host, self.web.port) and (
            self.web.enabled
        ):
            problems.append(
                f"web.port: {self.web.port} is node.port too; the DICOM listener and the web"
                " server each need a port of their own"
            )
        if problems:  # one per line: a problem's own text may hold "; "
            raise ValueError("\n".join(problems))
        return self


_ANY_ADDRESS = frozenset({"0.0.0.0", "::", "*"})


def _same_listener(host: str, port: int, other_host: str, other_port: int) -> bool:
    """Whether two listeners would take the same port (0: any free port, never the same)."""
    if port == 0 or port != other_port:
        return False
    return host == other_host or host in _ANY_ADDRESS or other_host in _ANY_ADDRESS


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists each as 'path: message'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def parse_config(data: Any, source: str = "<config>") -> NodeConfig:
    """Validate already-parsed YAML; raise :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections"])
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in format_error(error)]
        problems += [p for p in reference_problems(data) if p not in problems]
        raise ConfigError(source, problems) from None


# Two were measured (docs/performance.md, item 30): each more holds about 75 MiB, and more
# than two CPUs were never at hand. Set node.receive_processes to use more.
AUTO_RECEIVE_PROCESSES_MAX = 2


def receive_process_count(config: NodeConfig, cpus: int | None = None) -> int:
    """How many processes receive: ``node.receive_processes``, or for "auto" one per CPU
    this node may use (:func:`usable_cpus`, or ``cpus``), at most
    :data:`AUTO_RECEIVE_PROCESSES_MAX`, and 1 with a shared journal (``cluster``),
    where more receivers are more nodes instead (docs/scale-out.md)."""
    setting = config.node.receive_processes
    if setting != "auto":
        return setting
    return 1 if config.cluster.enabled else auto_receive_processes(cpus)


def auto_receive_processes(cpus: int | None = None) -> int:
    """What "auto" gives with the node's own journal: one process per usable CPU (or
    per ``cpus``), at most :data:`AUTO_RECEIVE_PROCESSES_MAX`."""
    return max(1, min(usable_cpus() if cpus is None else cpus, AUTO_RECEIVE_PROCESSES_MAX))


def usable_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The CPUs this process may run on (its affinity), fewer where a CPU quota on its
    cgroup or on one above it allows less (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``): e.g. systemd's ``CPUQuota=`` or a container's ``--cpus``."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = _cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cpu_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The smallest CPU quota (in CPUs) on the way from this process's cgroup up to the
    top of the hierarchy; None: no quota, or none found."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    folders: list[Path] = []
    for line in lines:  # "0::/path" (v2), "4:cpu,cpuacct:/path" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.strip().lstrip("/")
        if controllers == "":
            folders.extend(_upwards(root, root / relative))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                folders.extend(_upwards(mount, mount / relative))
    if not folders:  # no /proc/self/cgroup: the hierarchy's top, as a container sees it
        folders = [root, root / "cpu"]
    quotas = [quota for folder in folders if (quota := _quota_in(folder)) is not None]
    return min(quotas) if quotas else None


def _upwards(top: Path, folder: Path) -> list[Path]:
    """``folder`` and every folder above it up to ``top`` (both included)."""
    found = [folder]
    while folder != top and top in folder.parents:
        folder = folder.parent
        found.append(folder)
    return found


def _quota_in(folder: Path) -> float | None:
    """The CPU quota set in one cgroup folder, in CPUs; None where none is set or readable."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def load_config(path: str | os.PathLike[str] | None) -> NodeConfig:
    """Read and validate a YAML config file (``DICOM_NODE_CONFIG`` when path is None).

    A relative ``storage.path`` is relative to the directory the node is started in.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR)
    if not path:
        raise ConfigError("<no config>", [f"no --config given and {CONFIG_ENV_VAR} is not set"])
    source = str(path)
    try:
        data = read_yaml(Path(path))
    except YAMLFileError as exc:
        raise ConfigError(source, exc.problems) from None
    return parse_config(data, source)


class YAMLFileError(Exception):
    """A YAML file that cannot be read or parsed; ``problems``: one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def read_yaml(path: Path) -> Any:
    """The document in ``path``: UTF-8 (a byte order mark allowed), safe YAML, no key
    given twice (the config and the model packages' model.yaml)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise YAMLFileError([f"cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YAMLFileError([f"not UTF-8 text: {_where_not_utf8(raw, exc)}"]) from None
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader; raises YAMLFileError too
    except yaml.YAMLError as exc:
        raise YAMLFileError([f"not valid YAML: {exc}"]) from None
    except RecursionError:
        raise YAMLFileError(["not valid YAML: nested too deeply"]) from None


def _where_not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    """'byte 0xfc on line 1, column 4 (...)' for the first byte that is not UTF-8."""
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    line = raw.count(b"\n", 0, exc.start) + 1
    column = len(raw[line_start : exc.start].decode("utf-8", "replace").lstrip("\ufeff")) + 1
    return (
        f"byte 0x{raw[exc.start]:02x} on line {line}, column {column}"
        " (save the file as UTF-8, e.g. iconv -f latin1 -t utf-8)"
    )


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice, at any level.

    PyYAML keeps the last value silently (YAML itself requires unique keys), which would
    drop half of a section given twice. Keys brought in by a merge key (``<<: *anchor``)
    may be overridden, as YAML intends.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        problems = _duplicate_keys(node)
        if problems:
            raise YAMLFileError([f"not valid YAML: {problem}" for problem in problems])
        return super().construct_document(node)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:  # e.g. 2024-13-01: PyYAML raises a bare ValueError
            line = node.start_mark.line + 1
            problem = f"{node.value!r} is not a valid date: {exc} (line {line})"
            raise YAMLFileError([f"not valid YAML: {problem}"]) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _ConfigLoader.construct_yaml_timestamp)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(root: yaml.Node) -> list[str]:
    """'key 'web.port' appears twice (lines 7 and 9)' for each key repeated in a mapping."""
    problems = []
    seen: set[int] = set()  # an alias is the node of its anchor: look at each node once
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{path}{index}.") for index, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        lines: dict[tuple[str, str], list[int]] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                lines.setdefault((key.tag, key.value), []).append(key.start_mark.line + 1)
                stack.append((value, f"{path}{key.value}."))
            else:
                stack.append((value, path))
        for (_, name), found in lines.items():
            if len(found) > 1:
                times = "twice" if len(found) == 2 else f"{len(found)} times"
                where = ", ".join(str(line) for line in found[:-1]) + f" and {found[-1]}"
                where = f"line {found[0]}" if len(set(found)) == 1 else f"lines {where}"
                problems.append(f"key '{path}{name}' appears {times} ({where})")
    return sorted(problems)
