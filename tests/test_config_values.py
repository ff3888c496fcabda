"""Override values read by the key's declared type, every number finite and in its range, and
config files that are not UTF-8, expand aliases exponentially or set an int to infinity refused
in one line."""
import os

import pytest

from massl.config import ConfigError, load_config


@pytest.fixture
def base(tmp_path):
    return [f"data.path={tmp_path}"]


def test_string_overrides_are_taken_literally(base, tmp_path):
    cfg = load_config(None, base + ["run.output_dir=runs/exp #3", "data.urls=", "memory.sharded=true"])
    assert cfg.run.output_dir == "runs/exp #3"  # YAML read "runs/exp" (a comment), maybe another run's directory
    assert cfg.memory.sharded == "true"
    with pytest.raises(ConfigError, match=r"^run.resume: must be auto, never or an existing checkpoint directory, got '~'"):
        load_config(None, base + ["run.resume=~"], check_paths=True)


@pytest.mark.parametrize("override,message", [
    ("run.seed=0123", "run.seed: expected an integer such as 10, got '0123'"),  # YAML: octal 83
    ("run.max_steps=1e3", "run.max_steps: expected an integer"),
    ("run.tensorboard=on", "run.tensorboard: expected true or false, got 'on'"),  # YAML: true
    ("run.tensorboard=1", "run.tensorboard: expected true or false"),
    ("optim.lr=yes", "optim.lr: expected a number such as 1e-3, got 'yes'"),
    ("optim.lr=1_0", "optim.lr: expected a number"),
    ("data.global_crops_scale=0.5", "data.global_crops_scale: expected a list such as [0.32, 1.0], got '0.5'"),
])
def test_numbers_and_booleans_are_parsed_strictly(base, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, base + [override])
    assert str(err.value).startswith(message), str(err.value)


def test_typed_overrides_keep_what_worked(base):
    cfg = load_config(None, base + ["optim.lr=1e-3", "run.max_steps=+7", "run.tensorboard=False", "eval.k=[5, 20]",
                                    "optim.betas=[0.8, 0.9]", "model.drop_path=0"])
    assert (cfg.optim.lr, cfg.run.max_steps, cfg.run.tensorboard, cfg.optim.betas) == (1e-3, 7, False, [0.8, 0.9])
    assert cfg.model.drop_path == 0.0 and isinstance(cfg.model.drop_path, float)


@pytest.mark.parametrize("override,key", [
    ("data.aug.saturation=.nan", "data.aug.saturation"),  # trained on black crops, exit 0
    ("data.aug.brightness=.inf", "data.aug.brightness"),
    ("data.aug.hue=.nan", "data.aug.hue"),
    ("data.aug.hue=0.6", "data.aug.hue"),
    ("data.aug.hue=-0.1", "data.aug.hue"),
    ("data.aug.contrast=-0.5", "data.aug.contrast"),
    ("data.aug.brightness=-1", "data.aug.brightness"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.clip_grad=.inf", "optim.clip_grad"),
    ("loss.teacher_temp=.inf", "loss.teacher_temp"),
    ("data.aug.mean=[0.5, .nan, 0.5]", "data.aug.mean"),
    ("optim.momentum=-0.5", "optim.momentum"),
    ("run.seed=-1", "run.seed"),
    ("eval.temperature=.inf", "eval.temperature"),
])
def test_every_number_is_finite_and_in_range(base, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, base + [override])
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_augmentation_strengths_at_torchvision_bounds_are_accepted(base):
    load_config(None, base + ["data.aug.hue=0.5", "data.aug.brightness=0", "data.aug.saturation=3"])


def config_file(tmp_path, content: bytes) -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    return str(path)


def test_a_config_file_that_is_not_utf8_is_one_line(base, tmp_path):
    path = config_file(tmp_path, b"run:\n  output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^--config .*c.yaml: not UTF-8 text \(byte 22"):
        load_config(path, base)


def test_an_alias_bomb_is_refused_in_one_short_line(base, tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = config_file(tmp_path, ("\n".join(lines) + "\nrun: {seed: *a8}\n").encode())
    with pytest.raises(ConfigError) as err:  # before: a 39 MB error message or a MemoryError
        load_config(path, base)
    msg = str(err.value)
    assert msg.startswith("--config") and "alias *a0 of a list or mapping" in msg and len(msg) < 300, msg[:300]


def test_aliases_of_plain_values_still_work(base, tmp_path):
    path = config_file(tmp_path, b"optim: {lr: &lr 0.002, min_lr: *lr}\n")
    cfg = load_config(path, base)
    assert cfg.optim.lr == cfg.optim.min_lr == 0.002


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_an_int_key_set_to_infinity_in_a_file_is_one_line(base, tmp_path, value):
    path = config_file(tmp_path, f"run: {{max_steps: {value}}}\n".encode())
    with pytest.raises(ConfigError, match=r"^run.max_steps: expected an integer"):  # before: OverflowError / ValueError
        load_config(path, base)


def test_an_output_dir_that_is_a_file_is_one_line(base, tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"^run.output_dir: .*taken' is a file, not a directory"):
        load_config(None, base + [f"run.output_dir={path}"])


def test_an_output_dir_below_a_file_is_one_line_at_launch(tiny_config, tmp_path):
    from massl.train import train

    (tmp_path / "taken").write_text("x")
    cfg = tiny_config("run.max_steps=1", output_dir=os.path.join(str(tmp_path), "taken", "run"))
    with pytest.raises(ConfigError, match=r"^run.output_dir: .* a part of it is a file"):
        train(cfg)


def test_an_augmentation_error_is_not_counted_as_an_unreadable_image(tiny_config):
    from massl.data.folder import MultiCropFolder
    from massl.data.multicrop import AugmentationError, MultiCropAugmentation

    cfg = tiny_config()
    aug = MultiCropAugmentation(cfg.data)

    def broken(x, p):  # what a NaN hue made cv2 raise
        raise ValueError("hue shift is not a number")

    aug.photometric = broken
    folder = MultiCropFolder(cfg.data.path, aug, seed=0)
    # before: ValueError counted as a decode error, then "16 consecutive unreadable images"
    with pytest.raises(AugmentationError, match="photometric augmentation failed .*check data.aug"):
        folder[(0, 0)]
