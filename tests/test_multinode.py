"""Ranks on two hosts: every launcher across the nodes of scripts/test_cluster.sh.

The cluster (2 "nodes" = network, UTS and mount namespaces named node1 and node2, each with its
own address, sshd and slurmd; the file system shared as with NFS) is brought up once for this
module and torn down at its end (also if the test process dies: the script's watchdog). Each
multi-node run trains the tiny CPU config for a few steps with one process per node (gloo) and
must log the same losses as a run of the same launcher on one node at the same world size (1e-5
relative), with its two ranks on two distinct hosts (summary.json's "hosts"). The one-node
DeepSpeed command of the README runs as written, with neither ssh nor launcher options.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from massl.config import load_config
from tests.conftest import tiny_overrides
from tests.distributed import free_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "scripts", "test_cluster.sh")
STEPS = 3
TIMEOUT_S = 600  # per launch; generous: a loaded 2-core machine
# In every rank's interpreter (PYTHONPATH reaches all ranks under every launcher): note the host and
# what the variables under test are there, one file per rank.
ENV_PROBE = """
import os, socket
if os.environ.get("MASSL_TEST_PROBE_DIR") and any(os.environ.get(v) for v in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")):
    with open(os.path.join(os.environ["MASSL_TEST_PROBE_DIR"], f"{socket.gethostname()}-{os.getpid()}"), "w") as f:
        f.write(f"{socket.gethostname()} {os.environ.get('MASSL_TEST_MARK')} {os.environ.get('MY_USER_VARIABLE')}")
"""


def _deepspeed_launcher() -> str:
    pytest.importorskip("deepspeed")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.isfile(launcher):
        pytest.skip("the deepspeed launcher script is not installed beside this python")
    return launcher


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """{"hostfile": PATH, "node1": ADDRESS, ..., "dir": the state directory}; up once, always down."""
    missing = [c for c in ("unshare", "nsenter", "ip", "sshd", "ssh", "pdsh") if shutil.which(c) is None
               and not os.path.exists(f"/usr/sbin/{c}")]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(missing) or 'root'}; install with `apt-get install -y openssh-server "
                    "pdsh openmpi-bin slurm-wlm munge` (.ci/run does this when it runs as root)")
    state = str(tmp_path_factory.mktemp("cluster") / "c")
    env = {**os.environ, "MASSL_TEST_CLUSTER_DIR": state, "MASSL_TEST_CLUSTER_OWNER": str(os.getpid())}
    host_links = _host_links()
    try:
        up = subprocess.run(["bash", CLUSTER, "up", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=180)
        assert up.returncode == 0, f"the test cluster did not start:\n{up.stdout}"
        # the bridge and the veth pairs live in the cluster's namespaces, none in this machine's
        assert _host_links() == host_links, (host_links, _host_links())
        info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
        yield {**info, "dir": state}
    finally:
        subprocess.run(["bash", CLUSTER, "down"], env=env, timeout=120)


def _host_links() -> set[str]:
    """The names of this (the host's) network namespace's interfaces."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _on(node: str, cmd: list[str]) -> list[str]:
    """`cmd` run inside the cluster's node (same directory and environment)."""
    return ["bash", CLUSTER, "exec", node] + cmd


def _env(cluster: dict | None = None, **extra: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("DS_LAUNCHER_ARGS", None)
    if cluster is not None:
        env["MASSL_TEST_CLUSTER_DIR"] = cluster["dir"]
        # DeepSpeed's CPU accelerator (under ssh the remote ranks get only what is exported) and the
        # cache of its compiled extension, if this machine moves it.
        env["MASSL_EXPORT"] = " ".join(v for v in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR") if v in env)
    return {**env, **extra}


def _config(digits_dir: str, directory, *extra: str, steps: int = STEPS) -> str:
    cfg = load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), str(directory / "unused"))
                      + [f"run.max_steps={steps}", *extra])
    path = str(directory / "tiny.yaml")
    with open(path, "w") as f:
        f.write(cfg.to_yaml())
    return path


def _run(cmd: list[str], env: dict, log: str, cwd: str) -> None:
    """`cmd` to its end; on a timeout, it and every process it started (its session) are killed."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, open(log).read()[-6000:]


def _losses(out: str, steps: int = STEPS) -> list[float]:
    """The loss of each step; a step logged again after a resume, its last value."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = {r["step"]: r["loss"] for r in map(json.loads, f)}
    assert sorted(rows) == list(range(1, steps + 1)), rows
    return [rows[s] for s in sorted(rows)]


def _hosts(out: str) -> list[str]:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["hosts"]


def _same_losses(got: str, want: str, steps: int = STEPS) -> None:
    assert _losses(got, steps) == pytest.approx(_losses(want, steps), rel=1e-5)


def test_the_cluster_has_two_named_nodes_reaching_each_other_over_ssh(cluster):
    def on(node: str, *cmd: str) -> str:
        return subprocess.run(_on(node, list(cmd)), env=_env(cluster), check=True, stdout=subprocess.PIPE,
                              text=True, timeout=60).stdout.strip()

    assert open(cluster["hostfile"]).read().split() == ["node1", "slots=2", "node2", "slots=2"]
    assert on("node2", "hostname") == "node2" and on("node1", "pwd") == os.getcwd()
    assert on("node2", "getent", "hosts", "node1").split()[0] == cluster["node1"]
    assert on("node1", "ssh", "node2", "hostname -I").split() == [cluster["node2"]]  # sshd, the root key
    assert cluster["node1"] != cluster["node2"]


def _env_probe(directory):
    """(folder for PYTHONPATH, folder of the probes): ENV_PROBE in every rank's interpreter."""
    hook, probes = directory / "hook", directory / "probes"
    hook.mkdir()
    probes.mkdir()
    (hook / "sitecustomize.py").write_text(ENV_PROBE)
    return hook, probes


def _two_node_hostfile(directory) -> str:
    """One process per node: the world size of the one-node references (2)."""
    path = directory / "hostfile2"
    path.write_text("node1 slots=1\nnode2 slots=1\n")
    return str(path)


@pytest.fixture(scope="module")
def deepspeed_reference(digits_dir, tmp_path_factory):
    """The one-node run of launch/deepspeed.sh (ZeRO-2, 2 processes, hostfile `localhost slots=2`):
    the output directory and the config."""
    launcher = _deepspeed_launcher()
    work = tmp_path_factory.mktemp("ds_reference")
    config = _config(digits_dir, work, "engine.zero_stage=2")
    (work / "hostfile").write_text("localhost slots=2\n")
    out = str(work / "run")
    _run(["bash", "launch/deepspeed.sh", str(work / "hostfile"), config, f"run.output_dir={out}"],
         _env(DEEPSPEED=launcher, DS_LAUNCHER_ARGS=f"--master_port {free_port()}"), str(work / "log"), ROOT)
    assert _hosts(out) == [os.uname().nodename] * 2
    return out, config


DEEPSPEED_DEFAULT_PORT = 29500  # launch/deepspeed.sh's master port when DS_LAUNCHER_ARGS names none


def _wait_until_free(port: int, timeout_s: float = 120.0) -> None:
    """Until nothing listens on 127.0.0.1:`port` (the suite's other tests take free ports, but
    processes of other programs may hold this one for a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: TIME_WAIT is no obstacle
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    holders = subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True)
                    raise AssertionError(f"port {port} stays in use:\n{holders.stdout}")
        time.sleep(1)


def _readme_deepspeed_commands() -> list[str]:
    """The README's one-node DeepSpeed lines: the hostfile, then launch/deepspeed.sh (continuation joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = [line.strip() for line in f.read().replace("\\\n", " ").splitlines()]
    echo = next(line for line in lines if line.startswith('echo "localhost'))
    launch = next(line for line in lines if line.startswith("launch/deepspeed.sh hostfile"))
    return [echo.split("#")[0].strip(), " ".join(launch.split())]


def test_readme_one_node_deepspeed_command_runs_as_written(digits_dir, tmp_path):
    """The README's commands on a fresh machine: one-host hostfile, no ssh to it, no launcher options."""
    launcher = _deepspeed_launcher()
    echo, launch = _readme_deepspeed_commands()
    assert launch.endswith(" data.path=...")
    (tmp_path / "configs").symlink_to(os.path.join(ROOT, "configs"))
    (tmp_path / "launch").symlink_to(os.path.join(ROOT, "launch"))
    out = str(tmp_path / "run")
    # data.path=... and the tiny model for this 2-core test appended to the README's command.
    tiny = " ".join(tiny_overrides(os.path.join(digits_dir, "train"), out) + [f"run.max_steps={STEPS}"])
    home = tmp_path / "home"  # no ssh keys, no ~/.deepspeed_env
    home.mkdir()
    _wait_until_free(DEEPSPEED_DEFAULT_PORT)  # as written, the command takes the launcher's default port
    _run(["bash", "-c", f"{echo} && {launch.removesuffix(' data.path=...')} {tiny}"],
         _env(DEEPSPEED=launcher, HOME=str(home)), str(tmp_path / "log"), str(tmp_path))
    assert len(_losses(out)) == STEPS and len(_hosts(out)) == 2


def _torchrun_on_each_node(env: dict, config: str, out: str, logs) -> list[subprocess.Popen]:
    """launch/torchrun.sh with NNODES=2, the same command on node1 and node2 (1 process each)."""
    env = {**env, "NNODES": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "29400", "RDZV_ID": "torchrun-test"}
    procs = []
    for node in ("node1", "node2"):
        with open(str(logs / f"{node}.log"), "a") as log:
            procs.append(subprocess.Popen(
                _on(node, ["bash", "launch/torchrun.sh", "1", config, f"run.output_dir={out}"]),
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs: list[subprocess.Popen], logs) -> None:
    for node, proc in zip(("node1", "node2"), procs):
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, open(str(logs / f"{node}.log")).read()[-6000:]


def _torchrun_one_node(config: str, out: str, log: str) -> None:
    _run(["bash", "launch/torchrun.sh", "2", config, f"run.output_dir={out}"], _env(MASTER_PORT=str(free_port())),
         log, ROOT)


def test_torchrun_on_two_nodes_matches_one_node(cluster, digits_dir, tmp_path):
    config = _config(digits_dir, tmp_path, "engine.name=ddp")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _torchrun_one_node(config, one, str(tmp_path / "one.log"))
    _wait_all(_torchrun_on_each_node(_env(cluster), config, two, tmp_path), tmp_path)
    assert sorted(_hosts(two)) == ["node1", "node2"]
    _same_losses(two, one)


def test_deepspeed_pdsh_on_two_nodes_matches_one_node_and_passes_the_environment(cluster, deepspeed_reference,
                                                                                   tmp_path):
    """DeepSpeed's default (pdsh) runner over ssh to both nodes, ZeRO-2; MASSL_* and a variable named
    in MASSL_EXPORT reach the rank on node2, whose environment otherwise comes from sshd."""
    reference, config = deepspeed_reference
    hook, probes = _env_probe(tmp_path)
    out = str(tmp_path / "run")
    env = _env(cluster, DEEPSPEED=_deepspeed_launcher(), PYTHONPATH=f"{hook}:{ROOT}",
               MASSL_TEST_PROBE_DIR=str(probes), MASSL_TEST_MARK="mark", MY_USER_VARIABLE="user")
    env["MASSL_EXPORT"] += " MY_USER_VARIABLE"
    _run(_on("node1", ["bash", "launch/deepspeed.sh", _two_node_hostfile(tmp_path), config, f"run.output_dir={out}"]),
         env, str(tmp_path / "log"), ROOT)
    assert _hosts(out) == ["node1", "node2"]
    _same_losses(out, reference)
    seen = sorted(p.read_text() for p in probes.iterdir())
    assert seen == ["node1 mark user", "node2 mark user"], seen


@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
def test_deepspeed_mpirun_and_srun_on_two_nodes_match_one_node(cluster, deepspeed_reference, tmp_path, launcher):
    """`--launcher openmpi` (no MASTER_ADDR from mpirun: launch/deepspeed.sh passes the hostfile's
    first host) and `--launcher slurm` inside a 2-node allocation (a script, not a module; the
    address from the first host of SLURM_STEP_NODELIST)."""
    reference, config = deepspeed_reference
    out = str(tmp_path / "run")
    # openmpi: with the transport's interface named as docs/multinode.md shows (the nodes' is eth0)
    env = _env(cluster, DEEPSPEED=_deepspeed_launcher(),
               DS_LAUNCHER_ARGS='--launcher openmpi --launcher_args "--mca btl_tcp_if_include eth0"',
               # Open MPI refuses root unless told; a private test machine
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               # a rank that cannot reach rank 0 fails in 2 minutes, not 30
               MASSL_DIST_TIMEOUT_MIN="2")
    cmd = ["bash", "launch/deepspeed.sh", _two_node_hostfile(tmp_path), config, f"run.output_dir={out}"]
    if launcher == "slurm":
        if "slurm_conf" not in cluster:
            pytest.skip("needs Slurm in the test cluster (apt-get install -y slurm-wlm munge)")
        # as docs/multinode.md shows it: DS_LAUNCHER_ARGS=--launcher=slurm salloc ... launch/deepspeed.sh ...
        env.update(SLURM_CONF=cluster["slurm_conf"], DS_LAUNCHER_ARGS="--launcher=slurm")
        # a MASSL_* value with a space and a user variable reach every rank as they are
        hook, probes = _env_probe(tmp_path)
        env.update(PYTHONPATH=f"{hook}:{ROOT}", MASSL_TEST_PROBE_DIR=str(probes), MASSL_TEST_MARK="a mark",
                   MY_USER_VARIABLE="user")
        cmd = ["salloc", "--nodes=2", "--ntasks-per-node=1", "--time=10:00"] + cmd[1:]
    elif shutil.which("ompi_info") is None:
        pytest.skip("needs Open MPI (apt-get install -y openmpi-bin)")
    _run(_on("node1", cmd), env, str(tmp_path / "log"), ROOT)
    assert _hosts(out) == ["node1", "node2"]
    _same_losses(out, reference)
    if launcher == "slurm":
        seen = sorted(p.read_text() for p in probes.iterdir())
        assert seen == ["node1 a mark user", "node2 a mark user"], seen


def _slurm_clients(cluster: dict, directory) -> dict:
    """Environment whose sbatch, scontrol, scancel and squeue talk to the cluster's Slurm (from node1)."""
    if "slurm_conf" not in cluster:
        pytest.skip("needs Slurm in the test cluster (apt-get install -y slurm-wlm munge)")
    bin_dir = directory / "slurm-clients"
    bin_dir.mkdir()
    for name in ("sbatch", "scontrol", "scancel", "squeue"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec bash "{CLUSTER}" exec node1 "{shutil.which(name)}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = _env(cluster, SLURM_CONF=cluster["slurm_conf"])
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sbatch_on_two_nodes_preempted_requeued_resumes_exactly(cluster, digits_dir, tmp_path, engine):
    """`sbatch --nodes=2 launch/slurm/train.sbatch` (one task per node): USR1, checkpoint on both
    nodes, requeue, resume; every loss equal to an uninterrupted 2-node job's."""
    from tests import test_slurm as slurm

    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    env = _slurm_clients(cluster, tmp_path)
    config = slurm._write_config(digits_dir, tmp_path, engine)
    preempted, reference = str(tmp_path / "preempted"), str(tmp_path / "reference")
    nodes = ("--nodes=2", "--ntasks-per-node=1")
    job, log = slurm._submit(env, str(tmp_path), config, preempted, *nodes)
    ref_job, ref_log = slurm._submit(env, str(tmp_path), config, reference, *nodes)
    slurm._wait("3 logged steps", lambda: len(slurm._metrics(preempted)) >= 3, log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    slurm._wait("the requeued job's completion", slurm._completed(env, job, log), log)
    slurm._wait("the reference job's completion", slurm._completed(env, ref_job, ref_log), ref_log)

    out = slurm._read(log)
    assert f"[massl] job {job} restart 1: 2 tasks" in out and "stop signal received" in out, out
    assert "resumed from" in out, out
    assert _hosts(preempted) == ["node1", "node2"] == _hosts(reference)
    got, want = slurm._metrics(preempted), slurm._metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, slurm.MAX_STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bitwise: fp32 CPU runs reproduce


# Slows every training step of the ranks down, so that a node can be killed in the middle of a run.
SLOW_STEPS = """
import os
if os.environ.get("MASSL_TEST_STEP_SLEEP") and os.environ.get("RANK"):
    import time
    import massl.train as train
    step = train.train_step
    def slow_step(*args, **kwargs):
        time.sleep(float(os.environ["MASSL_TEST_STEP_SLEEP"]))
        return step(*args, **kwargs)
    train.train_step = slow_step
"""


def test_a_dead_node_ends_the_run_and_the_same_command_resumes(cluster, digits_dir, tmp_path):
    """SIGKILL every process of node2 mid-run (torchrun, 2 nodes): node1's rank and agent exit
    non-zero within 60 s, the newest complete checkpoint is intact, and the same command again
    resumes from it and logs the losses of an uninterrupted run. Runs last: node2's sshd and slurmd
    die with it."""
    from massl.checkpoint import CheckpointManager

    steps = 12
    config = _config(digits_dir, tmp_path, "engine.name=ddp", "run.checkpoint_every=2", steps=steps)
    reference, out = str(tmp_path / "reference"), str(tmp_path / "run")
    _torchrun_one_node(config, reference, str(tmp_path / "reference.log"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    env = _env(cluster, PYTHONPATH=f"{hook}:{ROOT}", MASSL_TEST_STEP_SLEEP="0.5")
    node1, node2 = _torchrun_on_each_node(env, config, out, tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (os.path.exists(os.path.join(out, "metrics.jsonl")) and
                   len(open(os.path.join(out, "metrics.jsonl")).readlines()) >= 5):
            assert node1.poll() is None and node2.poll() is None and time.monotonic() < deadline, \
                open(str(tmp_path / "node1.log")).read()[-6000:]
            time.sleep(0.2)
        subprocess.run(["bash", CLUSTER, "kill", "node2"], env=env, check=True, timeout=60)
        killed = time.monotonic()
        node1.wait(timeout=60)  # no hang inside a collective
        # a failure, not a stop at a checkpoint (launch/torchrun.sh ends with 75 only after one)
        assert time.monotonic() - killed < 60 and node1.returncode not in (0, 75)
    finally:
        for proc in (node1, node2):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    newest = CheckpointManager(out, 3).latest_complete()
    assert newest is not None and int(newest[-9:]) >= 4, newest
    assert json.load(open(os.path.join(newest, "manifest.json")))  # sealed

    _wait_all(_torchrun_on_each_node(_env(cluster), config, out, tmp_path), tmp_path)  # the same command again
    assert f"resumed from {newest}" in open(str(tmp_path / "node1.log")).read() + open(str(tmp_path / "node2.log")).read()
    assert sorted(_hosts(out)) == ["node1", "node2"]
    _same_losses(out, reference, steps)
