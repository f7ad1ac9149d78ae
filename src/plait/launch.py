"""Start N local processes through torch's elastic launcher (the machinery behind torchrun).

A process that fails reaches the user as one line: plait's own message when it raised a
:class:`~plait.errors.PlaitError` (a bad checkpoint, data too small, ...), else the exception's
type and message. The full tracebacks go to a log file and, at INFO level (`plait -v`), to the
log; torch's launcher does not dump them on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait import errors
from plait.errors import ConfigError, LaunchError, PlaitError, PreemptedError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
LOCAL_PROCS_ENV = "PLAIT_LOCAL_PROCS"  # processes of one job sharing this machine's cores
# Loggers of torch's launcher that print a failed process's whole traceback on the terminal.
_TORCH_LAUNCH_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


def resolve_device(name: str) -> torch.device:
    """The device `train.device` names: "auto" is CUDA when present, else the CPU; "cpu" is the
    CPU even where CUDA exists; "cuda" must find CUDA (a silent CPU run would be a lie)."""
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f'train.device="cuda" but this machine has no usable CUDA device (torch '
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use "
                'train.device="cpu" or "auto" (CUDA when present)')
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    raise ConfigError(f"train.device={name!r} is invalid; valid: {', '.join(DEVICES)}")


@dataclass
class RankFailure:
    """Why one process failed: a one-line message and, when known, its traceback."""

    rank: int
    message: str
    traceback: str = ""
    exitcode: int | None = None


def one_line(exc: BaseException) -> str:
    """A PlaitError's own message (it names the input at fault), else "Type: message"."""
    if isinstance(exc, PlaitError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _plait_error_names() -> set[str]:
    names, todo = set(), [PlaitError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names | {n for n in dir(errors) if n.endswith("Error")}


def _from_torch_message(message: str) -> str:
    """torch records a child's exception as "Type: message"; keep only a PlaitError's message."""
    name, sep, text = message.partition(": ")
    return text if sep and name in _plait_error_names() else message


def failure_error(failures: list[RankFailure], log_path: str | Path | None = None) -> LaunchError:
    """One LaunchError for the failed ranks: their distinct one-line messages, with the ranks
    that raised each, and where the tracebacks are (written to `log_path` when given)."""
    written = None
    with_tb = [f for f in failures if f.traceback]
    if log_path is not None and with_tb:
        try:
            path = Path(log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"--- rank {f.rank} (exit code {f.exitcode}) ---\n{f.traceback.rstrip()}\n"
                                    for f in with_tb))
            written = path
        except OSError as exc:
            log.warning("could not write the workers' tracebacks to %s: %s", log_path, exc)
    for f in with_tb:
        log.info("rank %d failed:\n%s", f.rank, f.traceback.rstrip())
    by_message: dict[str, list[int]] = {}
    for f in sorted(failures, key=lambda f: f.rank):
        by_message.setdefault(f.message.strip() or f"exit code {f.exitcode}", []).append(f.rank)
    lines = []
    for message, ranks in by_message.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
        lines.append(f"{message} ({who})" if len(by_message) == 1 else f"{who}: {message}")
    where = f"traceback in {written}" if written else ""
    if with_tb and not log.isEnabledFor(logging.INFO):  # at INFO it was just logged
        where = (f"{where}; " if where else "") + "rerun with -v to see it here"
    return LaunchError("\n".join(lines) + (f"\n({where})" if where else ""))


@contextlib.contextmanager
def torch_launcher_quiet() -> Iterator[None]:
    """Keep torch's launcher from printing a failed child's traceback, unless plait logs at INFO
    (then the user asked for detail). The levels are restored afterwards."""
    if log.isEnabledFor(logging.INFO):
        yield
        return
    saved = {}
    for name, obj in list(logging.root.manager.loggerDict.items()):
        if isinstance(obj, logging.Logger) and name.startswith(_TORCH_LAUNCH_LOGGERS):
            saved[name] = obj.level
            obj.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def launch(fn: Callable[..., Any], args: tuple, nproc: int, max_restarts: int = 0,
           run_id: str | None = None, log_path: str | Path | None = None) -> dict[int, Any]:
    """Run `fn(*args)` in `nproc` processes on this machine; returns {rank: return value}.

    Uses a standalone c10d rendezvous on a free loopback port, as `torchrun --standalone` does.
    A failing process ends the job with :class:`LaunchError` giving its one-line message; the
    tracebacks are written to `log_path` when given.

    Preemption (see :mod:`plait.elastic.preemption`) ends it with :class:`PreemptedError`, whether
    the signal reached the workers (a process whose `fn` returns a summary marked "preempted"
    exits with code 75) or this process (torch's launcher passes it on to the workers, which
    checkpoint, and raises here).
    """
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from plait.elastic.preemption import PREEMPTED_EXIT_CODE

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=run_id or f"plait-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
        max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with torch_launcher_quiet():
            return elastic_launch(config, exit_when_preempted)(fn, *args)
    except SignalException as exc:
        raise PreemptedError(f"stopped by {signal.Signals(exc.sigval).name} (passed on to the workers, "
                             "which checkpoint first unless [checkpoint] preemption is off)") from None
    except ChildFailedError as exc:
        if exc.get_first_failure()[1].exitcode == PREEMPTED_EXIT_CODE:
            raise PreemptedError("preempted: the workers checkpointed and stopped") from None
        failures = []
        for rank, failure in sorted(exc.failures.items()):
            msg, tb = failure.message, ""
            if isinstance(msg, dict):
                tb = str(msg.get("extraInfo", {}).get("py_callstack", ""))
                msg = msg.get("message", msg)
            data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
            if not tb and isinstance(data, dict):
                tb = str(data.get("extraInfo", {}).get("py_callstack", ""))
            failures.append(RankFailure(rank, _from_torch_message(str(msg)), tb, failure.exitcode))
        raise failure_error(failures, log_path) from None


def exit_when_preempted(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` as a launched worker (the entry point of :func:`launch` and of plait's elastic
    agent): a preempted run's worker exits with code 75 instead of handing back its summary, as
    `python -m plait.train.run` does under torchrun. Its launcher then knows the job was
    preempted, not failed; and when the signal reached the launcher as well, it is no longer
    collecting results: a worker that waited to hand one over would be killed after torch's 30 s
    grace period."""
    import sys

    from plait.elastic.preemption import PREEMPTED_EXIT_CODE

    result = fn(*args)
    if isinstance(result, dict) and result.get("preempted"):
        logging.shutdown()
        sys.exit(PREEMPTED_EXIT_CODE)
    return result


def configure_threads() -> None:
    """Share the CPU cores between the local processes instead of oversubscribing them."""
    import torch

    # A local elastic job runs several one-process "nodes" here: it names how many may share the
    # machine, so every round of it uses the same thread count (and so the same float sums).
    local = int(os.environ.get(LOCAL_PROCS_ENV) or os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


class ElasticJob:
    """A local elastic job: one process per "node", each running plait's elastic agent
    (:mod:`plait.elastic.agent`) around a rendezvous store that this process hosts.

    Nodes leave when their worker is killed and join with :meth:`add_node`; the job goes on at
    every size in [min_nodes, max_nodes]. Each node's output goes to WORK_DIR/node<i>.log.
    """

    def __init__(self, cfg_dict: dict[str, Any], nodes: int, min_nodes: int, max_nodes: int,
                 work_dir: str | Path, nproc_per_node: int = 1, run_id: str | None = None):
        import json

        import torch.distributed as dist

        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg_dict = {**cfg_dict, "elastic": {**cfg_dict.get("elastic", {}), "min_nodes": min_nodes,
                                            "max_nodes": max_nodes, "nproc_per_node": nproc_per_node}}
        self.cfg_dict = cfg_dict
        self.config_path = self.work_dir / "config.json"
        self.config_path.write_text(json.dumps(cfg_dict))
        self.min_nodes, self.max_nodes, self.nproc_per_node = min_nodes, max_nodes, nproc_per_node
        self.run_id = run_id or f"plait-{uuid.uuid4().hex[:8]}"
        # Hosted here, it outlives every node: any of them may leave.
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.endpoint = f"127.0.0.1:{self.store.port}"
        self.nodes: list[Any] = []
        for _ in range(nodes):
            self.add_node()

    def add_node(self, standby: bool = False):
        """Start one more node; it joins at the next rendezvous round (the others restart).

        `standby`: the node starts up (Python, torch) but joins only at :meth:`activate`.
        """
        import subprocess
        import sys

        i = len(self.nodes)
        e = self.cfg_dict["elastic"]
        cmd = [sys.executable, "-m", "plait.elastic.agent", str(self.config_path),
               "--nnodes", f"{self.min_nodes}:{self.max_nodes}", "--nproc-per-node", str(self.nproc_per_node),
               "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id, "--store-hosted-elsewhere",
               "--result", str(self.work_dir / f"node{i}.json")]
        if standby:
            cmd += ["--standby", str(self._standby_file(i))]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               LOCAL_PROCS_ENV: str(self.max_nodes * self.nproc_per_node)}
        with open(self.work_dir / f"node{i}.log", "wb") as out:
            # Its own session: close() can end the node and its workers together.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        log.info("elastic node %d started (pid %d, %s nodes allowed)", i, proc.pid,
                 f"{e['min_nodes']}:{e['max_nodes']}")
        self.nodes.append(proc)
        return proc

    def _standby_file(self, i: int) -> Path:
        return self.work_dir / f"node{i}.join"

    def standby_ready(self, i: int) -> bool:
        """Whether standby node `i` has started up and waits for :meth:`activate`."""
        return self._standby_file(i).with_name(f"node{i}.join.ready").exists()

    def activate(self, i: int) -> None:
        """Let standby node `i` join the job."""
        self._standby_file(i).touch()

    def outcomes(self) -> list[dict[str, Any] | None]:
        """Each node's outcome file (None while it runs or when it died without one)."""
        import json

        found = []
        for i in range(len(self.nodes)):
            path = self.work_dir / f"node{i}.json"
            found.append(json.loads(path.read_text()) if path.is_file() else None)
        return found

    def wait(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for every node to end; returns rank 0's summary, or raises LaunchError
        (PreemptedError when every node stopped on a preemption)."""
        import time

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._forwarding_preemption():
            while any(p.poll() is None for p in self.nodes):
                if deadline is not None and time.monotonic() > deadline:
                    self.close()
                    raise LaunchError(f"the elastic job did not finish within {timeout_s:g} s "
                                      f"(node logs in {self.work_dir})")
                time.sleep(0.1)
        outcomes = self.outcomes()
        for out in outcomes:
            if out and out["ok"]:
                results = {int(k): v for k, v in out["results"].items()}
                for v in results.values():
                    if isinstance(v, dict) and v.get("checkpoint"):
                        return v
        for out in outcomes:
            if out and out["ok"]:
                return next(iter(out["results"].values()))
        from plait.elastic.preemption import PREEMPTED_EXIT_CODE

        if all(p.returncode == PREEMPTED_EXIT_CODE for p in self.nodes):
            raise PreemptedError("preempted: every node's workers checkpointed and stopped")
        failures = [RankFailure(int(rank), _from_torch_message(str(f["message"])), "", f["exitcode"])
                    for out in outcomes if out for rank, f in out["failures"].items()]
        if not failures:
            failures = [RankFailure(i, f"node exited with code {p.returncode}", "", p.returncode)
                        for i, p in enumerate(self.nodes)]
        raise failure_error(failures)

    @contextlib.contextmanager
    def _forwarding_preemption(self) -> Iterator[None]:
        """While waiting: SIGTERM or SIGUSR1 here is passed on to every node as SIGTERM (each node's
        agent passes it to its workers, which checkpoint, and exits 75). Each node runs in a session
        of its own, so a signal to this process alone would otherwise leave them running."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def forward(signum: int, frame: Any) -> None:
            log.warning("%s received: passing SIGTERM on to the elastic nodes", signal.Signals(signum).name)
            for p in self.nodes:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGTERM)

        wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]
        previous = {s: signal.signal(s, forward) for s in wanted}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def close(self) -> None:
        """End every node that still runs, with its workers."""
        import signal

        for p in self.nodes:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.store = None

    def __enter__(self) -> ElasticJob:  # noqa: PYI034 - a plain class, never subclassed
        return self

    def __exit__(self, *exc) -> None:
        self.close()
