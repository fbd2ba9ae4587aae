"""Start a whole local cluster (a leader and N followers) as uvicorn processes.

    python tools/cluster.py                       # leader on 8000, followers on 8001-8005
    python tools/cluster.py --followers 3 --quorum 2 --max-delay-ms 200 --base-port 9000
    python tools/cluster.py --base-port 0         # free ports, printed at start-up
    python tools/cluster.py --memory              # no DATA_DIR (default: each node's log in .data/)
    python tools/cluster.py --ha                  # a private etcd and six HA nodes on 8000-8005
    python tools/cluster.py --tls                 # HTTPS, mutual TLS, certs/ (with --ha: etcd too)
    python tools/cluster.py --auth-file auth.toml # bearer tokens (docs/operations/security.md)

Ctrl-C stops every process. The same :class:`LocalCluster` is what the tests and
scripts use when no running cluster is given, and it doubles as their fault
injector: it can kill, restart, freeze (SIGSTOP) and thaw followers.
:class:`ComposeCluster` does the same to the containers of a docker compose
stack; both satisfy :class:`ClusterControl`. :class:`HACluster` starts a private etcd
(:class:`PrivateEtcd`) and nodes that elect their leader through it (`python -m kv.ha`),
each in a process group of its own, which is what its faults signal.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from kv.network.tls import uvicorn_args

ROOT = Path(__file__).resolve().parent.parent  # the repository
HOST = "127.0.0.1"
QUIET_UVICORN = ("--no-access-log", "--log-level", "warning")
"""uvicorn's own lines at WARNING and up; the nodes' logs (LOG_LEVEL) are unaffected."""


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    Port 0 would hand out one from the ephemeral range, which outgoing connections also
    use: a leader connecting to its followers during its start-up (before uvicorn binds)
    could take its own chosen port and fail to bind ("address already in use"). Ports below
    that range are never given to outgoing connections.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = _random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port found below the ephemeral range")


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: one cluster's nodes must never be handed the same one
    (a follower that took its leader's port would answer the leader's health check)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: fall back to the kernel's choice


_random = random.SystemRandom()


def ensure_free(ports: list[int]) -> None:
    """Refuse to start on a busy port, where /health might answer from someone else's server."""
    for port in ports:
        with socket.socket() as sock:
            # As uvicorn does: connections of a stopped server lingering in TIME_WAIT
            # must not count as "in use", only a listener.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                raise RuntimeError(
                    f"port {port} on {HOST} is in use; is another cluster running? "
                    "Stop it, or pick other ports with --base-port"
                ) from None


def wait_healthy(
    urls: list[str],
    timeout: float,
    processes: Sequence[subprocess.Popen[bytes]] = (),
    path: str = "/health",
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
) -> None:
    """Poll each URL's `path` until it answers 200, or raise naming the ones that did not.

    `/health` is liveness; a leader's `/ready` answers 200 only once it takes writes.
    `ca`: the CA an https:// node's certificate is verified against; `cert`: a client
    certificate and key to present (an etcd that requires one).
    """
    deadline = time.monotonic() + timeout
    waiting = list(urls)
    with httpx.Client(timeout=1.0, trust_env=False, verify=verifier(ca, cert)) as client:
        while waiting:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited with code {process.returncode}")
            try:
                status = client.get(f"{waiting[0]}{path}").status_code
                if status == 404 and path != "/health":
                    # An older node without this endpoint (a benchmark's baseline): liveness.
                    status = client.get(f"{waiting[0]}/health").status_code
                if status == 200:
                    waiting.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                what = "healthy" if path == "/health" else f"answering {path}"
                raise TimeoutError(f"not {what} after {timeout:g} s: {', '.join(waiting)}")
            time.sleep(0.05)


def verifier(ca: Path | None, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext | bool:
    """httpx's `verify` for a cluster whose certificates `ca` signed (tools/certs.py),
    presenting `cert` (certificate, key) when given."""
    if ca is None:
        return True
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def tls_env(certs: Path | None, name: str) -> dict[str, str]:
    """The TLS_* settings of node `name`, from a folder of tools/certs.py's files."""
    if certs is None:
        return {}
    return {
        "TLS_CA_FILE": str(certs / "ca.pem"),
        "TLS_CERT_FILE": str(certs / f"{name}.pem"),
        "TLS_KEY_FILE": str(certs / f"{name}-key.pem"),
    }


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the launcher dies.

    Otherwise a launcher killed without a chance to clean up (SIGKILL, or a test
    runner's timeout) would leave its nodes running, holding their ports. Linux sends it
    when the *thread* that forked the child ends, not the process: hence `_LAUNCHER`.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1

# The one thread that forks every child, alive as long as the launcher. A child forked on
# a short-lived thread, asyncio.to_thread's, was sent SIGTERM when that thread was retired
# (at the end of the test whose event loop owned it): a node restarted that way died
# a moment later, silently, and the next test found it gone.
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="launcher")


def spawn(
    command: list[str],
    log_path: Path | None = None,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    quiet: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a process this launcher owns: in a process group of its own (a Ctrl-C in the
    terminal reaches only the launcher, which then stops it in order), dying with the
    launcher, its output appended to `log_path`, else to the terminal (nowhere if `quiet`)."""
    output = open(log_path, "ab") if log_path else None  # noqa: SIM115
    try:
        return _LAUNCHER.submit(
            subprocess.Popen,
            command,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdout=output if output is not None else subprocess.DEVNULL if quiet else None,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        ).result()
    finally:
        if output is not None:
            output.close()


def stop_process(
    process: subprocess.Popen[bytes],
    timeout: float,
    send: Callable[[int], None] | None = None,
) -> None:
    """Stop a process this launcher started: SIGCONT (a frozen one cannot handle SIGTERM),
    SIGTERM, and SIGKILL after `timeout`. `send` delivers each (default: to the process)."""
    send = send or process.send_signal
    if process.poll() is None:
        send(signal.SIGCONT)
        send(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            process.wait()


def wait_healthy_nodes(nodes: Sequence[Node], timeout: float, path: str = "/health") -> None:
    """Wait for nodes this launcher started, failing at once if one of them exits."""
    processes = [n.process for n in nodes if n.process]
    wait_healthy([node.url for node in nodes], timeout, processes, path, nodes[0].ca)


class ClusterControl(Protocol):
    """Fault injection by follower index (0-based), whatever runs the nodes."""

    def kill_leader(self) -> None: ...
    def restart_leader(self) -> None: ...
    def kill_follower(self, index: int) -> None: ...
    def restart_follower(self, index: int, fresh: bool = False) -> None: ...
    def pause_follower(self, index: int) -> None: ...
    def resume_follower(self, index: int) -> None: ...
    def ensure_running(self) -> None: ...


@dataclass
class Node:
    role: str
    port: int
    env: dict[str, str]
    log_path: Path | None = None
    cwd: Path = ROOT
    # uvicorn's options after the app, host and port; () is the documented plain launch.
    uvicorn_args: tuple[str, ...] = QUIET_UVICORN
    process: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        return "TLS_CERT_FILE" in self.env

    @property
    def ca(self) -> Path | None:
        return Path(self.env["TLS_CA_FILE"]) if "TLS_CA_FILE" in self.env else None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        tls = []
        if self.tls:  # HTTPS, from the same files the node's own settings name
            env = self.env
            tls = uvicorn_args(env["TLS_CERT_FILE"], env["TLS_KEY_FILE"], env["TLS_CA_FILE"])
        command = [
            sys.executable, "-m", "uvicorn", f"{self.role}:app",
            "--host", HOST, "--port", str(self.port), *self.uvicorn_args, *tls,
        ]  # fmt: skip
        # Without a log file the node writes to the launcher's terminal.
        self.process = spawn(command, self.log_path, cwd=self.cwd, env=self.env)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process this node started (by PID), escalating to SIGKILL."""
        if self.process is not None:
            stop_process(self.process, timeout)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@dataclass
class LocalCluster:
    """A leader and `followers` followers on loopback, each a uvicorn process."""

    followers: int = 5
    quorum: int | None = None
    min_delay_ms: float = 0
    max_delay_ms: float = 1000
    timeout_ms: float | None = None
    base_port: int = 8000
    secret: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    # Each node keeps its log in a folder of its own under here; None: memory only.
    data_dir: Path | None = None
    # The checkout whose leader.py and follower.py run (benchmarks compare two).
    root: Path = ROOT
    uvicorn_args: tuple[str, ...] = QUIET_UVICORN
    # A folder of tools/certs.py's files (ca.pem, leader.pem, follower1.pem...): HTTPS and
    # mutual TLS between the nodes. None: plain HTTP.
    certs: Path | None = None
    # AUTH_FILE for every node: bearer tokens (kv/core/access.py). None: no tokens needed.
    auth_file: Path | None = None
    nodes: list[Node] = field(default_factory=list, init=False)

    @property
    def scheme(self) -> str:
        return "https" if self.certs is not None else "http"

    def _tls(self, name: str) -> dict[str, str]:
        return tls_env(self.certs, name)

    def _ports(self) -> list[int]:
        if self.base_port == 0:
            return free_ports(self.followers + 1)
        return [self.base_port + i for i in range(self.followers + 1)]

    def _common_env(self) -> dict[str, str]:
        env = dict(self.extra_env)
        if self.secret is not None:
            env["REPLICATION_SECRET"] = self.secret
        if self.auth_file is not None:
            env["AUTH_FILE"] = str(self.auth_file)
        return env

    def start(self, timeout: float = 30.0) -> LocalCluster:
        ports = self._ports()
        ensure_free(ports)
        leader_port, follower_ports = ports[0], ports[1:]
        common = self._common_env()
        leader_url = f"{self.scheme}://{HOST}:{leader_port}"
        followers = [
            Node(
                "follower",
                port,
                {
                    **common,
                    "NODE_NAME": f"follower{i + 1}",
                    "LEADER_URL": leader_url,
                    **self._data(f"follower{i + 1}"),
                    **self._tls(f"follower{i + 1}"),
                },
                self._log("follower", i + 1),
                cwd=self.root,
                uvicorn_args=self.uvicorn_args,
            )
            for i, port in enumerate(follower_ports)
        ]
        leader_env = {
            **common,
            "NODE_NAME": "leader",
            **self._data("leader"),
            **self._tls("leader"),
            "FOLLOWERS": ",".join(node.url for node in followers),
            "MIN_DELAY_MS": f"{self.min_delay_ms:g}",
            "MAX_DELAY_MS": f"{self.max_delay_ms:g}",
        }
        if self.quorum is not None:
            leader_env["WRITE_QUORUM"] = str(self.quorum)
        if self.timeout_ms is not None:
            leader_env["REPLICATION_TIMEOUT_MS"] = f"{self.timeout_ms:g}"
        self.nodes = [
            Node(
                "leader",
                leader_port,
                leader_env,
                self._log("leader", 0),
                cwd=self.root,
                uvicorn_args=self.uvicorn_args,
            ),
            *followers,
        ]
        try:
            for node in followers:
                node.start()
            wait_healthy_nodes(followers, timeout)
            self.nodes[0].start()
            wait_healthy_nodes([self.nodes[0]], timeout, "/ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _data(self, name: str) -> dict[str, str]:
        return {} if self.data_dir is None else {"DATA_DIR": str(self.data_dir / name)}

    def _log(self, role: str, index: int) -> Path | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / (f"{role}{index}.log" if role == "follower" else f"{role}.log")

    def stop(self) -> None:
        """Leader first, so it does not log the followers' departure as failures."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------

    @property
    def leader_url(self) -> str:
        return self.nodes[0].url

    @property
    def follower_urls(self) -> list[str]:
        return [node.url for node in self.nodes[1:]]

    # -- faults, by follower index (0-based) ------------------------------

    def kill_leader(self) -> None:
        """SIGKILL the leader: no shutdown, no final fsync."""
        self.nodes[0].kill()

    def restart_leader(
        self, timeout: float = 30.0, wait_ready: bool = True, fresh: bool = False
    ) -> None:
        """Start the leader again; by default wait until it takes writes (`/ready`).

        `fresh` first deletes its DATA_DIR: it comes back with no memory at all.
        """
        node = self.nodes[0]
        node.stop()
        if fresh and "DATA_DIR" in node.env:
            shutil.rmtree(node.env["DATA_DIR"], ignore_errors=True)
        node.start()
        wait_healthy_nodes([node], timeout, "/ready" if wait_ready else "/health")

    def kill_follower(self, index: int) -> None:
        """SIGKILL: the process and everything it held in memory are gone."""
        self.nodes[index + 1].kill()

    def restart_follower(self, index: int, fresh: bool = False, timeout: float = 30.0) -> None:
        """Start it again; `fresh` first deletes its DATA_DIR, so it comes back empty."""
        node = self.nodes[index + 1]
        node.stop()
        if fresh and "DATA_DIR" in node.env:
            shutil.rmtree(node.env["DATA_DIR"], ignore_errors=True)
        node.start()
        wait_healthy_nodes([node], timeout)

    def pause_follower(self, index: int) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        self.nodes[index + 1].signal(signal.SIGSTOP)

    def resume_follower(self, index: int) -> None:
        self.nodes[index + 1].signal(signal.SIGCONT)

    def ensure_running(self) -> None:
        """Restart any node that is not running, e.g. after a test killed it."""
        if not self.nodes[0].running:
            self.restart_leader()
        for index, node in enumerate(self.nodes[1:]):
            if not node.running:
                self.restart_follower(index)


class ComposeCluster:
    """Fault injection for a docker compose stack: stop, start, pause and unpause containers.

    `command` is how compose is invoked: `docker compose` (v2) or `docker-compose` (v1).
    `compose_files` are the stack's files (default KV_COMPOSE_FILES, comma-separated, else
    docker-compose.yml); `ca` verifies https:// nodes (docker-compose.tls.yml).
    """

    def __init__(
        self,
        project: str,
        leader_url: str,
        follower_urls: list[str],
        *,
        compose_files: Sequence[Path] | None = None,
        command: list[str] | None = None,
        ca: Path | None = None,
    ) -> None:
        self.project = project
        self.leader_url = leader_url
        self.follower_urls = follower_urls
        self.compose_files = list(compose_files or compose_files_from_env())
        self.command = command or default_compose_command()
        self.ca = ca
        self._paused: set[int] = set()

    def _compose(self, *args: str) -> None:
        files = [arg for path in self.compose_files for arg in ("-f", str(path))]
        argv = [*self.command, "-p", self.project, *files, *args]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def _service(self, index: int) -> str:
        return f"follower{index + 1}"

    def kill_leader(self) -> None:
        """SIGKILL the leader's process: no shutdown, no final fsync."""
        self._compose("kill", "-s", "SIGKILL", "leader")

    def restart_leader(self, timeout: float = 60.0) -> None:
        self._compose("start", "leader")
        wait_healthy([self.leader_url], timeout, path="/ready", ca=self.ca)

    def kill_follower(self, index: int) -> None:
        """Stop the container at once (`stop -t 0`), so its restart policy leaves it down."""
        self._compose("stop", "-t", "0", self._service(index))

    def restart_follower(self, index: int, fresh: bool = False, timeout: float = 60.0) -> None:
        """Start it again; `fresh` first removes the container and its data volume."""
        service = self._service(index)
        if fresh:
            self._compose("rm", "-s", "-f", service)
            subprocess.run(
                ["docker", "volume", "rm", "-f", f"{self.project}_{service}-data"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._compose("up", "-d", "--no-deps", service)
        else:
            self._compose("start", service)
        wait_healthy([self.follower_urls[index]], timeout, ca=self.ca)

    def pause_follower(self, index: int) -> None:
        self._compose("pause", self._service(index))
        self._paused.add(index)

    def resume_follower(self, index: int) -> None:
        if index in self._paused:
            self._compose("unpause", self._service(index))
            self._paused.discard(index)

    def ensure_running(self) -> None:
        for index in sorted(self._paused):
            self.resume_follower(index)
        services = [self._service(i) for i in range(len(self.follower_urls))]
        self._compose("start", "leader", *services)
        wait_healthy([self.leader_url, *self.follower_urls], 60.0, ca=self.ca)
        wait_healthy([self.leader_url], 60.0, path="/ready", ca=self.ca)


def compose_files_from_env() -> list[Path]:
    """KV_COMPOSE_FILES (comma-separated, relative to the repository), else the main file."""
    named = [p.strip() for p in os.environ.get("KV_COMPOSE_FILES", "").split(",") if p.strip()]
    return [ROOT / name for name in named] or [ROOT / "docker-compose.yml"]


def default_compose_command() -> list[str]:
    """`KV_COMPOSE_COMMAND` if set, else Compose v1 if installed, else the v2 plugin."""
    configured = os.environ.get("KV_COMPOSE_COMMAND")
    if configured:
        return configured.split()
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


ETCD_MISSING = (
    "the etcd binary is not installed: apt-get install etcd-server, or point ETCD_ENDPOINTS "
    "at a running etcd"
)


class PrivateEtcd:
    """A single-member etcd on free loopback ports, with its own data dir, for runs and tests.

    Production points ETCD_ENDPOINTS at a three-member etcd instead."""

    def __init__(
        self, data_dir: Path, log_path: Path | None = None, certs: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        # tools/certs.py's folder: etcd serves HTTPS with etcd.pem and requires a client
        # certificate the same CA signed (--client-cert-auth). None: plain HTTP.
        self.certs = certs
        self.client_port, self.peer_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.certs else 'http'}://{HOST}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> PrivateEtcd:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError(ETCD_MISSING)
        peer = f"http://{HOST}:{self.peer_port}"
        command = [
            binary, "--name", "kv", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kv={peer}", "--log-level", "warn",
        ]  # fmt: skip
        ca = cert = None
        if self.certs is not None:
            ca = self.certs / "ca.pem"
            cert = (self.certs / "client.pem", self.certs / "client-key.pem")
            command += [
                "--cert-file", str(self.certs / "etcd.pem"),
                "--key-file", str(self.certs / "etcd-key.pem"),
                "--trusted-ca-file", str(ca), "--client-cert-auth",
            ]  # fmt: skip
        self.process = spawn(command, self.log_path, quiet=True)
        wait_healthy([self.url], timeout, [self.process], ca=ca, cert=cert)
        return self

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
        self.process = None


@dataclass
class HANodeProcess:
    """One `python -m kv.ha` process, in a process group of its own."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path | None = None
    cwd: Path = ROOT
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if 'TLS_CERT_FILE' in self.env else 'http'}://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        # spawn() gives it a process group of its own: the node is its process group.
        self.process = spawn(
            [sys.executable, "-m", "kv.ha"], self.log_path, cwd=self.cwd, env=self.env
        )

    def signal_group(self, signum: int) -> None:
        """Signal the node's whole process group, as an operator or a test would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        if self.process is not None:
            self.signal_group(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout, self.signal_group)
        self.process = None


@dataclass
class HACluster:
    """`nodes` HA nodes (`python -m kv.ha`) electing their leader through etcd: a private
    one on free ports unless `etcd_endpoints` names one."""

    local = True

    nodes: int = 6
    quorum: int | None = None
    min_delay_ms: float = 0
    max_delay_ms: float = 1000
    base_port: int = 8000
    secret: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    node_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    log_dir: Path | None = None
    data_dir: Path | None = None
    scratch: Path | None = None
    """Where the private etcd keeps its data (default: a folder under data_dir or /tmp)."""
    etcd_endpoints: str | None = None
    # tools/certs.py's folder: HTTPS and mutual TLS between the nodes, and to a private etcd
    # that requires the nodes' certificates. None: plain HTTP.
    certs: Path | None = None
    members: list[HANodeProcess] = field(default_factory=list, init=False)
    etcd: PrivateEtcd | None = field(default=None, init=False)
    _tmp: Path | None = field(default=None, init=False)

    def _ports(self) -> list[int]:
        if self.base_port == 0:
            return free_ports(self.nodes)
        return [self.base_port + i for i in range(self.nodes)]

    def start(self, timeout: float = 60.0) -> HACluster:
        ports = self._ports()
        ensure_free(ports)
        try:
            endpoints = self.etcd_endpoints or self._start_etcd()
            names = [f"node{i + 1}" for i in range(self.nodes)]
            scheme = "https" if self.certs else "http"
            cluster = ",".join(
                f"{n}={scheme}://{HOST}:{p}" for n, p in zip(names, ports, strict=True)
            )
            common = dict(self.extra_env)
            if self.secret is not None:
                common["REPLICATION_SECRET"] = self.secret
            if self.quorum is not None:
                common["WRITE_QUORUM"] = str(self.quorum)
            common |= {
                "CLUSTER": cluster,
                "ETCD_ENDPOINTS": endpoints,
                "MIN_DELAY_MS": f"{self.min_delay_ms:g}",
                "MAX_DELAY_MS": f"{self.max_delay_ms:g}",
            }
            self.members = [
                HANodeProcess(
                    name,
                    port,
                    {
                        **common,
                        "NODE_NAME": name,
                        **(
                            {} if self.data_dir is None else {"DATA_DIR": str(self.data_dir / name)}
                        ),
                        **self._tls(name),
                        **self.node_env.get(name, {}),
                    },
                    None if self.log_dir is None else self.log_dir / f"{name}.log",
                )
                for name, port in zip(names, ports, strict=True)
            ]
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            for member in self.members:
                member.start()
            self.wait_for_primary(timeout, starting=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _data(self, name: str) -> dict[str, str]:
        return {} if self.data_dir is None else {"DATA_DIR": str(self.data_dir / name)}

    def _tls(self, name: str) -> dict[str, str]:
        return tls_env(self.certs, name)

    @property
    def ca(self) -> Path | None:
        return None if self.certs is None else self.certs / "ca.pem"

    def _start_etcd(self) -> str:
        import tempfile

        if self.scratch is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="kv-etcd-"))
            self.scratch = self._tmp
        log_path = None if self.log_dir is None else self.log_dir / "etcd.log"
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self.etcd = PrivateEtcd(self.scratch / "etcd", log_path, self.certs).start()
        return self.etcd.url

    def stop(self) -> None:
        for member in self.members:
            member.stop()
        if self.etcd is not None:
            self.etcd.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> HACluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- who leads ------------------------------------------------------------------

    def member(self, name: str) -> HANodeProcess:
        return next(m for m in self.members if m.name == name)

    def node_urls(self) -> dict[str, str]:
        return {m.name: m.url for m in self.members if m.running}

    def url_of(self, name: str) -> str:
        return self.member(name).url

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def wait_for_primary(
        self, timeout: float = 30.0, exclude: Sequence[str] = (), *, starting: bool = False
    ) -> str:
        """Poll until exactly one node (not in `exclude`) is primary; its name. `starting`:
        fail at once if a node exits (a fault may have stopped one on purpose otherwise)."""
        for member in self.members if starting else ():
            if member.process is not None and member.process.poll() is not None:
                raise RuntimeError(f"{member.name} exited with code {member.process.returncode}")
        return wait_for_primary(self, timeout, exclude, self.members if starting else ())

    def primaries(self, client: httpx.Client | None = None) -> list[str]:
        return primaries(self, client)

    # -- faults, by node name ------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL the node's process group: nothing is left running."""
        self.member(name).kill()

    def terminate(self, name: str) -> None:
        """SIGTERM the node's process group: a leader hands over, then the node exits."""
        self.member(name).signal_group(signal.SIGTERM)

    def wait_stopped(self, name: str, timeout: float = 15.0) -> None:
        member = self.member(name)
        if member.process is not None:
            member.process.wait(timeout)
            member.process = None

    def pause(self, name: str) -> None:
        self.member(name).signal_group(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.member(name).signal_group(signal.SIGCONT)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        member = self.member(name)
        member.stop()
        member.start()
        processes = [member.process] if member.process else []
        wait_healthy([member.url], timeout, processes, ca=self.ca)

    def kill_etcd(self) -> None:
        assert self.etcd is not None, "etcd was not started by this cluster"
        self.etcd.kill()

    def start_etcd(self) -> None:
        assert self.etcd is not None, "etcd was not started by this cluster"
        self.etcd.start()

    def heal(self, timeout: float = 30.0) -> str:
        """Resume and restart every node; wait for one primary, and return its name."""
        for member in self.members:
            if member.running:
                member.signal_group(signal.SIGCONT)
            else:
                self.restart(member.name, timeout)
        return self.wait_for_primary(timeout)


class HAControl(Protocol):
    """An HA cluster the failover tests can fault by node name, whatever runs it."""

    local: bool

    @property
    def urls(self) -> list[str]: ...
    def node_urls(self) -> dict[str, str]: ...
    def url_of(self, name: str) -> str: ...
    def primaries(self, client: httpx.Client | None = None) -> list[str]: ...
    def wait_for_primary(self, timeout: float = 30.0, exclude: Sequence[str] = ()) -> str: ...
    def kill(self, name: str) -> None: ...
    def terminate(self, name: str) -> None: ...
    def wait_stopped(self, name: str, timeout: float = 15.0) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def restart(self, name: str, timeout: float = 30.0) -> None: ...
    def kill_etcd(self) -> None: ...
    def start_etcd(self) -> None: ...
    def heal(self, timeout: float = 30.0) -> str: ...


class _NodeUrls(Protocol):
    def node_urls(self) -> dict[str, str]: ...


def probe_client(cluster: object) -> httpx.Client:
    """A client for a cluster's probes: it trusts the cluster's CA when it has one."""
    ca: Path | None = getattr(cluster, "ca", None)
    return httpx.Client(timeout=0.5, trust_env=False, verify=verifier(ca))


def primaries(cluster: _NodeUrls, client: httpx.Client | None = None) -> list[str]:
    """The names of the nodes answering /primary with 200 now."""
    own = client is None
    client = client or probe_client(cluster)
    try:
        found = []
        for name, url in cluster.node_urls().items():
            try:
                if client.get(f"{url}/primary").status_code == 200:
                    found.append(name)
            except httpx.HTTPError:
                pass
        return found
    finally:
        if own:
            client.close()


def wait_for_primary(
    cluster: _NodeUrls,
    timeout: float,
    exclude: Sequence[str] = (),
    watched: Sequence[HANodeProcess] = (),
) -> str:
    """Poll until exactly one node (not in `exclude`) is primary; its name. A process in
    `watched` that exits fails the wait at once."""
    deadline = time.monotonic() + timeout
    with probe_client(cluster) as client:
        while True:
            for member in watched:
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(
                        f"{member.name} exited with code {member.process.returncode}"
                    )
            found = [n for n in primaries(cluster, client) if n not in exclude]
            if len(found) == 1:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no single primary after {timeout:g} s (found {found})")
            time.sleep(0.05)


class ComposeHACluster:
    """docker compose's `ha` profile, faulted by node name (ha1..ha6): SIGKILL and SIGTERM
    through `docker kill`; `pause`, `unpause`, `start` and etcd's container through compose."""

    local = False

    def __init__(self, project: str, nodes: dict[str, str], command: list[str] | None = None):
        self.project = project
        self.nodes = nodes
        self.command = command or default_compose_command()
        self.docker = os.environ.get("KV_DOCKER_COMMAND", "docker").split()
        self._containers: dict[str, str] = {}

    def _compose(self, *args: str) -> str:
        """Run compose on the `ha` profile; what it printed."""
        argv = [*self.command, "-p", self.project, "-f", str(ROOT / "docker-compose.yml"),
                "--profile", "ha", *args]  # fmt: skip
        done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)
        return done.stdout

    @property
    def urls(self) -> list[str]:
        return list(self.nodes.values())

    def node_urls(self) -> dict[str, str]:
        return dict(self.nodes)

    def url_of(self, name: str) -> str:
        return self.nodes[name]

    def primaries(self, client: httpx.Client | None = None) -> list[str]:
        return primaries(self, client)

    def wait_for_primary(self, timeout: float = 30.0, exclude: Sequence[str] = ()) -> str:
        return wait_for_primary(self, timeout, exclude)

    def _container(self, name: str) -> str:
        """The container's id, looked up once: `start` and `stop` keep it."""
        if name not in self._containers:
            self._containers[name] = self._compose("ps", "-q", name).strip()
        return self._containers[name]

    def _signal(self, name: str, signal_name: str) -> None:
        """Signal the node's process through `docker kill`, whose Go client delivers it in
        tens of milliseconds; compose v1 takes about a second to start, and a failover
        test times the failover from before the call."""
        argv = [*self.docker, "kill", "--signal", signal_name, self._container(name)]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def kill(self, name: str) -> None:
        self._signal(name, "SIGKILL")

    def terminate(self, name: str) -> None:
        self._signal(name, "SIGTERM")

    def wait_stopped(self, name: str, timeout: float = 15.0) -> None:
        self._compose("stop", "-t", str(int(timeout)), name)

    def pause(self, name: str) -> None:
        self._compose("pause", name)

    def resume(self, name: str) -> None:
        self._compose("unpause", name)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        self._compose("start", name)
        wait_healthy([self.nodes[name]], timeout)

    def kill_etcd(self) -> None:
        self._compose("stop", "-t", "0", "etcd")

    def start_etcd(self) -> None:
        self._compose("start", "etcd")

    def heal(self, timeout: float = 60.0) -> str:
        for name in self.nodes:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._compose("unpause", name)  # fails unless it is paused
        self._compose("start", "etcd", *self.nodes)
        wait_healthy(self.urls, timeout)
        return self.wait_for_primary(timeout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--followers", type=int, default=5, help="number of followers (default 5)")
    parser.add_argument(
        "--quorum",
        type=int,
        default=None,
        help="WRITE_QUORUM (default 3, at most --followers)",
    )
    parser.add_argument("--min-delay-ms", type=float, default=0, help="MIN_DELAY_MS (default 0)")
    parser.add_argument(
        "--max-delay-ms", type=float, default=1000, help="MAX_DELAY_MS (default 1000)"
    )
    parser.add_argument(
        "--timeout-ms",
        type=float,
        default=None,
        help="REPLICATION_TIMEOUT_MS (default 5000)",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=8000,
        help="leader port; followers follow (0: free ports)",
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="write each node's log here")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / ".data",
        help="each node's DATA_DIR goes in a folder under here (default .data)",
    )
    parser.add_argument("--memory", action="store_true", help="keep no data on disk (no DATA_DIR)")
    parser.add_argument(
        "--ha",
        action="store_true",
        help="elect the leader through etcd: --followers + 1 HA nodes (python -m kv.ha) and a "
        "private etcd, unless ETCD_ENDPOINTS names one",
    )
    parser.add_argument(
        "--tls",
        nargs="?",
        const=ROOT / "certs",
        type=Path,
        default=None,
        metavar="DIR",
        help="HTTPS on every node and mutual TLS for replication, with the certificates in "
        "DIR (default certs/; made by tools/certs.py when it has no ca.pem)",
    )
    parser.add_argument(
        "--auth-file", type=Path, default=None, help="AUTH_FILE for every node: bearer tokens"
    )
    args = parser.parse_args(argv)
    if args.followers < 0:
        parser.error("--followers must be 0 or more")
    if args.quorum is not None and not 0 <= args.quorum <= args.followers:
        parser.error(f"--quorum must be between 0 and --followers ({args.followers})")
    if args.min_delay_ms < 0 or args.max_delay_ms < args.min_delay_ms:
        parser.error("delays must satisfy 0 <= --min-delay-ms <= --max-delay-ms")
    return args


def ensure_certs(folder: Path, names: list[str]) -> None:
    """tools/certs.py's CA and certificates for `names` in `folder`, made unless there."""
    if all((folder / f"{name}.pem").exists() for name in ["ca", *names]):
        return
    if str(ROOT) not in sys.path:  # run as a script: tools/ is not a package on the path
        sys.path.insert(0, str(ROOT))
    from tools.certs import DEFAULT_NAMES, make_certs  # cryptography: only when needed

    make_certs(folder, sorted(set(DEFAULT_NAMES) | set(names)))
    print(f"made a private CA and node certificates in {folder}/")


def raise_keyboard_interrupt(*_: object) -> None:
    """SIGTERM stops the cluster the same way Ctrl-C does."""
    raise KeyboardInterrupt


def main_ha(args: argparse.Namespace) -> int:
    """`--ha`: a private etcd and HA nodes; print who leads, and each change of leader."""
    if not os.environ.get("ETCD_ENDPOINTS") and shutil.which("etcd") is None:
        print(ETCD_MISSING, file=sys.stderr)
        return 1
    data_dir = None if args.memory else args.data_dir / "ha"
    if args.tls is not None:
        ensure_certs(
            args.tls, [f"node{i}" for i in range(1, args.followers + 2)] + ["etcd", "client"]
        )
    cluster = HACluster(
        nodes=args.followers + 1,
        quorum=args.quorum,
        min_delay_ms=args.min_delay_ms,
        max_delay_ms=args.max_delay_ms,
        base_port=args.base_port,
        log_dir=args.log_dir,
        data_dir=data_dir,
        scratch=None if data_dir is None else data_dir,
        etcd_endpoints=os.environ.get("ETCD_ENDPOINTS") or None,
        certs=args.tls,
        extra_env={} if args.auth_file is None else {"AUTH_FILE": str(args.auth_file)},
    )
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        cluster.start()
        where = cluster.etcd.url if cluster.etcd else cluster.etcd_endpoints
        print(f"etcd      {where}")
        for member in cluster.members:
            print(f"{member.name:<9} {member.url}   (API docs: {member.url}/docs)")
        print("writes go to the leader; a follower redirects them there (curl -L).")
        print(f"{'data in ' + str(data_dir) if data_dir else 'memory only'}; Ctrl-C stops it.")
        leader = None
        while all(member.running for member in cluster.members):
            found = cluster.primaries()
            now = found[0] if len(found) == 1 else None
            if now != leader:
                print(f"leader: {now or 'none (election under way)'}", flush=True)
                leader = now
            time.sleep(0.5)
        failed = [m.name for m in cluster.members if not m.running]
        print(f"a node exited: {', '.join(failed)}; stopping the cluster", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the cluster", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"cluster failed to start: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ha:
        return main_ha(args)
    if args.tls is not None:
        ensure_certs(args.tls, ["leader", *(f"follower{i}" for i in range(1, args.followers + 1))])
    cluster = LocalCluster(
        followers=args.followers,
        quorum=args.quorum,
        min_delay_ms=args.min_delay_ms,
        max_delay_ms=args.max_delay_ms,
        timeout_ms=args.timeout_ms,
        base_port=args.base_port,
        log_dir=args.log_dir,
        data_dir=None if args.memory else args.data_dir,
        certs=args.tls,
        auth_file=args.auth_file,
    )
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        cluster.start()
        pids = [node.process.pid if node.process else 0 for node in cluster.nodes]
        print(f"leader    {cluster.leader_url}   pid {pids[0]:<7}  (/docs: the API; /ui: live)")
        for i, url in enumerate(cluster.follower_urls, 1):
            print(f"follower{i} {url}   pid {pids[i]}")
        if args.tls is not None:
            print(f"TLS: curl --cacert {args.tls / 'ca.pem'} {cluster.leader_url}/health")
        if args.auth_file is not None:
            print(f"tokens from {args.auth_file}: curl -H 'Authorization: Bearer <token>' ...")
        where = f"data in {cluster.data_dir}" if cluster.data_dir else "memory only"
        print(f"{where}; Ctrl-C stops the cluster.", flush=True)
        while all(node.running for node in cluster.nodes):
            time.sleep(0.5)
        failed = [node for node in cluster.nodes if not node.running]
        print(
            f"a node exited: {', '.join(n.url for n in failed)}; stopping the cluster",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\nstopping the cluster", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"cluster failed to start: {error}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C (or SIGTERM to the whole group) must not interrupt the shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
