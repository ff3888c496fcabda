"""massl_loss, KoLeo and the agreement monitor against independent float64 references."""
import pytest
import torch
import torch.nn.functional as F

from massl.loss import koleo_loss, massl_loss, partition_agreement, slot_partitions
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


@pytest.mark.parametrize("chunk_rows", [1, 5, 7])
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


def test_koleo_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    expected = 0.0
    for i in range(7):
        d = min((x[i] - x[j]).norm().item() for j in range(7) if j != i)
        expected -= torch.log(torch.tensor(d + 1e-8, dtype=torch.float64)).item() / 7
    assert abs(koleo_loss(x).item() - expected) < 1e-5


def test_agreement_matches_direct_computation():
    zs, zt, memory, perm = _inputs(2, 40, 8, 64, seed=5)
    top1, top5 = partition_agreement(zs[0], zt[1], memory, perm, 16)
    slots = perm[:16]
    s_rank = (zs[0] @ memory[:, slots]).argsort(dim=1, descending=True)[:, :5]
    t_best = (zt[1] @ memory[:, slots]).argmax(dim=1)
    assert top1.item() == pytest.approx((s_rank[:, 0] == t_best).double().mean().item())
    assert top5.item() == pytest.approx((s_rank == t_best[:, None]).any(1).double().mean().item())
