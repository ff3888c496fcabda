"""Starting a deepspeed run: the user's DeepSpeed config, the launchers' rank variables, and the
real `deepspeed` launcher with a hostfile (launch/deepspeed.sh) training 2 processes to the end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import torch

from massl.config import ConfigError, config_from_dict
from massl.dist import DistEnv, LAUNCHER_VARIABLES, init_distributed, launcher_ranks, rendezvous_address
from massl.engines.deepspeed_engine.ds_config import check_built, student_config, teacher_config
from massl.engines.deepspeed_engine.engine import DeepSpeedEngine
from massl.errors import UserError
from tests.distributed import free_port
from tests.engines_common import read_metrics, tiny_config, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _with_ds_config(tmp_path, options: dict, stage: int = 3) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(options))
    tmp_path.joinpath("images").mkdir(exist_ok=True)
    return tiny_config(str(tmp_path / "images"), str(tmp_path / "run"), "deepspeed", 2,
                       engine={"zero_stage": stage, "deepspeed_config": str(path)})


def _check(cfg_dict: dict, precision: str = "fp32"):
    """The engine's check of its settings, as `train` runs it after validation (W=2, before any model)."""
    cfg_dict["run"]["precision"] = precision
    cfg = config_from_dict(cfg_dict)
    DeepSpeedEngine.check_config(cfg, DistEnv(rank=0, world_size=2, device=torch.device("cpu")))
    return cfg


@pytest.mark.parametrize("options, key, massl_key", [
    ({"train_batch_size": 64}, "'train_batch_size' to 64", "data.batch_size"),  # massl's: 4 per rank x 2
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "'optimizer'", "optim.name"),
    ({"zero_optimization": {"stage": 2}}, "'zero_optimization.stage' to 2", "engine.zero_stage"),
    ({"gradient_clipping": 1.0}, "'gradient_clipping' to 1.0", "optim.clip_grad"),
    ({"bf16": {"enabled": True}}, "'bf16.enabled' to True", "run.precision"),
    ({"fp16": {"enabled": True}}, "'fp16.enabled' to True", "run.precision"),
    ({"fp16": {"loss_scale": 128}}, "'fp16.loss_scale' to 128", "run.precision"),
])
def test_user_ds_config_conflicting_with_massl_names_both_keys(tmp_path, options, key, massl_key):
    with pytest.raises(ConfigError) as e:
        _check(_with_ds_config(tmp_path, options))
    message = str(e.value)
    assert message.startswith("engine.deepspeed_config: ") and key in message and massl_key in message, message


def test_user_ds_config_repeating_massls_values_is_accepted(tmp_path):
    """A ds_config written for DeepSpeed alone (batch sizes, precision, stage, no clipping: massl's
    values, or "auto"), with the fp16 loss scaler's settings and harmless "off" values."""
    scaler = {"initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 1}
    options = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
               "gradient_clipping": 0, "bf16": {"enabled": False}, "fp16": {"enabled": "auto", **scaler},
               "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1, "mics_shard_size": -1}}
    cfg = _check(_with_ds_config(tmp_path, options))
    ds = student_config(cfg, "fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["fp16"] == {"enabled": False, "loss_scale": 0, **scaler}
    zero = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith(("stage3_max", "stage3_pre", "reduce"))}
    assert zero == {"stage": 3, "zero_hpz_partition_size": 1}  # MiCS's key: DeepSpeed rejects it
    _check(_with_ds_config(tmp_path, {"bf16": {"enabled": True}}), precision="bf16")


def test_bf16_gradients_stay_fp32(tmp_path):
    """In bf16 massl has DeepSpeed hold the gradients in fp32 (data_types.grad_accum_dtype, for its
    exact clipping): a ds_config may repeat that, not change it."""
    _check(_with_ds_config(tmp_path, {"data_types": {"grad_accum_dtype": "fp32"}}), precision="bf16")
    with pytest.raises(ConfigError, match="'data_types.grad_accum_dtype' to 'bf16'.*run.precision"):
        _check(_with_ds_config(tmp_path, {"data_types": {"grad_accum_dtype": "bf16"}}), precision="bf16")


# (options, the key named, ZeRO stage): each would train wrong or crash if DeepSpeed ran it
REFUSED = [
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer", 3),
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, "zero_optimization.offload_param", 3),
    ({"zero_optimization": {"cpu_offload": True}}, "zero_optimization.cpu_offload", 2),  # deprecated aliases
    ({"zero_optimization": {"cpu_offload_param": True}}, "zero_optimization.cpu_offload_param", 3),
    ({"gradient_allreduce_op": "sum"}, "gradient_allreduce_op", 2),  # gradients W times too large
    ({"prescale_gradients": True, "gradient_predivide_factor": 2.0}, "prescale_gradients", 2),
    ({"zero_optimization": {"round_robin_gradients": True}}, "zero_optimization.round_robin_gradients", 2),
    ({"zero_optimization": {"zero_quantized_nontrainable_weights": True}},
     "zero_optimization.zero_quantized_nontrainable_weights", 3),  # would quantize the teacher
    ({"zero_optimization": {"zero_hpz_partition_size": 2}}, "zero_optimization.zero_hpz_partition_size", 3),
]


@pytest.mark.parametrize("options, key, stage", REFUSED)
def test_user_ds_config_unsupported_option_is_refused(tmp_path, options, key, stage):
    with pytest.raises(ConfigError, match=f"'{key}'.*does not support"):
        _check(_with_ds_config(tmp_path, options, stage))


def test_refusals_are_judged_on_the_config_deepspeed_parsed(tmp_path, monkeypatch):
    """The same settings, past the file check, refused on what DeepSpeed made of them (the engine
    runs this after `deepspeed.initialize`): an alias DeepSpeed maps to offload is caught as offload."""
    # the accelerator the engine would choose (DeepSpeed keeps its first one for the process)
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR")
                       or ("cuda" if torch.cuda.is_available() else "cpu"))
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    named = {"zero_optimization.cpu_offload": "zero_optimization.offload_optimizer",
             "zero_optimization.cpu_offload_param": "zero_optimization.offload_param"}
    for i, (options, key, stage) in enumerate(REFUSED):
        folder = tmp_path / str(i)
        folder.mkdir()
        cfg = config_from_dict(_with_ds_config(folder, options, stage))
        parsed = DeepSpeedConfig(student_config(cfg, "fp32"))
        with pytest.raises(ConfigError, match=f"'{named.get(key, key)}'.*does not support"):
            check_built(parsed)
    check_built(DeepSpeedConfig(student_config(_check(_with_ds_config(tmp_path, {"zero_optimization": {
        "zero_hpz_partition_size": 1, "mics_shard_size": -1}})), "fp32")))


def test_user_ds_config_is_merged_into_massls(tmp_path):
    cfg = config_from_dict(_with_ds_config(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000,
                                                                             "stage3_prefetch_bucket_size": 7},
                                                      "communication_data_type": "bf16"}))
    ds = student_config(cfg, "bf16")
    # the user's values over massl's bounded ZeRO-3 working set, the rest of it kept
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 7,
                                       "stage3_max_live_parameters": 10_000_000,
                                       "stage3_max_reuse_distance": 10_000_000}
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["communication_data_type"] == "bf16" and "optimizer" not in ds and "scheduler" not in ds
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # the user's communication dtype, massl's gradients
    assert ds["timers"]["throughput"] == {"enabled": False, "synchronized": False}  # its device syncs
    teacher = teacher_config(ds)
    assert "stage3_param_persistence_threshold" not in teacher["zero_optimization"]  # DeepSpeed's, as the student's
    assert "optimizer" not in teacher and teacher["bf16"] == ds["bf16"] and teacher["timers"] == ds["timers"]


def test_the_teachers_config_never_quantizes_it(tmp_path):
    """Options for the student's optimiser and gradients stay out of the teacher engine's config
    (its weights are not trained: `zero_quantized_nontrainable_weights` would quantize all of them)."""
    student = {"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True,
                                     "zero_quantized_weights": True, "reduce_bucket_size": 5}}
    assert teacher_config(student)["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 5}


def test_massl_train_refuses_a_bad_ds_config_in_one_line_before_any_work(tmp_path, digits_dir, capsys):
    """massl-train: the engine's check runs right after validation, before data or models."""
    from massl.cli import train_main
    from tests.conftest import tiny_overrides

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_allreduce_op": "sum"}))
    out = tmp_path / "run"
    argv = tiny_overrides(os.path.join(digits_dir, "train"), str(out)) + [
        "engine.name=deepspeed", f"engine.deepspeed_config={path}"]
    with pytest.raises(SystemExit) as exited:
        train_main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: engine.deepspeed_config: ") and "'gradient_allreduce_op'" in err, err
    assert not out.exists()  # refused before the run's folder, data or models were made


def test_massls_config_validation_imports_no_engine(tmp_path):
    """massl.config judges massl's own keys only (a deepspeed run with a ds_config file here); each
    engine checks its settings itself."""
    cfg = _with_ds_config(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}})
    code = ("import json, sys; from massl.config import config_from_dict; "
            f"config_from_dict(json.loads({json.dumps(json.dumps(cfg))})); "
            "print(sorted(m for m in sys.modules if m.startswith('massl.engines')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_deepspeed_keys_without_deepspeed_are_refused(tmp_path):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"), "ddp", 2, engine={"zero_stage": 3})
    with pytest.raises(ConfigError, match="engine.zero_stage: .*no effect"):
        config_from_dict(cfg, check_paths=False)
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"), "deepspeed", 2, engine={"zero_stage": 3, "compile": True})
    with pytest.raises(ConfigError, match="engine.compile: .*zero_stage=3"):
        config_from_dict(cfg, check_paths=False)
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"), "deepspeed", 2, optim={"name": "lars"})
    with pytest.raises(ConfigError, match="optim.name: lars"):
        config_from_dict(cfg, check_paths=False)


@pytest.mark.parametrize("environ, expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),  # torchrun, deepspeed launcher
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1)),  # srun, --launcher slurm
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (2, 4, 0)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, (1, 2, 1)),  # MPICH / Intel MPI
    # torchrun inside a Slurm allocation: the launcher that started this process wins
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 2, 1)),
    # mpirun inside an sbatch allocation: its ranks inherit the batch shell's SLURM_PROCID/SLURM_NTASKS
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "OMPI_COMM_WORLD_RANK": "3",
      "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (3, 4, 1)),
])
def test_launcher_environments_map_to_ranks(environ, expected):
    assert launcher_ranks(environ) == expected


SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[07-09,12],login1"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}


@pytest.mark.parametrize("environ, expected", [
    ({}, "127.0.0.1"),
    ({**SRUN, "MASTER_ADDR": "10.1.2.3"}, "10.1.2.3"),  # the launcher's (or the user's) address first
    (SRUN, "gpu07"),  # srun: the first host of the job's node list, zero padding kept
    ({**SRUN, "SLURM_STEP_NODELIST": "n[3-4]"}, "n3"),  # the step's list before the job's
    ({**SRUN, "SLURM_JOB_NODELIST": "rack[2-3]-node[05,01]"}, "rack2-node05"),
    (MPIRUN, "127.0.0.1"),  # mpirun with every rank on this host
    # mpirun inside an allocation: not srun's node list (rank 0 runs where mpirun puts it)
    ({**MPIRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "b[1-2]"}, "127.0.0.1"),
])
def test_rendezvous_address_order(environ, expected):
    assert rendezvous_address(environ) == expected


def test_mpirun_across_hosts_without_master_addr_is_a_user_error():
    with pytest.raises(UserError, match="MASTER_ADDR: .*mpirun -x MASTER_ADDR"):
        rendezvous_address({**MPIRUN, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


@pytest.fixture
def captured_init(monkeypatch):
    """init_distributed in a clean launcher environment, with a process group start that only
    records MASTER_ADDR and the ranks as it would use them (no process group)."""
    for name in [n for names in LAUNCHER_VARIABLES for n in names] + [
            "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "OMPI_COMM_WORLD_LOCAL_SIZE"]:
        monkeypatch.setenv(name, "")  # noted, so that what init_distributed exports is undone after the test
        monkeypatch.delenv(name)
    seen = {}

    def init_process_group(backend, rank, world_size, **kwargs):
        seen.update(address=os.environ["MASTER_ADDR"], rank=rank, world=world_size, env_rank=os.environ["RANK"])

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    return seen


@pytest.mark.parametrize("environ, address", [
    ({**SRUN, "SLURM_STEP_NODELIST": "node[1-2]"}, "node1"),  # --launcher slurm: srun's first host
    ({**SRUN, "MASTER_ADDR": "10.1.2.3"}, "10.1.2.3"),  # train.sbatch exports it
    ({**MPIRUN, "MASTER_ADDR": "node1"}, "node1"),  # launch/deepspeed.sh --launcher openmpi
])
def test_init_distributed_takes_the_address_from_the_launchers_variables(captured_init, monkeypatch, environ,
                                                                         address):
    """The address is found before init_distributed exports RANK/WORLD_SIZE (after which every
    launcher looks like torchrun): srun's ranks on two hosts once met at 127.0.0.1 and never met."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    init_distributed("cpu")
    assert captured_init == {"address": address, "rank": 1, "world": int(environ.get("SLURM_NTASKS") or 4),
                             "env_rank": "1"}


def test_init_distributed_under_mpirun_across_hosts_without_master_addr_is_a_user_error(captured_init, monkeypatch):
    for name, value in {**MPIRUN, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="MASTER_ADDR: .*mpirun -x MASTER_ADDR"):
        init_distributed("cpu")
    assert captured_init == {}


def test_deepspeed_launcher_with_a_hostfile_trains_two_processes(tmp_path):
    pytest.importorskip("deepspeed")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.isfile(launcher):
        pytest.skip("the deepspeed launcher script is not installed beside this python")
    data = write_images(str(tmp_path / "images"))
    out = str(tmp_path / "run")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, out, "deepspeed", 2, run={"max_steps": 3})))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# as launch/hostfile.example, one node\nlocalhost slots=2\n")
    env = {**os.environ, "DEEPSPEED": launcher, "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable) + os.pathsep
           + os.environ.get("PATH", ""),
           # one node and no ssh to it: skip the launcher's ssh check and name the rendezvous
           "DS_LAUNCHER_ARGS": f"--no_ssh_check --master_addr 127.0.0.1 --master_port {free_port()}"}
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), str(hostfile), str(config)],
                          cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-5000:]
    assert "--local_rank=1" in done.stdout  # the launcher's argument, accepted by massl-train
    assert "massl: engine deepspeed, 2 rank(s)" in done.stdout, done.stdout[-5000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["final_step"] == 3


RECORD_ARGS = """#!/usr/bin/env python3
import json, os, shutil, sys
json.dump(sys.argv[1:], open(sys.argv[0] + ".args", "w"))
shutil.copy(os.environ["DS_ENV_FILE"], sys.argv[0] + ".env")
"""
TWO_HOSTS = "node1 slots=1\nnode2 slots=1\n"  # two hosts: the script adds no launcher flag of its own


def launch_with_a_recording_runner(tmp_path, hosts: str, ds_launcher_args: str, *overrides: str):
    """launch/deepspeed.sh with a stand-in for DeepSpeed's runner that records its arguments
    (`runner.args`) and the environment file it was handed (`runner.env`): (result, runner path)."""
    runner = tmp_path / "deepspeed"
    runner.write_text(RECORD_ARGS)
    runner.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hosts)
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), str(hostfile), "cfg.yaml",
                           *overrides], env={**os.environ, "DEEPSPEED": str(runner), "DS_LAUNCHER_ARGS": ds_launcher_args},
                          capture_output=True, text=True, timeout=60)
    return done, str(runner)


@pytest.mark.parametrize("ds_launcher_args, expected", [
    ('--launcher openmpi --launcher_args "--mca btl_tcp_if_include ib0"',
     ["--launcher", "openmpi", "--launcher_args", "--mca btl_tcp_if_include ib0"]),
    ("--master_port 29600 --launcher_args '-x A=1'", ["--master_port", "29600", "--launcher_args", "-x A=1"]),
    ("", []),
])
def test_ds_launcher_args_are_split_as_a_shell_splits_words(tmp_path, ds_launcher_args, expected):
    """launch/deepspeed.sh passes DS_LAUNCHER_ARGS to DeepSpeed's runner word by word, a quoted value
    with spaces as one argument (docs/multinode.md's `--launcher_args "--mca ..."`)."""
    done, runner = launch_with_a_recording_runner(tmp_path, TWO_HOSTS, ds_launcher_args, "a=1")
    assert done.returncode == 0, done.stderr
    args = json.load(open(runner + ".args"))
    assert args == ["--hostfile", str(tmp_path / "hostfile")] + expected + [
        "--module", "massl.cli", "--config", "cfg.yaml", "engine.name=deepspeed", "a=1"]


def test_ds_launcher_args_with_an_unmatched_quote_stop_in_one_line(tmp_path):
    done, runner = launch_with_a_recording_runner(tmp_path, "localhost slots=1\n", '--launcher_args "--mca x')
    assert done.returncode == 2 and not os.path.exists(runner + ".args")
    assert done.stderr.strip().splitlines() == [
        "error: DS_LAUNCHER_ARGS cannot be split into arguments (an unmatched quote?): --launcher_args \"--mca x"]


@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
@pytest.mark.parametrize("port_args, port", [("", "29500"), (" --master_port 29600", "29600")])
def test_mpirun_and_srun_ranks_get_the_master_port(tmp_path, launcher, port_args, port):
    """DeepSpeed's Open MPI and Slurm runners do not pass --master_port on: the script puts it in
    the environment every rank gets (before: under Slurm the ranks took 29500 whatever it said)."""
    done, runner = launch_with_a_recording_runner(tmp_path, TWO_HOSTS, f"--launcher {launcher}{port_args}")
    assert done.returncode == 0, done.stderr
    lines = open(runner + ".env").read().splitlines()
    assert [line for line in lines if line.startswith("MASTER_PORT=")] == [f"MASTER_PORT={port}"]
    assert ("MASTER_ADDR=node1" in lines) == (launcher == "openmpi")  # srun's ranks find it themselves
