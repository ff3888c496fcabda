"""Every command that README.md and docs/*.md show is exercised here, as the table below says.

The commands are taken from the documents' code blocks (fenced, or indented by four spaces): a
block whose first command starts with a program (massl-*, python, bash, a launch/ or scripts/
script, torchrun, srun, sbatch, ...) is a block of commands; each of its lines (continuations
joined, comments dropped) must be a key of COMMANDS, so a command added to the docs without a
way to test it fails `test_every_documented_command_is_in_the_table`. How each is exercised:

- RUN: run exactly as written, in a scratch directory that holds the repository's configs/,
  the quickstart's digits under data/digits (written by the documented command itself) and
  runs/quickstart (a run of the tiny test config);
- RUN_WITH: run with the substitutions given (a fake data path for /data/imagenet, the tiny
  run for a run directory) and/or tiny overrides appended (a few steps of a small model);
- PARSE: cannot run here (GPUs, a real cluster, ImageNet, hours): its config file loads with its
  overrides (massl-train, the launch scripts) and every --flag it uses exists (massl-eval,
  massl-shard, the benchmarks);
- SKIP: not a massl command one could test here, with the reason.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("massl-train", "massl-eval", "massl-export", "massl-shard", "massl-report", "python", "bash", "torchrun",
            "srun", "salloc", "sbatch", "scancel", "export", "launch/", "scripts/")

RUN, RUN_WITH, PARSE, SKIP = "run", "run_with", "parse", "skip"
FAKE_DATA = {"/data/imagenet/train": "data/digits/train", "/data/imagenet/val": "data/digits/val",
             "runs/vits": "runs/quickstart"}
# a small model and a few steps on top of configs/quickstart.yaml
TINY = ("model.embed_dim=32 model.depth=1 model.num_heads=2 model.head_hidden_dim=64 model.head_bottleneck_dim=16 "
        "memory.size=128 memory.partition_size=32 run.max_steps=2 run.tensorboard=false data.num_workers=0 "
        "run.output_dir=runs/shards")


# documented command -> (how, detail)
COMMANDS = {
    # README.md
    "bash scripts/quickstart.sh": (SKIP, "the quickstart itself (a fresh environment and 70 epochs: minutes to "
                                         "install, 14 min to train); each of its steps is run below (digits, "
                                         "massl-train, massl-eval, massl-report), and README reports its measured run"),
    "bash scripts/run_tests.sh": (SKIP, "the test suite, of which this test is part"),
    'bash scripts/run_tests.sh -m "not slow"': (SKIP, "the suite's fast subset, of which this test is part"),
    "massl-train --config configs/vit_small.yaml data.path=/data/imagenet/train run.output_dir=runs/vits":
        (PARSE, "ImageNet on GPUs"),
    "massl-train --print-config --config configs/quickstart.yaml": (RUN, ""),
    "launch/torchrun.sh 4 configs/vit_base.yaml data.path=/data/imagenet/train": (PARSE, "4 GPUs"),
    "NNODES=2 MASTER_ADDR=node1 launch/torchrun.sh 8 configs/vit_base.yaml ...":
        (PARSE, "2 GPU nodes; tests/test_multinode.py runs torchrun.sh with NNODES=2 on the two-node test cluster"),
    'echo "localhost slots=2" > hostfile': (SKIP, "the hostfile of the next line; tests/test_multinode.py runs both "
                                                  "lines as written"),
    "sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm/train.sbatch configs/vit_base.yaml data.path=...":
        (PARSE, "a GPU Slurm cluster (tests/test_slurm.py runs train.sbatch on a private one)"),
    "launch/deepspeed.sh hostfile configs/vit_base.yaml engine.zero_stage=3 "
    "engine.deepspeed_config=configs/deepspeed/zero3.json data.path=...": (PARSE, "a hostfile of GPU nodes"),
    "massl-shard /data/imagenet/train --out /data/imagenet_shards --workers 8": (PARSE, "ImageNet; the digits are "
                                                                                     "sharded below"),
    "massl-train --config configs/vit_base.yaml data.source=webdataset data.urls=/data/imagenet_shards":
        (PARSE, "ImageNet shards on GPUs; the digits' shards are trained on below"),
    "massl-export --checkpoint runs/vits --out vits_teacher.safetensors": (RUN_WITH, FAKE_DATA),
    "massl-eval knn --checkpoint runs/vits --train /data/imagenet/train --val /data/imagenet/val":
        (RUN_WITH, FAKE_DATA),
    "massl-eval linear --checkpoint runs/vits --train ... --val ... --n-last-blocks 4 --avgpool": (PARSE, "ImageNet"),
    "massl-eval lowshot --checkpoint runs/vits --train ... --val ...": (PARSE, "ImageNet"),
    "massl-eval retrieval --checkpoint runs/vits --train ... --val ...": (PARSE, "ImageNet"),
    "torchrun --nproc_per_node 8 -m massl.eval.cli knn --checkpoint runs/vits ...": (PARSE, "8 GPUs"),
    "massl-report runs/quickstart --images data/digits/val --crop-ratio 1.0": (RUN, ""),
    # docs/config.md
    "massl-train --config configs/vit_small.yaml optim.lr=5e-4 data.batch_size=64 data.global_crops_scale=[0.25,1]":
        (PARSE, "needs data.path (ImageNet)"),
    # docs/data.md
    "python -m massl.tools.digits --out data/digits --size 32": (RUN, ""),
    "massl-shard data/digits/train --out data/digits_shards --maxcount 200": (RUN, ""),
    "massl-train --config configs/quickstart.yaml data.source=webdataset data.urls=data/digits_shards":
        (RUN_WITH, {"": TINY}),
    "massl-shard SOURCE --out DIR [--prefix shard] [--maxcount 10000] [--maxsize 1G] [--seed 0] "
    "[--no-shuffle] [--workers N] [--max-side 0] [--quality 90] [--overwrite] [--quiet]": (PARSE, "a synopsis"),
    "massl-shard verify DIR": (RUN_WITH, {"DIR": "data/digits_shards"}),
    "massl-shard index --out DIR/manifest.json URL [URL ...]":
        (RUN_WITH, {"DIR/manifest.json": "data/digits_shards/index.json",
                    "URL [URL ...]": "data/digits_shards/shard-000000.tar data/digits_shards/shard-000001.tar"}),
    # docs/multinode.md
    "NNODES=2 MASTER_ADDR=node1 launch/torchrun.sh 8 configs/vit_base.yaml data.path=...":
        (PARSE, "2 GPU nodes; tests/test_multinode.py runs torchrun.sh with NNODES=2 on the two-node test cluster"),
    "launch/deepspeed.sh hostfile configs/vit_base.yaml engine.zero_stage=2 data.path=...":
        (PARSE, "GPU nodes; tests/test_multinode.py runs deepspeed.sh with a two-host hostfile"),
    "DS_LAUNCHER_ARGS=--launcher=slurm salloc --nodes=2 --ntasks-per-node=8 launch/deepspeed.sh hostfile "
    "configs/vit_base.yaml data.path=...":
        (PARSE, "GPU nodes under Slurm; tests/test_multinode.py runs it with one task per node on the two-node "
                "test cluster"),
    "scripts/test_cluster.sh up 2": (SKIP, "namespaces, sshd and Slurm as root; tests/test_multinode.py runs it"),
    "scripts/test_cluster.sh exec node2 hostname": (SKIP, "on the cluster above (tests/test_multinode.py)"),
    "scripts/test_cluster.sh exec node1 launch/deepspeed.sh PATH-FROM-UP configs/quickstart.yaml":
        (SKIP, "on the cluster above, with the hostfile `up` printed (tests/test_multinode.py)"),
    "scripts/test_cluster.sh kill node2": (SKIP, "on the cluster above (tests/test_multinode.py's node failure)"),
    "scripts/test_cluster.sh down": (SKIP, "tests/test_multinode.py"),
    # docs/engines.md
    "python benchmarks/bench_step.py --out bench_step.json": (PARSE, "a GPU benchmark"),
    "python benchmarks/bench_step.py --archs vit_base --batch 128 --ac none full --compile off on":
        (PARSE, "a GPU benchmark"),
    # docs/eval.md
    "torchrun --nproc_per_node 8 -m massl.eval.cli knn --checkpoint runs/vitb --train ... --val ...": (PARSE, "8 GPUs"),
    "srun --ntasks-per-node 8 python -m massl.eval.cli knn ...": (PARSE, "a Slurm allocation"),
    "massl-train --config configs/vit_small.yaml eval.every_epochs=10 eval.train=/data/imagenet/train "
    "eval.val=/data/imagenet/val": (PARSE, "ImageNet"),
    "massl-eval linear --checkpoint runs/vits --train ... --val ...": (PARSE, "ImageNet"),
    # docs/report.md: the same command as README's
    # docs/slurm.md
    "sbatch --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=10 launch/slurm/train.sbatch "
    "configs/vit_base.yaml data.path=/data/imagenet/train run.output_dir=/ckpt/vitb": (PARSE, "a GPU Slurm cluster"),
    "scripts/slurm_cluster.sh start /tmp/slurm": (SKIP, "starts Slurm daemons as root; tests/test_slurm.py runs it"),
    "export SLURM_CONF=/tmp/slurm/slurm.conf PYTHON=.venv/bin/python": (SKIP, "environment for the lines below "
                                                                              "(tests/test_slurm.py)"),
    "sbatch --ntasks=2 --ntasks-per-node=2 launch/slurm/train.sbatch configs/quickstart.yaml engine.name=ddp":
        (PARSE, "needs the private Slurm above; tests/test_slurm.py submits this job"),
    "scancel --signal=USR1 --batch <jobid>": (SKIP, "a job id of the Slurm above (tests/test_slurm.py)"),
    "scripts/slurm_cluster.sh stop /tmp/slurm": (SKIP, "tests/test_slurm.py"),
    "PUBLISHED_DIR=/path/to/published OUT=/tmp/gpu bash benchmarks/gpu_check.sh": (SKIP, "needs a CUDA GPU and the "
        "published code's step benchmark; tests/test_gpu_table.py covers its table on synthetic parts"),
}


def code_blocks(text: str) -> list[str]:
    """Fenced blocks (bash, sh or no language) and 4-space indented blocks outside fences."""
    fenced = [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
              if m.group(1) in ("", "bash", "sh", "shell")]
    rest = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    indented = [re.sub(r"^    ", "", m.group(0), flags=re.M)
                for m in re.finditer(r"(?:^    [^\n]*\S[^\n]*\n?(?:^[ \t]*\n)?)+", rest, re.M)]
    return fenced + indented


def block_commands(block: str) -> list[str]:
    """The block's command lines (continuations joined, comments dropped), or [] when its first
    line is not a command (a layout listing, a formula, YAML)."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if current:
            line = current + " " + line.strip()
        if line.endswith("\\"):
            current = line[:-1].rstrip()
            continue
        current = ""
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if line.strip().startswith("[") and lines:  # a synopsis' optional flags, on the next line
            lines[-1] += " " + " ".join(line.split())
        elif line.strip():
            lines.append(" ".join(line.split()))
    if not lines:
        return []
    first = [w for w in lines[0].split() if not re.match(r"^[A-Z_]+=", w)]
    if not first or not first[0].startswith(PROGRAMS):
        return []
    return lines


def documented() -> list[tuple[str, str]]:
    """(file, command) of every command shown in README.md and docs/*.md."""
    out = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        for block in code_blocks(open(path).read()):
            out += [(os.path.relpath(path, ROOT), c) for c in block_commands(block)]
    return out


def key_of(command: str) -> str:
    return command


def test_every_documented_command_is_in_the_table():
    commands = documented()
    untested = sorted({f"{f}: {c}" for f, c in commands if key_of(c) not in COMMANDS})
    assert not untested, ("commands shown in the docs that tests/test_doc_commands.py does not exercise (add each to "
                          "COMMANDS with how to test it): " + "; ".join(untested))
    stale = sorted(set(COMMANDS) - {key_of(c) for _, c in commands})
    assert not stale, f"COMMANDS lists commands the docs no longer show: {stale}"


# ----------------------------------------------------------------------------- PARSE


def _args_after(words: list[str], marker: str) -> list[str]:
    i = next(i for i, w in enumerate(words) if w == marker or w.endswith(marker))
    return words[i + 1:]


def check_train_args(args: list[str]) -> None:
    """massl-train's arguments (or a launch script's CONFIG key=value...): the config loads."""
    from massl.config import load_config

    config = next((a for a in args if a.endswith(".yaml")), None)
    if "--config" in args:
        config = args[args.index("--config") + 1]
    # a placeholder value (data.path=...) stands for a path: YAML would read "..." as a document end
    overrides = [re.sub(r"=\.\.\.$", "=/placeholder", a) for a in args if "=" in a and not a.startswith("-")]
    assert config is None or os.path.isfile(os.path.join(ROOT, config)), config
    cwd = os.getcwd()
    os.chdir(ROOT)  # configs name files relative to the repository (engine.deepspeed_config)
    try:
        load_config(config, overrides, check_paths=False)
    finally:
        os.chdir(cwd)


@functools.lru_cache(maxsize=None)  # one --help per program for the whole module
def _help(argv: tuple) -> str:
    out = subprocess.run(list(argv) + ["--help"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stderr
    return out.stdout


def help_flags(argv: list[str]) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9_-]*", _help(tuple(argv))))


def eval_flags(sub: str) -> set[str]:
    from massl.eval.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices
    return {s for a in subparsers[sub]._actions for s in a.option_strings}


def used_flags(args: list[str]) -> set[str]:
    return {a.split("=")[0] for a in args if a.startswith("--")} | {
        f for a in args if a.startswith("[--") for f in re.findall(r"--[a-z][a-z0-9-]*", a)}


def parse_check(command: str) -> None:
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_]+=", w)]
    if "massl.eval.cli" in words or words[0] == "massl-eval":
        args = _args_after(words, "massl.eval.cli" if "massl.eval.cli" in words else "massl-eval")
        missing = used_flags(args[1:]) - eval_flags(args[0])
    elif words[0] == "massl-shard":
        missing = used_flags(words[1:]) - help_flags([os.path.join(_bin(), "massl-shard")])
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        missing = used_flags(words[2:]) - help_flags([sys.executable, words[1]])
    elif words[0] == "massl-train":
        check_train_args(words[1:])
        missing = set()
    else:  # launch/torchrun.sh N CONFIG ..., launch/deepspeed.sh HOSTFILE CONFIG ..., sbatch ... train.sbatch CONFIG ...
        script = next(w for w in words if w.startswith("launch/"))
        assert os.path.isfile(os.path.join(ROOT, script)), script
        extra = ["engine.name=deepspeed"] if script.endswith("deepspeed.sh") else []  # the script sets it
        check_train_args(_args_after(words, script) + extra)
        missing = set()
    assert not missing, f"{command}: no such flag(s) {sorted(missing)}"


@pytest.mark.parametrize("command", [  # a benchmark's --help imports all it measures: slow
    pytest.param(k, marks=pytest.mark.slow) if k.startswith("python benchmarks/") else k
    for k in sorted(k for k, (how, _) in COMMANDS.items() if how == PARSE)])
def test_documented_command_parses(command):
    parse_check(command)


# ----------------------------------------------------------------------------- RUN


def _bin() -> str:
    return os.path.dirname(sys.executable)


def _env() -> dict:
    env = dict(os.environ, PATH=_bin() + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def as_shell_line(command: str) -> str:
    how, detail = COMMANDS[command]
    if how == RUN_WITH:
        for old, new in detail.items():
            command = command.replace(old, new) if old else command + " " + new
    return command


@pytest.mark.slow
def test_documented_commands_run(tiny_run, tmp_path):
    """The RUN and RUN_WITH commands in one scratch directory, the data-writing ones first."""
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(os.path.join(ROOT, "configs"), work / "configs")
    shutil.copytree(tiny_run, work / "runs" / "quickstart")
    # the data first, as docs/data.md writes it (the digits, then their shards), then the rest
    first = ("python -m massl.tools.digits", "massl-shard data/digits/train")
    runs = sorted((c for c, (how, _) in COMMANDS.items() if how in (RUN, RUN_WITH)),
                  key=lambda c: next((i for i, f in enumerate(first) if c.startswith(f)), len(first)))
    for command in runs:
        line = as_shell_line(command)
        if line.startswith("massl-eval"):
            line += " --workers 0 --threads 1"  # as few processes as the shared test machine allows
        done = subprocess.run(line, shell=True, cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{line}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert (work / "runs" / "quickstart" / "report" / "index.html").is_file()
    assert (work / "data" / "digits_shards" / "manifest.json").is_file()
    assert (work / "vits_teacher.safetensors").is_file()
