"""Starting a deepspeed run: the user's DeepSpeed config, the launchers' rank variables, and the
real `deepspeed` launcher with a hostfile (launch/deepspeed.sh) training 2 processes to the end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from massl.config import ConfigError, config_from_dict
from massl.dist import launcher_ranks, rendezvous_address
from massl.errors import UserError
from massl.engines.deepspeed_engine.ds_config import student_config, teacher_config
from tests.distributed import free_port
from tests.engines_common import read_metrics, tiny_config, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _with_ds_config(tmp_path, options: dict) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(options))
    tmp_path.joinpath("images").mkdir(exist_ok=True)
    return tiny_config(str(tmp_path / "images"), str(tmp_path / "run"), "deepspeed", 2,
                       engine={"zero_stage": 3, "deepspeed_config": str(path)})


@pytest.mark.parametrize("options, key, massl_key", [
    ({"train_batch_size": 64}, "'train_batch_size'", "data.batch_size"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "'optimizer'", "optim.name"),
    ({"zero_optimization": {"stage": 2}}, "'zero_optimization.stage'", "engine.zero_stage"),
    ({"gradient_clipping": 1.0}, "'gradient_clipping'", "optim.clip_grad"),
    ({"bf16": {"enabled": True}}, "'bf16'", "run.precision"),
])
def test_user_ds_config_may_not_set_what_massl_owns(tmp_path, options, key, massl_key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with_ds_config(tmp_path, options))
    message = str(e.value)
    assert message.startswith("engine.deepspeed_config: ") and key in message and massl_key in message, message


def test_user_ds_config_unsupported_option_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'zero_optimization.offload_optimizer'.*does not support"):
        config_from_dict(_with_ds_config(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))


def test_user_ds_config_is_merged_into_massls(tmp_path):
    cfg = config_from_dict(_with_ds_config(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000,
                                                                             "stage3_prefetch_bucket_size": 7},
                                                      "communication_data_type": "bf16"}))
    ds = student_config(cfg, "bf16")
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 7}
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["communication_data_type"] == "bf16" and "optimizer" not in ds and "scheduler" not in ds
    teacher = teacher_config(ds)
    assert teacher["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # no stale gathered copies
    assert "optimizer" not in teacher and teacher["bf16"] == ds["bf16"]


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
