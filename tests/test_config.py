"""Config loading, overrides and validation: each bad case is rejected with a message naming the key."""
import os
import subprocess
import sys

import pytest
import yaml

from massl.config import ConfigError, load_config, validate


@pytest.fixture
def base(tmp_path):
    return [f"data.path={tmp_path}"]


def test_defaults_are_the_published_vit_base_recipe(base):
    cfg = load_config(None, base)
    assert (cfg.model.arch, cfg.model.patch_size, cfg.memory.size, cfg.memory.partition_size) == ("vit_base", 16, 131072, 16384)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.00075, 2e-6, 0.04, 0.4)
    assert (cfg.optim.teacher_momentum, cfg.optim.clip_grad, cfg.optim.warmup_epochs, cfg.optim.epochs) == (0.996, 3.0, 10, 400)
    assert (cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs) == (0.04, 0.07, 50)
    assert (cfg.data.local_crops_number, cfg.data.global_crops_scale, cfg.data.local_crops_scale) == (10, [0.32, 1.0], [0.05, 0.32])
    assert (cfg.model.drop_path, cfg.model.head_use_bn, cfg.loss.koleo_weight, cfg.data.batch_size) == (0.1, False, 0.0, 32)


def test_yaml_then_overrides(tmp_path, base):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.5, "epochs": 3, "warmup_epochs": 1}, "data": {"batch_size": 16}}))
    cfg = load_config(str(path), base + ["optim.lr=1e-3", "data.global_crops_scale=[0.4, 1]"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 3 and cfg.data.batch_size == 16
    assert cfg.data.global_crops_scale == [0.4, 1]


BAD = [
    (["memory.partition_size=200000"], "memory.partition_size"),
    (["data.global_crop_size=100"], "data.global_crop_size"),
    (["data.local_crop_size=90"], "data.local_crop_size"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.name=adam"], "optim.name"),
    (["data.aug.flip_prob=1.5"], "data.aug.flip_prob"),
    (["optim.nesterov=true"], "optim.nesterov"),
    (["loss.teacher_temp=0.001"], "loss.teacher_temp"),
    (["model.arch=custom"], "model.embed_dim"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.global_crops_scale=[0.5]"], "data.global_crops_scale"),
    (["data.source=webdataset"], "data.urls"),
    (["run.resume=/no/such/checkpoint"], "run.resume"),
    (["optim.min_lr=1"], "optim.min_lr"),
    (["data.gpu_augment=maybe"], "data.gpu_augment"),
    (["data.aug.mean=[a,b,c]"], "data.aug.mean"),
    (["run.device=cpu", "run.precision=fp16"], "run.precision"),
    # keys without effect in the chosen combination
    (["model.arch=vit_small", "model.depth=6"], "model.depth"),
    (["data.urls=shards/train-000000.tar"], "data.urls"),
    (["optim.momentum=0.8"], "optim.momentum"),
    (["optim.name=sgd", "optim.betas=[0.8, 0.9]"], "optim.betas"),
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_rejects_bad_values_naming_the_key(base, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    assert str(err.value).startswith(key)


def test_rejects_missing_data_path():
    with pytest.raises(ConfigError, match=r"^data.path: directory '/no/such/dir' does not exist"):
        load_config(None, ["data.path=/no/such/dir"])
    with pytest.raises(ConfigError, match=r"^data.path: is required"):
        load_config(None, [])


def test_world_size_checks(base):
    cfg = load_config(None, base + ["memory.size=4096", "memory.partition_size=512", "data.batch_size=48"])
    with pytest.raises(ConfigError, match=r"^memory.size: .* multiple of the global batch"):
        validate(cfg, world_size=1)  # 4096 % 48 != 0: the ring would not fill evenly
    cfg = load_config(None, base + ["memory.size=4096", "memory.partition_size=512", "data.batch_size=32"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"^engine.name: is single but 2 processes"):
        validate(cfg, world_size=2)
    cfg.engine.name = "ddp"
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"^memory.size: .* multiple of the global batch"):
        validate(cfg, world_size=3)


def test_keys_without_effect_in_a_shared_config_warn_at_launch(base, caplog):
    cfg = load_config(None, base + ["engine.ac_every=3", "data.local_crops_number=0", "data.local_crop_size=64"])
    validate(cfg, world_size=1)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "engine.ac_every" in warned and "data.local_crop_size" in warned
    assert "data.local_crops_scale" not in warned  # left at its default: nothing to say


def test_fp16_on_a_cpu_is_refused_at_launch(base):
    cfg = load_config(None, base + ["run.precision=fp16"])  # run.device=auto: the device is known at launch
    with pytest.raises(ConfigError, match=r"^run.precision: fp16 needs a CUDA device"):
        validate(cfg, world_size=1, device_type="cpu")


def test_print_config_needs_no_data(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "massl.cli", "--print-config", "--config",
                          os.path.join(os.path.dirname(__file__), "..", "configs", "vit_small.yaml")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["arch"] == "vit_small"


def test_cli_fp16_on_cpu_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "massl.cli", f"data.path={tmp_path}", "run.device=cpu",
                          "run.precision=fp16"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("error: run.precision:")


def test_cli_print_config_and_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "massl.cli", "--print-config", f"data.path={tmp_path}", "optim.lr=0.01"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["optim"]["lr"] == 0.01
    bad = subprocess.run([sys.executable, "-m", "massl.cli", f"data.path={tmp_path}", "optim.lr=-2"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "optim.lr" in bad.stderr and "Traceback" not in bad.stderr


def test_every_key_is_documented():
    import dataclasses

    from massl.config import Config

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")).read()

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, prefix + f.name + ".")
            else:
                yield prefix + f.name

    missing = [k for k in keys(Config()) if f"`{k}`" not in doc and f"`{k.rsplit('.', 1)[1]}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"
