"""massl_loss, KoLeo and the agreement monitor against independent float64 references."""
import pytest
import torch
import torch.nn.functional as F

from massl.loss import koleo_loss, massl_loss, partition_agreement, random_partition_perm, slot_partitions
from tests.reference import massl_loss_reference


def _inputs(V, B, D, K, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = F.normalize(torch.randn(V, B, D, generator=g, dtype=dtype), dim=-1)
    zt = F.normalize(torch.randn(2, B, D, generator=g, dtype=dtype), dim=-1)
    memory = F.normalize(torch.randn(D, K, generator=g, dtype=dtype), dim=0)
    return zs, zt, memory, torch.randperm(K, generator=g)


CASES = [  # V, B, D, K, P
    (2, 3, 5, 16, 4),
    (3, 4, 6, 24, 8),
    (4, 3, 6, 30, 7),    # P does not divide K: 2 slots unused
    (6, 2, 8, 20, 20),   # one partition holding the whole memory
    (5, 3, 4, 17, 3),
]


@pytest.mark.parametrize("V,B,D,K,P", CASES)
def test_loss_and_gradient_match_float64_reference(V, B, D, K, P):
    zs, zt, memory, perm = _inputs(V, B, D, K)
    zs_a = zs.clone().requires_grad_()
    loss = massl_loss(zs_a, zt, memory, perm, P, 0.1, 0.04)
    loss.backward()
    zs_b = zs.clone().requires_grad_()
    ref = massl_loss_reference(zs_b, zt, memory, perm, P, 0.1, 0.04)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-10, atol=0)
    assert torch.allclose(zs_a.grad, zs_b.grad, rtol=1e-10, atol=1e-13)


def test_one_slot_partitions_give_zero_loss():
    """P = 1: each partition's softmax is 1 on its slot for student and teacher alike: no loss, no gradient."""
    zs, zt, memory, perm = _inputs(3, 2, 4, 6)
    zs.requires_grad_()
    loss = massl_loss(zs, zt, memory, perm, 1, 0.1, 0.04)
    loss.backward()
    assert abs(loss.item()) < 1e-12 and zs.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 12])  # 12: 3 samples per chunk, 2 chunks of 3 and 2
def test_chunked_loss_equals_reference(chunk_rows):
    zs, zt, memory, perm = _inputs(4, 5, 6, 24, seed=3)
    zs_a = zs.clone().requires_grad_()
    loss = massl_loss(zs_a, zt, memory, perm, 6, 0.1, 0.05, chunk_rows=chunk_rows)
    loss.backward()
    zs_b = zs.clone().requires_grad_()
    ref = massl_loss_reference(zs_b, zt, memory, perm, 6, 0.1, 0.05)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-10, atol=0)
    assert torch.allclose(zs_a.grad, zs_b.grad, rtol=1e-10, atol=1e-13)


def test_float32_close_to_reference():
    zs, zt, memory, perm = _inputs(4, 6, 16, 64, seed=1)
    loss = massl_loss(zs.float(), zt.float(), memory.float(), perm, 16, 0.1, 0.04)
    assert loss.dtype == torch.float32
    ref = massl_loss_reference(zs, zt, memory, perm, 16, 0.1, 0.04)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5


def test_bfloat16_inputs_are_computed_in_float32():
    zs, zt, memory, perm = _inputs(4, 6, 16, 64, seed=2)
    zs, zt, memory = zs.bfloat16(), zt.bfloat16(), memory.bfloat16()
    loss = massl_loss(zs, zt, memory, perm, 16, 0.1, 0.04)
    assert loss.dtype == torch.float32
    ref = massl_loss_reference(zs.double(), zt.double(), memory.double(), perm, 16, 0.1, 0.04)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5


def test_cpu_autocast_does_not_lower_the_precision():
    zs, zt, memory, perm = _inputs(4, 6, 16, 64, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = massl_loss(zs.float(), zt.float(), memory.float(), perm, 16, 0.1, 0.04)
    ref = massl_loss_reference(zs, zt, memory, perm, 16, 0.1, 0.04)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5


@pytest.mark.parametrize("chunk_rows,rows,n_exp", [
    (0, [5, 5], 2),               # one chunk: the forward's student and teacher exponentials, kept for the backward
    (12, [3, 3, 3, 3, 2, 2, 2, 2], 8),  # 2 chunks (3 + 2 samples): forward 2 per chunk, teacher again for q, student in backward
    (1, [1] * 20, 20),            # fewer rows than views: one sample per chunk
    (None, [5, 5], 2),            # the default: one chunk
])
def test_logits_buffers_per_chunk(chunk_rows, rows, n_exp, monkeypatch):
    """chunk_rows bounds the samples whose logits are held at once; one chunk computes each
    exponential once (module docstring). Seen through the in-place exp_ of the [views, rows, K]
    logits buffers (a dispatch mode would import torch._dynamo: seconds)."""
    shapes, exp_ = [], torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda t: shapes.append(tuple(t.shape)) or exp_(t))
    zs, zt, memory, perm = _inputs(4, 5, 6, 24, seed=3)
    zs.requires_grad_()
    chunking = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    massl_loss(zs, zt, memory, perm, 6, 0.1, 0.05, **chunking).backward()
    assert len(shapes) == n_exp
    assert sorted((s[1] for s in shapes), reverse=True) == rows
    assert all(s[2] == 24 and s[0] in (2, 4) for s in shapes)


def test_random_partition_perm():
    cpu = torch.device("cpu")
    first = random_partition_perm(40, 5, 0, cpu)
    assert sorted(first.tolist()) == list(range(40))
    assert torch.equal(first, random_partition_perm(40, 5, 0, cpu))  # every rank draws the same
    assert not torch.equal(first, random_partition_perm(40, 5, 1, cpu))  # a fresh one every step
    assert not torch.equal(first, random_partition_perm(40, 6, 0, cpu))
    # Known values: torch's generator seeded with (seed * 1_000_003 + step) mod (2^63 - 1), so a
    # resumed run, or another version of massl, draws the same partitions for the same (seed, step).
    for seed, step in ((5, 0), (5, 7), (2**62, 3)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
        assert torch.equal(random_partition_perm(40, seed, step, cpu), torch.randperm(40, generator=g))


def test_no_gradient_to_teacher_or_memory():
    zs, zt, memory, perm = _inputs(3, 4, 6, 24)
    zs.requires_grad_()
    zt.requires_grad_()
    memory.requires_grad_()
    massl_loss(zs, zt, memory, perm, 8, 0.1, 0.04).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None
    assert memory.grad is None


def test_partition_layout():
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4, 8])
    part = slot_partitions(perm, 4)
    # partition 0 = slots {5, 2, 7, 0}, partition 1 = {1, 6, 3, 4}, slot 8 is left over (id 2)
    assert part.tolist() == [0, 1, 0, 1, 1, 0, 1, 0, 2]


def test_rejects_bad_shapes():
    zs, zt, memory, perm = _inputs(3, 4, 6, 24)
    with pytest.raises(ValueError, match="zt"):
        massl_loss(zs, zt[:, :2], memory, perm, 8, 0.1, 0.04)
    with pytest.raises(ValueError, match="partition_size"):
        massl_loss(zs, zt, memory, perm, 25, 0.1, 0.04)
    with pytest.raises(ValueError, match="partition_size"):
        massl_loss(zs, zt, memory, perm, 0, 0.1, 0.04)
    with pytest.raises(ValueError, match="memory shard"):
        massl_loss(zs, zt, memory[:, :-1], perm, 8, 0.1, 0.04)  # K - 1 slots
    with pytest.raises(ValueError, match="memory shard"):
        massl_loss(zs, zt, memory[:-1], perm, 8, 0.1, 0.04)  # D - 1 rows


def test_koleo_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    expected = 0.0
    for i in range(7):
        d = min((x[i] - x[j]).norm().item() for j in range(7) if j != i)
        expected -= torch.log(torch.tensor(d + 1e-8, dtype=torch.float64)).item() / 7
    assert abs(koleo_loss(x).item() - expected) < 1e-5


def test_koleo_eps_guards_tiny_rows_and_coincident_rows():
    """A row shorter than eps is divided by eps (not made unit); coincident rows are
    ||x - y + eps|| = eps * sqrt(D) apart and the term adds eps inside the log (float64 loops)."""
    eps, dim = 1e-8, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, dim, generator=g, dtype=torch.float64)
    x[0] *= 1e-10 / x[0].norm()   # tiny
    x[2] = x[1]                   # coincident
    unit = torch.stack([r / max(r.norm().item(), eps) for r in x])
    expected = 0.0
    for b in range(6):
        nearest = max((c for c in range(6) if c != b), key=lambda c: (unit[b] @ unit[c]).item())
        d = (unit[b] - unit[nearest] + eps).norm().item()
        expected -= torch.log(torch.tensor(d + eps, dtype=torch.float64)).item() / 6
    got = koleo_loss(x, eps=eps).item()
    assert abs(got - expected) < 1e-4 * abs(expected)


def test_agreement_matches_direct_computation():
    zs, zt, memory, perm = _inputs(2, 40, 8, 64, seed=5)
    top1, top5 = partition_agreement(zs[0], zt[1], memory, perm, 16)
    slots = perm[:16]
    s_rank = (zs[0] @ memory[:, slots]).argsort(dim=1, descending=True)[:, :5]
    t_best = (zt[1] @ memory[:, slots]).argmax(dim=1)
    assert top1.item() == pytest.approx((s_rank[:, 0] == t_best).double().mean().item())
    assert top5.item() == pytest.approx((s_rank == t_best[:, None]).any(1).double().mean().item())
