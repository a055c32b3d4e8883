"""Run launchers for scaling sweeps: each run of ``python -m moe_gato.cli ARGS`` starts as a
local process tree (torchrun, the DeepSpeed launcher or plain python) or as a SLURM job
submitted with submitit, whose job runs the same launchers over the nodes SLURM gave it.

    from scaling.launch import Job, LauncherConfig, SlurmConfig, make_launcher

    launcher = make_launcher(LauncherConfig(kind="local", runner="torchrun", max_parallel=2))
    handle = launcher.submit(Job(name="d256", run_dir=Path("runs/sweep/d256"), procs=2,
                                 args=["train", "--config", "configs/train/tiny-moe.yaml",
                                       "--data", "data", "--out", "runs/sweep/d256"]))
    status = handle.wait()  # 0 when the run succeeded; its log is runs/sweep/d256/launcher.log

    make_launcher(LauncherConfig(kind="slurm", runner="deepspeed", max_parallel=8,
                                 slurm=SlurmConfig(partition="gpu", nodes=2, gpus_per_node=8)))

``submit`` blocks while ``max_parallel`` runs of this launcher are in flight. A run's
processes start in the folder the job was made in (``Job.cwd``, default the caller's), so
relative paths in ``args`` mean what they meant to the caller; ``run_dir`` is made absolute
there too. The children import this checkout's code (its root leads their PYTHONPATH).
Exit statuses follow the shell: a run killed by signal N gives 128 + N. A SLURM job gives
its launcher's status, unless SLURM cancelled it or ran out its time or memory
(``STATE_STATUS``), or it ended without reporting one (1). Clients of a local test cluster
need its ``SLURM_CONF`` (``scripts/slurm_cluster.sh env``).

A submitted run can be found again by a later process: ``handle.record()`` is a JSON-able
dict (local: pid, host and the process's start time; SLURM: job id and submitit folder), and
``launcher.attach(record, run_dir)`` gives a handle on it while it lives (None once a local
run is gone). A local run that ended while nobody held its handle left no exit status:
its handle's ``poll`` gives ``UNKNOWN_EXIT``, and the caller judges the run by its outputs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
KINDS = ("local", "slurm")
RUNNERS = ("torchrun", "deepspeed", "python")
LOG_NAME = "launcher.log"

#: SLURM states in which a job will not run any further
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED"}
#: exit status of a run that SLURM ended: scancel stops a job with SIGTERM (128 + 15),
#: a timeout as coreutils' ``timeout`` does, the OOM killer with SIGKILL (128 + 9)
STATE_STATUS = {"CANCELLED": 143, "TIMEOUT": 124, "OUT_OF_MEMORY": 137}
#: ``poll`` of a re-attached local run that ended unobserved: its exit status is lost
UNKNOWN_EXIT = -1


# ------------------------------------------------------------------------------ configs
@dataclasses.dataclass(kw_only=True)
class Job:
    """One run: ``python -m moe_gato.cli ARGS`` on ``procs`` data-parallel ranks per node."""

    name: str
    run_dir: Path
    args: list[str]
    procs: int = 1
    threads: int = 1
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the folder the run's processes start in (default: the caller's)
    cwd: Path | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*", self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits and _ . = + -")
        self.cwd = Path(self.cwd or Path.cwd()).absolute()
        self.run_dir = self.cwd / self.run_dir  # relative paths are the caller's
        if not self.args or not all(isinstance(a, str) for a in self.args):
            raise ValueError(f"args: a non-empty list of strings, got {self.args!r}")
        for field in ("procs", "threads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: must be >= 1, got {getattr(self, field)}")


@dataclasses.dataclass(kw_only=True)
class SlurmConfig:
    """Resources of each run's SLURM job; ``cpus_per_task`` defaults to procs x threads of
    the run (one task per node). ``extra_sbatch`` adds sbatch options, e.g.
    ``{"mem": "64G", "qos": "high"}``; ``folder`` holds submitit's scripts and logs and must
    be visible from the nodes."""

    partition: str | None = None
    nodes: int = 1
    cpus_per_task: int | None = None
    gpus_per_node: int = 0
    time_min: int = 60
    folder: Path = Path("runs/submitit")  # relative: to the folder the config is made in
    extra_sbatch: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.folder = Path(self.folder).absolute()
        for field, low in (("nodes", 1), ("time_min", 1), ("gpus_per_node", 0)):
            if getattr(self, field) < low:
                raise ValueError(f"slurm.{field}: must be >= {low}, got {getattr(self, field)}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"slurm.cpus_per_task: must be >= 1 or None, got {self.cpus_per_task}")
        bad = [k for k in self.extra_sbatch if not re.fullmatch(r"[a-z][a-z0-9_-]*", k)]
        if bad:
            raise ValueError(f"slurm.extra_sbatch: keys are sbatch long options without dashes "
                             f"(e.g. 'mem'), got {bad}")


@dataclasses.dataclass(kw_only=True)
class LauncherConfig:
    kind: Literal["local", "slurm"] = "local"
    runner: Literal["torchrun", "deepspeed", "python"] = "torchrun"
    max_parallel: int = 1
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner: {self.runner!r} is not one of {', '.join(RUNNERS)}")
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel: must be >= 1, got {self.max_parallel}")
        if isinstance(self.slurm, dict):  # as read from YAML
            names = {f.name for f in dataclasses.fields(SlurmConfig)}
            unknown = sorted(set(self.slurm) - names)
            if unknown:
                raise ValueError(f"slurm: unknown keys {unknown}; allowed: {sorted(names)}")
            self.slurm = SlurmConfig(**self.slurm)
        if self.runner == "python" and self.kind == "slurm" and self.slurm.nodes > 1:
            raise ValueError("runner: python starts one process; slurm.nodes must be 1")


# ----------------------------------------------------------------- commands and environment
def run_command(job: Job, runner: str, *, port: int, hosts: Sequence[str] = (),
                node_rank: int = 0, hostfile: Path | None = None) -> list[str]:
    """The command that starts one node's processes of a run. ``hosts`` are the nodes of the
    run (none: this machine alone); on several, every node runs its own launcher with its
    ``node_rank``, and rank 0's node ``hosts[0]`` serves the rendezvous on ``port``."""
    cli = ["-m", "moe_gato.cli", *job.args]
    if runner == "python":
        return [sys.executable, "-u", *cli]
    if runner == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(job.procs)]
        if len(hosts) > 1:
            cmd += ["--nnodes", str(len(hosts)), "--node-rank", str(node_rank),
                    "--master-addr", hosts[0], "--master-port", str(port)]
        else:
            cmd += ["--standalone"]  # a free local port of its own
        return cmd + cli
    assert runner == "deepspeed", runner
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    if hostfile is not None:
        # every node starts its own ranks (no ssh between nodes, no ssh check)
        cmd += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                "--master_addr", hosts[0]]
    else:
        cmd += ["--num_gpus", str(job.procs)]
    # --no_local_rank: the launcher would put --local_rank before the CLI's subcommand; the
    # ranks read LOCAL_RANK from the environment instead
    return cmd + ["--module", "--no_local_rank", "moe_gato.cli", *job.args]


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed's hostfile: one ``host slots=N`` line per node."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def run_env(job: Job, runner: str, base: dict[str, str]) -> dict[str, str]:
    """The run's environment: ``base`` with thread counts, offline datasets, this checkout
    first on PYTHONPATH (the run imports the code that launched it, from any folder) and
    the job's own variables."""
    path = [str(REPO)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep)
                          if p and p != str(REPO)]
    env = {**base, "HF_DATASETS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(job.threads),
           "PYTHONPATH": os.pathsep.join(path)}
    if runner == "deepspeed" and "DS_ACCELERATOR" not in env:
        import torch  # the launcher reads DS_ACCELERATOR when it starts; CPUs need "cpu"

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return {**env, **job.env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def exit_status(returncode: int) -> int:
    """The shell's convention: a process killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def note(run_dir: Path, message: str) -> None:
    """Appends one line of the launcher's own to the run's log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_NAME, "a") as f:
        f.write(f"[launcher {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")


# ------------------------------------------------------------------------- the interface
class Handle:
    """A submitted run. ``job_id``: the pid (local) or the SLURM job id."""

    job_id: str

    def poll(self) -> int | None:
        """The run's exit status once it has finished, else None."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the run's exit status; raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.job_id} still going after {timeout} s")
            time.sleep(self.poll_interval_s)
        return status

    def cancel(self) -> None:
        raise NotImplementedError

    def record(self) -> dict:
        """What ``Launcher.attach`` needs to find the run again from another process."""
        raise NotImplementedError

    poll_interval_s = 1.0


class Launcher:
    def __init__(self, cfg: LauncherConfig):
        self.cfg = cfg
        self._in_flight: list[Handle] = []

    def submit(self, job: Job) -> Handle:
        """Starts ``job`` once fewer than ``max_parallel`` runs of this launcher are going."""
        if self.cfg.runner == "python" and job.procs != 1:
            raise ValueError(f"procs: runner python starts one process, job {job.name} asks "
                             f"for {job.procs}")
        while True:
            self._in_flight = [h for h in self._in_flight if h.poll() is None]
            if len(self._in_flight) < self.cfg.max_parallel:
                break
            time.sleep(self._in_flight[0].poll_interval_s)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        handle = self._start(job)
        self._in_flight.append(handle)
        return handle

    def attach(self, record: dict, run_dir: Path) -> Handle | None:
        """A handle on a run another process submitted (its ``handle.record()``), counted
        among this launcher's runs in flight; None when the run no longer exists."""
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            raise ValueError(f"{run_dir}: the run's launch record {record!r} names no launcher "
                             f"(kind local or slurm)")
        if record["kind"] != self.cfg.kind:
            raise ValueError(f"{run_dir}: the run was launched by launcher.kind "
                             f"{record['kind']}, this sweep uses {self.cfg.kind}; rerun it "
                             f"with launcher.kind={record['kind']} until the run has ended")
        handle = self._attach(record, Path(run_dir))
        if handle is not None:
            self._in_flight.append(handle)
        return handle

    def _start(self, job: Job) -> Handle:
        raise NotImplementedError

    def _attach(self, record: dict, run_dir: Path) -> Handle | None:
        raise NotImplementedError


def make_launcher(cfg: LauncherConfig) -> Launcher:
    return LocalLauncher(cfg) if cfg.kind == "local" else SlurmLauncher(cfg)


# ----------------------------------------------------------------------------------- local
class LocalHandle(Handle):
    poll_interval_s = 0.2

    def __init__(self, proc: subprocess.Popen, run_dir: Path):
        self._proc, self._run_dir = proc, run_dir
        self.job_id = str(proc.pid)
        self._status: int | None = None
        self._record = process_record(proc.pid)

    def record(self) -> dict:
        return dict(self._record)

    def poll(self) -> int | None:
        if self._status is None and self._proc.poll() is not None:
            self._status = exit_status(self._proc.returncode)
            note(self._run_dir, f"pid {self.job_id} exited with status {self._status}")
        return self._status

    def wait(self, timeout: float | None = None) -> int:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"run {self.job_id} still going after {timeout} s") from None
        return self.poll()

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the run's process tree (launchers pass it to their ranks), SIGKILL to
        whatever is left after ``grace_s``."""
        import psutil

        if self._proc.poll() is not None:
            return
        try:
            descendants = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        note(self._run_dir, f"cancelling pid {self.job_id} and {len(descendants)} descendants")
        self._proc.terminate()
        for p in descendants:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        # the direct child is reaped by Popen only: had psutil reaped it, Popen would read
        # its exit status as 0
        deadline = time.monotonic() + grace_s
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._proc.wait()


def process_record(pid: int) -> dict:
    """A local process's identity: pid, host and start time (a reused pid has another)."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        started = None
    return {"kind": "local", "pid": pid, "host": socket.gethostname(), "create_time": started}


def _alive(record: dict):
    """The psutil.Process of a recorded local run while it lives (not a zombie), else None."""
    import psutil

    try:
        proc = psutil.Process(int(record["pid"]))
        if (record.get("create_time") is not None
                and abs(proc.create_time() - record["create_time"]) > 1e-3):
            return None  # the pid was reused by another process
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return None


class AttachedLocalHandle(Handle):
    """A local run started by another process (a sweep driver that was killed): alive while
    its recorded process is; its exit status is lost (``UNKNOWN_EXIT``)."""

    poll_interval_s = 0.2

    def __init__(self, record: dict, run_dir: Path):
        self._rec, self._run_dir = dict(record), run_dir
        self.job_id = str(record["pid"])
        self._status: int | None = None

    def record(self) -> dict:
        return dict(self._rec)

    def poll(self) -> int | None:
        if self._status is None and _alive(self._rec) is None:
            self._status = UNKNOWN_EXIT
            note(self._run_dir, f"re-attached pid {self.job_id} has ended (exit status unknown: "
                                f"it was not this process's child)")
        return self._status

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the run's process tree, SIGKILL to whatever is left after ``grace_s``."""
        import psutil

        proc = _alive(self._rec)
        if proc is None:
            return
        note(self._run_dir, f"cancelling re-attached pid {self.job_id}")
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


class LocalLauncher(Launcher):
    def _start(self, job: Job) -> Handle:
        cmd = run_command(job, self.cfg.runner, port=free_port())
        env = run_env(job, self.cfg.runner, dict(os.environ))
        note(job.run_dir, f"{job.name}: {shlex.join(cmd)} (in {job.cwd})")
        with open(job.run_dir / LOG_NAME, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=job.cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return LocalHandle(proc, job.run_dir)

    def _attach(self, record: dict, run_dir: Path) -> Handle | None:
        host = socket.gethostname()
        if record.get("host") != host:
            raise ValueError(f"{run_dir}: the run was started on host {record.get('host')} "
                             f"(pid {record.get('pid')}); this driver on {host} cannot see it: "
                             f"rerun the sweep there")
        if _alive(record) is None:
            return None
        note(run_dir, f"re-attached to pid {record['pid']} (started by an earlier driver)")
        return AttachedLocalHandle(record, run_dir)


# ----------------------------------------------------------------------------------- SLURM
def run_on_node(job: Job, runner: str, cwd: str) -> int:
    """The SLURM job's function, run by submitit once per node of the allocation: starts
    this node's processes of the run with a hostfile built from the allocation and returns
    their exit status."""
    job_id = os.environ["SLURM_JOB_ID"]
    node_rank = int(os.environ.get("SLURM_NODEID", "0"))
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           check=True, capture_output=True, text=True).stdout.split()
    # one port all nodes agree on without talking; a single node may pick any free one
    port = free_port() if len(hosts) == 1 else 20000 + int(re.sub(r"\D", "", job_id)) % 20000
    hostfile = None
    if runner == "deepspeed":
        hostfile = job.run_dir / "hostfile"
        tmp = job.run_dir / f".hostfile.{node_rank}"  # each node writes it whole, atomically
        tmp.write_text(hostfile_text(hosts, job.procs))
        os.replace(tmp, hostfile)
    cmd = run_command(job, runner, port=port, hosts=hosts, node_rank=node_rank, hostfile=hostfile)
    env = run_env(job, runner, dict(os.environ))
    log_path = job.run_dir / (LOG_NAME if node_rank == 0 else f"launcher.node{node_rank}.log")
    with open(log_path, "ab") as log:
        log.write(f"[launcher {time.strftime('%Y-%m-%d %H:%M:%S')}] slurm job {job_id}, node "
                  f"{node_rank}/{len(hosts)} ({hosts[node_rank]}): {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    return exit_status(proc.returncode)


def slurm_state(job_id: str) -> str | None:
    """SLURM's state of a job from the controller (RUNNING, COMPLETED, CANCELLED, ...): ""
    when it no longer knows the job (MinJobAge after its end), None when it could not be
    asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    return "" if out.returncode == 0 or "Invalid job id" in out.stderr else None


class SlurmHandle(Handle):
    poll_interval_s = 2.0

    def __init__(self, job, run_dir: Path):
        self._job, self._run_dir = job, run_dir  # a submitit.SlurmJob
        self.job_id = str(job.job_id)
        self._status: int | None = None

    def record(self) -> dict:
        return {"kind": "slurm", "job_id": self.job_id, "folder": str(self._job.paths.folder),
                "tasks": self._job.num_tasks}

    def poll(self) -> int | None:
        if self._status is None:
            self._status = self._final_status()
        return self._status

    def _tasks(self):
        return [self._job.task(i) for i in range(self._job.num_tasks)]

    def _final_status(self) -> int | None:
        reported = all(t.paths.result_pickle.exists() for t in self._tasks())
        state = slurm_state(self.job_id)
        if state == "":  # gone from the controller: ask accounting (sacct) through submitit
            state = self._job.watcher.get_state(self.job_id, mode="force").split()[0]
            state = "" if state == "UNKNOWN" else state
        if not reported:
            if state is None or (state and state not in FINAL_STATES):
                return None
            reported = all(t.paths.result_pickle.exists() for t in self._tasks())  # meanwhile?
        # a cancelled job's function may still return (its launcher's status once killed):
        # SLURM's verdict comes first
        if state in STATE_STATUS or not reported:
            status = STATE_STATUS.get(state, 1)
            reason = f"ended {state}" if state else "is unknown to SLURM"
            err = "".join((t.stderr() or "")[-2000:] for t in self._tasks()).strip()
            note(self._run_dir, f"slurm job {self.job_id} {reason}: exit status {status}"
                                + (f"\nsubmitit's stderr:\n{err}" if err and not reported else ""))
            return status
        return self._reported_status()

    def _reported_status(self) -> int:
        statuses = []
        for i, task in enumerate(self._tasks()):
            try:
                statuses.append(int(task.result()))
            except Exception as exc:  # the job function raised: submitit holds its traceback
                note(self._run_dir, f"slurm job {self.job_id} task {i} failed: {exc}")
                statuses.append(1)
        status = next((s for s in statuses if s), 0)
        note(self._run_dir, f"slurm job {self.job_id} exited with status {status}")
        return status

    def cancel(self) -> None:
        if self.poll() is None:
            note(self._run_dir, f"cancelling slurm job {self.job_id}")
            self._job.cancel(check=False)


class SlurmLauncher(Launcher):
    def __init__(self, cfg: LauncherConfig):
        super().__init__(cfg)
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise RuntimeError("kind: slurm needs SLURM's sbatch and srun on PATH "
                               "(a local test cluster: scripts/slurm_cluster.sh)")
        import submitit

        self._executor = submitit.SlurmExecutor(folder=cfg.slurm.folder / "%j",
                                                python=shlex.quote(sys.executable))

    def _start(self, job: Job) -> Handle:
        s = self.cfg.slurm
        params = dict(job_name=job.name, nodes=s.nodes, ntasks_per_node=1, time=s.time_min,
                      cpus_per_task=s.cpus_per_task or job.procs * job.threads,
                      additional_parameters={"chdir": str(job.cwd), **s.extra_sbatch})
        if s.partition:
            params["partition"] = s.partition
        if s.gpus_per_node:
            params["gpus_per_node"] = s.gpus_per_node
        self._executor.update_parameters(**params)
        sjob = self._executor.submit(run_on_node, job, self.cfg.runner, str(job.cwd))
        note(job.run_dir, f"{job.name}: slurm job {sjob.job_id} ({self.cfg.runner}, "
                          f"{s.nodes} node(s) x {job.procs} procs); submitit logs in "
                          f"{sjob.paths.folder}")
        return SlurmHandle(sjob, job.run_dir)

    def _attach(self, record: dict, run_dir: Path) -> Handle | None:
        """The recorded SLURM job, running or ended (its handle reports how it ended)."""
        import submitit

        try:
            sjob = submitit.SlurmJob(folder=record["folder"], job_id=str(record["job_id"]),
                                     tasks=tuple(range(int(record.get("tasks", 1)))))
        except KeyError as exc:
            raise ValueError(f"{run_dir}: the SLURM launch record lacks {exc}") from None
        note(run_dir, f"re-attached to slurm job {record['job_id']} (submitted by an earlier "
                      f"driver)")
        return SlurmHandle(sjob, run_dir)
