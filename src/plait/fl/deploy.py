"""A real Flower deployment of a plait config: one SuperLink, one SuperNode per data holder.

:func:`prepare` writes everything a deployment needs into one folder:

- `app/`: the Flower app (pyproject.toml naming `plait.fl.app`'s apps, the plait config as its
  run config). No template is fetched (`flwr new` would) and the SuperLink is told not to
  install the app's dependencies: plait must already be installed where the apps run.
- `certs/`: a self-signed CA and the SuperLink's TLS certificate for its address (127.0.0.1).
- `keys/`: an ECDSA P-384 key pair per SuperNode (OpenSSH format) for node authentication;
  each public key is registered with `flwr supernode register` before its node starts, and a
  node whose key is not registered is refused by the SuperLink.
- `flwr_home/config.toml`: the `flwr` CLI's connection to the SuperLink (address, CA).

:meth:`Deployment.commands` lists the commands in order (README shows them);
:class:`LoopbackDeployment` starts and stops them on this machine (the end-to-end test).
Every process gets FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_UPDATE_CHECK=1 and the folder's own
FLWR_HOME, so nothing is fetched.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import ConfigError, LaunchError

log = logging.getLogger(__name__)

APP_MODULE = "plait_fl_app"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: no telemetry, no update check, no dependency
    installs, a private FLWR_HOME, and this Python's scripts first on PATH."""
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(flwr_home),
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    return env


def make_certificates(out: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for `host`: (ca.crt, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plait federated CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([alt, x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = out / "ca.crt", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what SuperNode authentication reads)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a TOML basic string (JSON's escapes are TOML's)


def write_app(app_dir: Path, config_text: str) -> Path:
    """The Flower app folder: pyproject.toml and a module re-exporting plait's apps."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / f"{APP_MODULE}.py").write_text(
        '"""The Flower apps of a plait federated run (installed plait provides them)."""\n'
        "from plait.fl.app import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n')
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plait-fl"
version = "1.0.0"
description = "A plait federated run on Flower"
dependencies = []  # plait[fl] is installed where the SuperLink and SuperNodes run

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "plait"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server_app"
clientapp = "{APP_MODULE}:client_app"

[tool.flwr.app.config]
plait-config = {_toml_string(config_text)}
""")
    return app_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    """The files of a deployment and the commands that run it (see the module docstring)."""

    root: Path
    nodes: int
    host: str = "127.0.0.1"
    port: int = 9093
    node_ports: list[int] = field(default_factory=list)

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr_home"

    def cert(self, name: str) -> Path:
        return self.root / "certs" / name

    def node_key(self, i: int, public: bool = False) -> Path:
        return self.root / "keys" / (f"supernode_{i}.pub" if public else f"supernode_{i}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def superlink(self) -> list[str]:
        return ["flower-superlink", "--host", self.host, "--port", str(self.port),
                "--ssl-ca-certfile", str(self.cert("ca.crt")), "--ssl-certfile", str(self.cert("server.pem")),
                "--ssl-keyfile", str(self.cert("server.key")), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--database", str(self.root / "state.db")]

    def register(self, i: int) -> list[str]:
        return ["flwr", "supernode", "register", str(self.node_key(i, public=True)), "plait"]

    def supernode(self, i: int, key: int | None = None) -> list[str]:
        """SuperNode `i` (partition i); `key` picks another node's key pair and port (tests use
        an unregistered one)."""
        k = i if key is None else key
        return ["flower-supernode", "--superlink", self.address, "--root-certificates", str(self.cert("ca.crt")),
                "--auth-supernode-private-key", str(self.node_key(k)),
                "--node-config", f"partition-id={i} num-partitions={self.nodes}",
                "--host", self.host, "--port", str(self.node_ports[k] if k < len(self.node_ports) else 9094 + k)]

    def run(self) -> list[str]:
        return ["flwr", "run", str(self.app_dir), "plait", "--stream"]

    def commands(self) -> list[str]:
        """The deployment, one shell command a line, in the order to run them."""
        env = (f"export FLWR_HOME={shlex.quote(str(self.flwr_home))} FLWR_TELEMETRY_ENABLED=0 "
               "FLWR_DISABLE_UPDATE_CHECK=1")
        lines = [env, shlex.join(self.superlink()) + " &"]
        lines += [shlex.join(self.register(i)) for i in range(self.nodes)]
        lines += [shlex.join(self.supernode(i)) + " &" for i in range(self.nodes)]
        lines.append(shlex.join(self.run()))
        return lines


def prepare(config_text: str, root: str | Path, nodes: int, *, host: str = "127.0.0.1",
            port: int = 9093, extra_keys: int = 0) -> Deployment:
    """Write the app, certificates, node keys (plus `extra_keys` unregistered ones) and the CLI's
    connection for a deployment of `nodes` SuperNodes into `root`."""
    if nodes < 1:
        raise ConfigError(f"a deployment needs ≥ 1 SuperNode, got {nodes}")
    dep = Deployment(Path(root).resolve(), nodes, host, port)
    write_app(dep.app_dir, config_text)
    make_certificates(dep.root / "certs", host)
    for i in range(nodes + extra_keys):
        make_node_key(dep.root / "keys", f"supernode_{i}")
    dep.flwr_home.mkdir(parents=True, exist_ok=True)
    (dep.flwr_home / "config.toml").write_text(f"""[superlink]
default = "plait"

[superlink.plait]
address = "{dep.address}"
root-certificates = "{dep.cert('ca.crt')}"
""")
    return dep


class LoopbackDeployment:
    """Start a prepared deployment on this machine and stop every process it started.

    Use as a context manager; every process is killed on exit, whatever happened.
    """

    def __init__(self, dep: Deployment, log_dir: Path | None = None):
        self.dep = dep
        self.env = flower_env(dep.flwr_home)
        self.log_dir = log_dir or dep.root / "logs"
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> "LoopbackDeployment":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.dep.root,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def call(self, name: str, cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.dep.root)
        (self.log_dir / f"{name}.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise LaunchError(f"{shlex.join(cmd)} failed ({res.returncode}): {(res.stdout + res.stderr)[-2000:]}")
        return res

    def log_text(self, name: str) -> str:
        p = self.log_dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.dep.host, self.dep.port)) == 0:
                    return
            for name, p in self.procs:
                if p.poll() is not None:
                    raise LaunchError(f"{name} exited ({p.returncode}): {self.log_text(name)[-2000:]}")
            time.sleep(0.2)
        raise LaunchError(f"the SuperLink did not listen on {self.dep.address} within {timeout:.0f} s")

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.procs.clear()


def flower_tools_available() -> bool:
    """Whether Flower's command-line tools are installed next to this Python."""
    return all(shutil.which(t, path=str(Path(sys.executable).parent)) for t in
               ("flower-superlink", "flower-supernode", "flwr"))
