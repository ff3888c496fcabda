"""Export gives a timm state dict with the checkpoint teacher's features; the L-BFGS probe equals scikit-learn's logistic regression."""
import json
import os

import pytest
import timm
import torch

from massl.checkpoint.reader import read_config
from massl.export import export_teacher
from massl.models import build_student_teacher
from massl.train import train


@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory):
    from massl.config import load_config
    from tests.conftest import tiny_overrides

    out = str(tmp_path_factory.mktemp("export"))
    # no warm-up, lr 1e-2 and teacher momentum 0.5: three steps move every teacher weight by ~1e-3 or more
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + [
        "run.max_steps=3", "model.pooling=mean", "optim.warmup_epochs=0", "optim.lr=0.32", "optim.teacher_momentum=0.5"]))
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_loads_strictly_into_timm_with_same_features(trained_run, tmp_path, suffix):
    out = str(tmp_path / ("teacher" + suffix))
    export_teacher(trained_run, out)
    spec = json.load(open(out + ".json"))
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(out)
    else:
        state = torch.load(out, weights_only=True)
    model.load_state_dict(state, strict=True)

    ckpt = os.path.join(trained_run, "checkpoints", "step_000000003")
    cfg = read_config(ckpt)
    _, teacher = build_student_teacher(cfg)
    # the reference reads the checkpoint file directly, not through the export's reader
    teacher.load_state_dict(torch.load(os.path.join(ckpt, "engine", "state.pt"), weights_only=True)["teacher"])
    x = torch.randn(4, 3, cfg.data.global_crop_size, cfg.data.global_crop_size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), teacher.eval().backbone(x))
    # and the checkpoint teacher is the trained one, not the initial one (train() seeds right
    # before building the models): every weight tensor moved far beyond rounding
    torch.manual_seed(cfg.run.seed)
    _, fresh = build_student_teacher(cfg)
    initial = fresh.backbone.state_dict()
    moved = {k: (v - initial[k]).abs().max().item() for k, v in state.items()}
    assert min(moved.values()) > 1e-4, moved


def test_export_rejects_unknown_suffix(trained_run, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        export_teacher(trained_run, str(tmp_path / "teacher.bin"))


def test_linear_probe_matches_sklearn_logistic_regression():
    """The same convex objective (mean cross-entropy + wd * |W|^2, bias unpenalised) solved by
    scikit-learn gives the same predictions."""
    from sklearn.linear_model import LogisticRegression

    from massl.eval.linear import linear_probe_accuracy, train_linear_probe

    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 6, generator=g) * 1.5
    y = torch.randint(0, 4, (300,), generator=g)
    x = centers[y] + torch.randn(300, 6, generator=g)
    wd = 1e-2
    probe = train_linear_probe(x[:200], y[:200], 4, weight_decay=wd)
    ref = LogisticRegression(C=1.0 / (2 * wd * 200), tol=1e-10, max_iter=10000).fit(x[:200].numpy(), y[:200].numpy())
    with torch.no_grad():
        ours = probe(x[200:].double()).softmax(1).numpy()
    theirs = ref.predict_proba(x[200:].numpy())
    assert abs(ours - theirs).max() < 1e-3
    acc = linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], 4, weight_decay=wd)["top1"]
    assert acc == pytest.approx((theirs.argmax(1) == y[200:].numpy()).mean())
