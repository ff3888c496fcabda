"""MaSSLObjective (massl/objective.py), the method's step as one component, in one process: its
terms against float64 references written here from method.md, its partition permutation and its
enqueue against a FIFO loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from massl.memory import MemoryBank
from massl.objective import MaSSLObjective
from massl.schedules import Hyper
from tests.reference import FifoReference, massl_loss_reference

D, K, P, V, B = 8, 32, 8, 4, 4
HYPER = Hyper(lr=0.1, wd=0.04, teacher_momentum=0.99, teacher_temp=0.06)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """torch.testing.assert_close's check (same shape and dtype, elementwise within tolerance), without
    its first call's import of torch.distributed.tensor (seconds, paid again by every mutant of
    scripts/mutation.sh)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (got, want)


def make(koleo_weight: float = 0.0, seed: int = 3) -> MaSSLObjective:
    return MaSSLObjective(MemoryBank(D, K, sharded=False, seed=seed), partition_size=P, student_temp=0.1,
                          seed=seed, koleo_weight=koleo_weight)


def embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = F.normalize(torch.randn(V, B, D, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(2, B, D, generator=g, dtype=torch.float64), dim=-1)
    return zs, zt


def koleo_reference(x: torch.Tensor) -> torch.Tensor:
    """-mean over rows of log(distance to the nearest other row), rows L2-normalised (loops)."""
    x = x / x.norm(dim=-1, keepdim=True)
    nearest = [min((x[b] - x[c]).norm() for c in range(len(x)) if c != b) for b in range(len(x))]
    return -torch.stack([torch.log(d) for d in nearest]).mean()


@pytest.mark.parametrize("step", [0, 7])
def test_loss_is_the_method_loss_over_the_steps_partition(step):
    objective = make()
    zs, zt = embeddings(step)
    terms = objective(zs, zt, step, HYPER)
    perm = objective.permutation(step, zs.device)
    want = massl_loss_reference(zs, zt, objective.memory.bank.double(), perm, P, 0.1, HYPER.teacher_temp)
    assert_close(terms.loss, want, rtol=1e-10, atol=1e-12)
    assert_close(terms.objective, want, rtol=1e-10, atol=1e-12)  # one process: no scaling
    assert terms.koleo is None and terms.agreement is None
    assert set(terms.metrics()) == {"loss"}


def test_koleo_is_added_with_its_weight_and_reported_unweighted():
    zs, zt = embeddings(1)
    plain, with_koleo = make()(zs, zt, 2, HYPER), make(koleo_weight=0.3)(zs, zt, 2, HYPER)
    koleo = 0.5 * (koleo_reference(zs[0]) + koleo_reference(zs[1]))
    # KoLeo computes in fp32 (massl.loss.koleo_loss)
    assert_close(with_koleo.koleo.double(), koleo, rtol=1e-5, atol=1e-6)
    assert_close(with_koleo.loss, plain.loss + 0.3 * koleo, rtol=1e-5, atol=1e-6)
    assert_close(with_koleo.objective, with_koleo.loss)
    metrics = with_koleo.metrics()
    assert set(metrics) == {"loss", "koleo"}
    assert_close(metrics["koleo"], with_koleo.koleo)


def test_monitoring_adds_the_agreement():
    zs, zt = embeddings(2)
    terms = make()(zs, zt, 4, HYPER, monitor=True)
    top1, top5 = terms.agreement
    # method.md: student view 0's top-5 over partition 0 against teacher view 1's best slot there
    objective = make()
    slots = objective.permutation(4, zs.device)[:P]
    bank = objective.memory.bank.double()
    s_rank = (zs[0] @ bank[:, slots]).argsort(dim=1, descending=True)[:, :5]
    t_best = (zt[1] @ bank[:, slots]).argmax(dim=1)
    assert top1.item() == pytest.approx((s_rank[:, 0] == t_best).double().mean().item())
    assert top5.item() == pytest.approx((s_rank == t_best[:, None]).any(1).double().mean().item())
    assert set(terms.metrics()) == {"loss", "agree_top1", "agree_top5"}


def test_terms_monitor_only_when_asked():
    objective = make()
    zs, zt = embeddings(2)
    perm = objective.permutation(4, zs.device)
    assert objective.terms(zs, zt, perm, HYPER.teacher_temp).agreement is None
    assert objective.terms(zs, zt, perm, HYPER.teacher_temp, monitor=True).agreement is not None


def test_defaults_no_koleo_and_one_chunk(monkeypatch):
    objective = MaSSLObjective(MemoryBank(D, K, sharded=False, seed=3), partition_size=P, student_temp=0.1, seed=3)
    rows, exp_ = [], torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda t: rows.append(t.shape[1]) or exp_(t))
    zs, zt = embeddings(0)
    assert objective(zs, zt, 0, HYPER).koleo is None
    assert rows == [B, B]  # the student's and the teacher's logits, all samples at once


def test_chunk_rows_reach_the_loss(monkeypatch):
    """memory.chunk_rows bounds the samples whose logits the loss holds at once (V rows: one sample)."""
    objective = MaSSLObjective(MemoryBank(D, K, sharded=False, seed=3), partition_size=P, student_temp=0.1,
                               seed=3, chunk_rows=V)
    rows, exp_ = [], torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda t: rows.append(t.shape[1]) or exp_(t))
    zs, zt = embeddings(0)
    objective(zs, zt, 0, HYPER)
    assert rows and max(rows) == 1


def test_permutation_is_a_fresh_permutation_per_step_and_the_same_for_a_step():
    objective = make()
    perms = [objective.permutation(step, torch.device("cpu")) for step in (0, 1, 0)]
    assert all(sorted(p.tolist()) == list(range(K)) for p in perms)
    assert torch.equal(perms[0], perms[2]) and not torch.equal(perms[0], perms[1])
    assert not torch.equal(perms[0], make(seed=4).permutation(0, torch.device("cpu")))


def test_remember_enqueues_and_the_next_step_sees_it():
    objective = make()
    reference = FifoReference(objective.memory.bank)
    zs, zt = embeddings(3)
    before = objective(zs, zt, 5, HYPER).loss
    keys = zt[1].float()
    objective.remember(keys)
    reference.enqueue(keys)
    assert_close(objective.memory.bank, reference.memory)
    assert objective.memory.ptr == reference.ptr == B
    assert not torch.allclose(objective(zs, zt, 5, HYPER).loss, before)  # the loss reads the memory as it is now


@pytest.fixture
def one_rank_group():
    """A real one-rank gloo group in this process (a run's group at world size 1), torn down after."""
    import torch.distributed as dist

    if dist.is_initialized():  # a one-rank group an earlier in-process run (ddp/fsdp at W=1) left
        assert dist.get_world_size() == 1
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scope,sharded", [("local", "auto"), ("global", "false")])
def test_from_config_takes_every_setting(scope, sharded, one_rank_group):
    from massl.config import load_config
    from massl.dist import DistEnv

    cfg = load_config(None, [
        "model.head_bottleneck_dim=6", "memory.size=40", "memory.partition_size=10", "memory.chunk_rows=7",
        f"memory.sharded={sharded}", "loss.student_temp=0.2", "loss.koleo_weight=0.25", f"loss.koleo_scope={scope}",
        "run.seed=11"], check_paths=False)
    objective = MaSSLObjective.from_config(cfg, DistEnv(group=one_rank_group))
    # method.md step 2 from the run seed: unit columns of a seeded normal draw
    initial = F.normalize(torch.randn(6, 40, generator=torch.Generator().manual_seed(11)), dim=0)
    assert_close(objective.memory.bank, initial)
    assert objective.memory.group is one_rank_group and objective.memory.ptr == 0
    assert (objective.partition_size, objective.student_temp, objective.seed) == (10, 0.2, 11)
    assert (objective.koleo_weight, objective.chunk_rows) == (0.25, 7)
    assert objective.koleo_group is (one_rank_group if scope == "global" else None)
    assert objective.loss_group is None and not objective.sharded  # one rank: every layout is the full memory


class _ShardedBank(MemoryBank):
    """A memory that reports itself sharded, as every rank's shard does at W > 1 (at W = 1 the
    layouts coincide and MemoryBank reports unsharded)."""

    sharded = True  # type: ignore[assignment]


def test_sharded_memory_spans_the_loss_over_its_group(one_rank_group):
    from tests.collectives import CollectiveCounter

    zs, zt = embeddings(4)
    for memory, group, reductions in ((_ShardedBank(D, K, group=one_rank_group, seed=3), one_rank_group, 2),
                                      (MemoryBank(D, K, group=one_rank_group, sharded=False, seed=3), None, 0)):
        objective = MaSSLObjective(memory, partition_size=P, student_temp=0.1, seed=3)
        assert objective.loss_group is group
        with CollectiveCounter() as counter:
            terms = objective(zs, zt, 1, HYPER)
        # the per-(row, partition) sums and the cross term are all-reduced over the group
        assert [kind for kind, _ in counter.calls] == ["all_reduce"] * reductions
        want = massl_loss_reference(zs, zt, memory.bank.double(), objective.permutation(1, zs.device), P, 0.1,
                                    HYPER.teacher_temp)
        assert_close(terms.loss, want, rtol=1e-10, atol=1e-12)
