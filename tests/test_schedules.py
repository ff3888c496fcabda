"""Each schedule at chosen iterations against its closed form, computed here by hand."""
import math

import pytest

from massl.config import load_config
from massl.schedules import Schedules


@pytest.fixture
def sched(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}", "optim.epochs=10", "optim.warmup_epochs=2", "optim.lr=0.001",
                             "optim.min_lr=1e-5", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
                             "optim.teacher_momentum=0.996", "loss.warmup_teacher_temp=0.04",
                             "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=3"])
    return Schedules.from_config(cfg, iters_per_epoch=100, global_batch=512)  # 1000 iterations


def test_learning_rate(sched):
    base = 0.001 * 512 / 256
    assert sched.lr(0) == 0.0
    # linear warm-up over 200 iterations, np.linspace(0, base, 200) as published: base at iteration 199
    assert sched.lr(100) == pytest.approx(base * 100 / 199)
    assert sched.lr(199) == pytest.approx(base)
    assert sched.lr(200) == pytest.approx(base)
    # cosine over the 800 iterations after warm-up: half-way is the mean of base and min_lr
    assert sched.lr(600) == pytest.approx((base + 1e-5) / 2)
    assert sched.lr(400) == pytest.approx(1e-5 + (base - 1e-5) * (1 + math.cos(math.pi * 200 / 800)) / 2)
    assert sched.lr(1000) == pytest.approx(1e-5)


def test_weight_decay(sched):
    assert sched.weight_decay(0) == pytest.approx(0.04)
    assert sched.weight_decay(500) == pytest.approx(0.22)
    assert sched.weight_decay(250) == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi / 4)) / 2)
    assert sched.weight_decay(1000) == pytest.approx(0.4)


def test_teacher_momentum(sched):
    assert sched.teacher_momentum(0) == pytest.approx(0.996)
    assert sched.teacher_momentum(500) == pytest.approx(0.998)
    assert sched.teacher_momentum(750) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert sched.teacher_momentum(1000) == pytest.approx(1.0)


def test_teacher_temperature(sched):
    assert sched.teacher_temperature(0) == pytest.approx(0.04)
    assert sched.teacher_temperature(150) == pytest.approx(0.04 + 0.03 * 150 / 299)  # np.linspace over 300 iterations
    assert sched.teacher_temperature(299) == pytest.approx(0.07)
    assert sched.teacher_temperature(300) == pytest.approx(0.07)
    assert sched.teacher_temperature(999) == pytest.approx(0.07)


def test_closed_forms_at_their_edges():
    """np.linspace for the linear parts (lengths 1 and 2 included); the cosine clamped to its ends."""
    import numpy as np

    from massl.schedules import cosine, linspace_at

    for length in (1, 2, 3, 7):
        expected = np.linspace(0.5, 2.0, length)
        assert [linspace_at(i, length, 0.5, 2.0) for i in range(length)] == pytest.approx(expected.tolist())
    assert cosine(0, 10, 3.0, 1.0) == pytest.approx(3.0)
    assert cosine(5, 10, 3.0, 1.0) == pytest.approx(2.0)
    assert cosine(15, 10, 3.0, 1.0) == pytest.approx(1.0)  # past the end: the end value
    assert cosine(-1, 10, 3.0, 1.0) == pytest.approx(3.0)
    assert cosine(1, 1, 3.0, 1.0) == pytest.approx(1.0)  # one iteration: its end at it=1
    assert cosine(2, 0, 3.0, 1.0) == pytest.approx(1.0)  # no iterations: the end value after it


def test_at_names_every_schedule(sched):
    assert sched.iters_per_epoch == 100 and sched.total_iters == 1000
    assert sched.at(300).as_dict() == {"lr": sched.lr(300), "wd": sched.weight_decay(300),
                             "teacher_momentum": sched.teacher_momentum(300), "teacher_temp": sched.teacher_temperature(300)}
    assert sched.at(300) != sched.at(700)
