"""The memory sharded across ranks against single-process references, on real gloo processes.

One spawn per world size W in {1, 2, 4} runs every scenario below and returns its results; the
tests compare them, in this process, to float64 references that never call `massl_loss`:
`tests.reference.massl_loss_reference` (method.md step 5 as loops), `FifoReference`, and the
explicit KoLeo / agreement / gather references written here.

The global batch is fixed (G = 8 samples, split B = G/W per rank), so one reference serves every W.
K = 48 memory slots; the partition sizes cover: P = 8 (does not divide K/W = 12 at W = 4),
P = 16 (N = 3 partitions, fewer than W = 4 ranks, so a partition spans several ranks) and
P = 10 (does not divide K: 8 slots are left over every step).
"""
from __future__ import annotations

import functools
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from massl.dist import gather_rows_with_grad, sum_partials, world_of
from massl.loss import koleo_loss, massl_loss, partition_agreement, random_partition_perm
from massl.memory import MemoryBank
from tests.collectives import CollectiveCounter
from tests.distributed import run_ranks
from tests.reference import FifoReference, massl_loss_reference

SEED, STEPS = 3, 3
K, D, V, G = 48, 6, 3, 8
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
PARTITIONS = (8, 16, 10)
CHUNK_ROWS = (1, 9)  # 1 sample per chunk; 3 samples per chunk (uneven split of G = 8)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
WORLDS = (1, 2, 4)
CKPT_PARTITION = 8


def _inputs(step: int, dtype: torch.dtype):
    """Global unit-norm embeddings of one step: zs [V, G, D], zt [2, G, D]."""
    g = torch.Generator().manual_seed(1000 + step)
    zs = F.normalize(torch.randn(V, G, D, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(2, G, D, generator=g, dtype=torch.float64), dim=-1)
    return zs.to(dtype), zt.to(dtype)


def _initial_memory() -> torch.Tensor:
    """method.md step 2, from the run seed: what every world size must start from."""
    return F.normalize(torch.randn(D, K, generator=torch.Generator().manual_seed(SEED)), dim=0)


def _rows(rank: int, world: int, n: int = G) -> slice:
    """Rank `rank`'s share of n rows (or slots), contiguous and in rank order."""
    return slice(rank * (n // world), (rank + 1) * (n // world))


def _perm(step: int) -> torch.Tensor:
    return random_partition_perm(K, SEED, step, torch.device("cpu"))


# ----------------------------------------------------------------------------- rank side


def _train_steps(group, partition_size, dtype, chunk_rows=0, sharded=True, steps=STEPS):
    """`steps` x (loss forward + backward, enqueue of teacher view 1) on this rank's rows.

    sharded=False is the `memory.sharded: false` layout: full memory here, loss over the local
    batch with group=None, the memory still fed with every rank's keys.
    """
    rank, world = world_of(group)
    rows = _rows(rank, world)
    memory = MemoryBank(D, K, group=group, sharded=sharded, seed=SEED)
    losses, grads, perms = [], [], []
    for step in range(steps):
        zs_all, zt_all = _inputs(step, dtype)
        zs = zs_all[:, rows].clone().requires_grad_()
        perm = _perm(step)
        loss = massl_loss(zs, zt_all[:, rows], memory.bank, perm, partition_size, STUDENT_TEMP, TEACHER_TEMP,
                          group=group if sharded else None, chunk_rows=chunk_rows)
        loss.backward()
        losses.append(loss.detach())
        grads.append(zs.grad)
        perms.append(perm)
        memory.enqueue(zt_all[1, rows])
    return {"loss": losses, "grad": grads, "perm": perms, "state": memory.state_dict()}, memory


def _engine_gradient(group, sharded):
    """Parameter gradient of a tiny projection as train.py produces it: backward of loss * W when
    sharded (each rank holds its part of the global gradient), then the engine's mean over ranks."""
    rank, world = world_of(group)
    rows = _rows(rank, world)
    x_all, zt_all = _projection_inputs()
    proj = _projection_weight().requires_grad_()
    zs = F.normalize(x_all[:, rows] @ proj, dim=-1)
    memory = _initial_memory().double()
    if sharded:
        memory = memory[:, _rows(rank, world, K)]
    loss = massl_loss(zs, zt_all[:, rows], memory, _perm(0), 16, STUDENT_TEMP, TEACHER_TEMP,
                      group=group if sharded else None)
    (loss * (world if sharded else 1)).backward()
    grad = proj.grad.clone()
    dist.all_reduce(grad, group=group)
    return grad / world


def _projection_inputs():
    g = torch.Generator().manual_seed(77)
    x = torch.randn(V, G, 5, generator=g, dtype=torch.float64)
    zt = F.normalize(torch.randn(2, G, D, generator=g, dtype=torch.float64), dim=-1)
    return x, zt


def _projection_weight():
    return torch.randn(5, D, generator=torch.Generator().manual_seed(78), dtype=torch.float64)


def _koleo_inputs():
    return torch.randn(G, D, generator=torch.Generator().manual_seed(5))


def _agreement_inputs():
    """Teacher view 1 and a noisy copy as student view 0, so agreement is neither 0 nor 1."""
    g = torch.Generator().manual_seed(6)
    zt1 = F.normalize(torch.randn(32, D, generator=g), dim=-1)
    zs0 = F.normalize(zt1 + 0.6 * torch.randn(32, D, generator=g), dim=-1)
    return zs0, zt1


def _gather_inputs():
    g = torch.Generator().manual_seed(9)
    return torch.randn(G, 4, generator=g, dtype=torch.float64), torch.randn(4, G, generator=g, dtype=torch.float64)


def _gather_grad(group):
    """A gloo all-gather pitfall: gather [B, 4] rows, transpose (the gradient that comes back is
    non-contiguous), each rank takes its share of a weighted sum of squares."""
    rank, world = world_of(group)
    x_all, weight = _gather_inputs()
    x = x_all[_rows(rank, world)].clone().requires_grad_()
    gathered = gather_rows_with_grad(x, group)
    contiguous = []
    gathered.register_hook(lambda grad: contiguous.append(grad.is_contiguous()))
    mine = (torch.arange(weight.numel()).view_as(weight) % world == rank).double()
    value = sum_partials((weight * mine * gathered.T ** 2).sum(), group)
    value.backward()
    return value.detach(), x.grad, contiguous[0]


def _collective_bytes(group, size, partition_size, batch=4, views=4, dim=8):
    """Collectives of one step of the loss path: massl_loss forward + backward, then enqueue."""
    zs = F.normalize(torch.randn(views, batch, dim), dim=-1).requires_grad_()
    zt = F.normalize(torch.randn(2, batch, dim), dim=-1)
    memory = MemoryBank(dim, size, group=group, seed=0)
    perm = random_partition_perm(size, 0, 0, torch.device("cpu"))
    with CollectiveCounter() as counter:
        massl_loss(zs, zt, memory.bank, perm, partition_size, STUDENT_TEMP, TEACHER_TEMP, group=group).backward()
        memory.enqueue(zt[1])
    return counter.calls


def _rank_main(rank, world, saved_at_2):
    group = dist.group.WORLD
    exact = {(p, dtype): _train_steps(group, p, dtype) for p in PARTITIONS for dtype in TOL}
    out = {
        "exact": {key: results for key, (results, _) in exact.items()},
        "chunked": {(p, c): _train_steps(group, p, torch.float64, chunk_rows=c)[0]
                    for p in PARTITIONS for c in CHUNK_ROWS},
        "replicated": {p: _train_steps(group, p, torch.float64, sharded=False)[0] for p in PARTITIONS},
        "engine_grad": {s: _engine_gradient(group, s) for s in (True, False)},
        "gather": _gather_grad(group),
    }
    x = _koleo_inputs()[_rows(rank, world)].clone().requires_grad_()
    value = koleo_loss(x, group)
    value.backward()
    out["koleo"] = (value.detach(), x.grad)
    zs0, zt1 = _agreement_inputs()
    mine = _rows(rank, world, zs0.shape[0])
    memory = MemoryBank(D, K, group=group, seed=SEED)
    out["agreement"] = [torch.stack(partition_agreement(zs0[mine], zt1[mine], memory.bank, _perm(0), p, group))
                        for p in PARTITIONS]
    if world == 2:
        trained = exact[(CKPT_PARTITION, torch.float64)][1]
        out["saved"] = {"full": trained.full_state_dict(), "shard": trained.state_dict()}
    if world > 1:
        out["bytes"] = {size: _collective_bytes(group, size, size // 8) for size in (4096, 65536)}
    if saved_at_2 is not None:
        out["loaded"] = _load_and_continue(group, saved_at_2)
    # Plain pickle copies the tensors' data; a tensor put on the queue as is would be shared by a
    # file descriptor that dies with this process before the parent reads it.
    return pickle.dumps(out)


def _load_and_continue(group, saved_at_2):
    """Load the W=2 checkpoint (the full ring, and when it covers our slots a W=2 shard), then run one more enqueue."""
    rank, world = world_of(group)
    results = {}
    sources = {"full": saved_at_2["full"], "shard": saved_at_2["shards"][rank * 2 // world]}
    for name, state in sources.items():
        memory = MemoryBank(D, K, group=group, seed=SEED + 1)  # a different init: loading must overwrite it
        try:
            memory.load_state_dict(state)
        except ValueError as e:
            results[name] = str(e)
            continue
        _, zt_all = _inputs(STEPS, torch.float64)
        memory.enqueue(zt_all[1, _rows(rank, world)])
        results[name] = {"state": memory.state_dict(), "full": memory.full_state_dict()}
    return results


# ----------------------------------------------------------------------------- references (this process)


@pytest.fixture(scope="module")
def runs():
    def run(world, saved):
        return [pickle.loads(r) for r in run_ranks(_rank_main, world, saved)]

    at2 = run(2, None)
    saved = {"full": at2[0]["saved"]["full"], "shards": [r["saved"]["shard"] for r in at2]}
    return {1: run(1, saved), 2: at2, 4: run(4, saved)}


@functools.lru_cache(maxsize=None)
def _reference_run(partition_size, dtype):
    """Single process, float64, loops: per-step loss and zs gradient [V, G, D], and the FIFO ring."""
    fifo = FifoReference(_initial_memory())
    losses, grads = [], []
    for step in range(STEPS):
        zs, zt = (t.double() for t in _inputs(step, dtype))
        zs.requires_grad_()
        loss = massl_loss_reference(zs, zt, fifo.memory.double(), _perm(step), partition_size,
                                    STUDENT_TEMP, TEACHER_TEMP)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, zs)[0])
        fifo.enqueue(zt[1])
    return losses, grads, fifo


def _close(actual, expected, tol):
    """Relative closeness: rtol = tol, and atol = tol x the largest reference magnitude."""
    expected = expected.double()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def _check_against_reference(ranks, partition_size, dtype, tol):
    losses, grads, _ = _reference_run(partition_size, dtype)
    world = len(ranks)
    for rank, result in enumerate(ranks):
        for step in range(STEPS):
            _close(result["loss"][step], losses[step], tol)
            _close(result["grad"][step], grads[step][:, _rows(rank, world)], tol)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("partition_size", PARTITIONS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_sharded_loss_and_gradient_equal_single_process(runs, world, partition_size, dtype):
    """Every rank returns the global loss; its zs gradient is its rows' slice of the global one."""
    _check_against_reference([r["exact"][(partition_size, dtype)] for r in runs[world]], partition_size, dtype, TOL[dtype])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("partition_size", PARTITIONS)
def test_sharded_memory_holds_the_single_process_ring(runs, world, partition_size):
    ring = _reference_run(partition_size, torch.float64)[2]
    for rank, result in enumerate(runs[world]):
        state = result["exact"][(partition_size, torch.float64)]["state"]
        assert state["offset"] == rank * K // world and state["ptr"] == ring.ptr == STEPS * G % K
        assert torch.equal(state["bank"], ring.memory[:, _rows(rank, world, K)])


@pytest.mark.parametrize("world", WORLDS)
def test_partition_permutation_is_global(runs, world):
    """Drawn from (seed, step) alone: the same on every rank and world size, a fresh one each step."""
    for result in runs[world]:
        perms = result["exact"][(8, torch.float64)]["perm"]
        for step, perm in enumerate(perms):
            assert torch.equal(perm, runs[1][0]["exact"][(8, torch.float64)]["perm"][step])
            assert torch.equal(perm.sort().values, torch.arange(K))
        assert not torch.equal(perms[0], perms[1])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("partition_size", PARTITIONS)
@pytest.mark.parametrize("chunk_rows", CHUNK_ROWS)
def test_chunked_loss_equals_unchunked(runs, world, partition_size, chunk_rows):
    chunked = [r["chunked"][(partition_size, chunk_rows)] for r in runs[world]]
    _check_against_reference(chunked, partition_size, torch.float64, TOL[torch.float64])
    for result, whole in zip(chunked, (r["exact"][(partition_size, torch.float64)] for r in runs[world])):
        for step in range(STEPS):
            _close(result["loss"][step], whole["loss"][step], 1e-12)
            _close(result["grad"][step], whole["grad"][step], 1e-12)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("partition_size", PARTITIONS)
def test_replicated_mode_gives_the_same_loss_and_gradients(runs, world, partition_size):
    """`memory.sharded: false`: rank r's loss L_r is the mean over its own B rows, so with the
    global loss L = (1/W) sum_r L_r (equal local batches) the relations are
        mean_r L_r = L,   dL_r/dzs_r = W * dL/dzs_r  (= W x the sharded rank's gradient),
    and the engine's mean over ranks of parameter gradients equals dL/dtheta in both modes
    (train.py scales the sharded loss by W; see test_engine_mean_gradient_is_the_same)."""
    losses, grads, ring = _reference_run(partition_size, torch.float64)
    replicated = [r["replicated"][partition_size] for r in runs[world]]
    sharded = [r["exact"][(partition_size, torch.float64)] for r in runs[world]]
    for step in range(STEPS):
        _close(torch.stack([r["loss"][step] for r in replicated]).mean(), losses[step], 1e-10)
        for rank, (rep, sha) in enumerate(zip(replicated, sharded)):
            _close(rep["grad"][step] / world, grads[step][:, _rows(rank, world)], 1e-10)
            _close(rep["grad"][step] / world, sha["grad"][step], 1e-10)
    for rep in replicated:
        assert torch.equal(rep["state"]["bank"], ring.memory) and rep["state"]["ptr"] == ring.ptr


@pytest.mark.parametrize("world", WORLDS)
def test_engine_mean_gradient_is_the_same(runs, world):
    x_all, zt_all = _projection_inputs()
    proj = _projection_weight().requires_grad_()
    loss = massl_loss_reference(F.normalize(x_all @ proj, dim=-1), zt_all, _initial_memory().double(), _perm(0), 16,
                                STUDENT_TEMP, TEACHER_TEMP)
    expected = torch.autograd.grad(loss, proj)[0]
    for result in runs[world]:
        _close(result["engine_grad"][True], expected, 1e-10)
        _close(result["engine_grad"][False], expected, 1e-10)


@pytest.mark.parametrize("world", (1, 4))
def test_memory_checkpoint_from_two_ranks_loads_at_other_world_sizes(runs, world):
    """Saved at W=2 (the full ring, and each rank's shard with its offset), loaded at W=1 and W=4:
    the same global ring and pointer, and the next enqueue lands where a single process puts it."""
    ring = _reference_run(CKPT_PARTITION, torch.float64)[2]
    saved = runs[2][0]["saved"]
    assert torch.equal(saved["full"]["bank"], ring.memory) and saved["full"]["ptr"] == ring.ptr
    _, zt_all = _inputs(STEPS, torch.float64)
    ring = FifoReference(ring.memory)
    ring.ptr = STEPS * G % K
    ring.enqueue(zt_all[1])
    sources = ("full", "shard") if world > 1 else ("full",)
    for rank, result in enumerate(runs[world]):
        for source in sources:
            loaded = result["loaded"][source]
            assert torch.equal(loaded["full"]["bank"], ring.memory) and loaded["full"]["ptr"] == ring.ptr
            assert torch.equal(loaded["state"]["bank"], ring.memory[:, _rows(rank, world, K)])
    if world == 1:  # one W=2 shard does not cover all K slots: refuse rather than load half
        assert "does not cover" in runs[1][0]["loaded"]["shard"]


def _expected_collectives(world, views=4, batch=4, dim=8, n_parts=8, bytes_per_float=4):
    """docs/memory.md, 'Communication per step': payload bytes of each collective, in call order."""
    rows = world * batch  # G
    return [("all_gather", rows * views * dim * bytes_per_float),     # student embeddings (autograd)
            ("all_gather", rows * 2 * dim * bytes_per_float),         # teacher embeddings
            ("all_reduce", (views + 2) * rows * n_parts * bytes_per_float),  # per (row, partition) sums
            ("all_reduce", bytes_per_float),                          # the cross term, a scalar
            ("reduce_scatter", rows * views * dim * bytes_per_float),  # backward of the student gather
            ("all_gather", rows * dim * 4)]                           # enqueue: teacher view 1 keys, fp32


@pytest.mark.parametrize("world", (2, 4))
def test_collective_bytes_do_not_grow_with_memory_size(runs, world):
    """One step of the loss path at K = 4096 and K = 65536 with the same N = K/P = 8 partitions:
    the bytes scale with rows x N (and rows x D), never with K."""
    for result in runs[world]:
        assert result["bytes"][4096] == result["bytes"][65536] == _expected_collectives(world)


def _koleo_reference(x, eps=1e-8):
    """-mean_b log(||x_b - x_nn(b) + eps|| + eps) over unit rows, nearest neighbour by explicit search."""
    x = F.normalize(x.double(), dim=-1, eps=eps)
    total = 0.0
    for b in range(len(x)):
        nearest = max((c for c in range(len(x)) if c != b), key=lambda c: float(x[b].detach() @ x[c].detach()))
        total = total - torch.log((x[b] - x[nearest] + eps).norm() + eps)
    return total / len(x)


@pytest.mark.parametrize("world", WORLDS)
def test_koleo_over_ranks_equals_global_batch(runs, world):
    x = _koleo_inputs().double().requires_grad_()
    expected = _koleo_reference(x)
    grad = torch.autograd.grad(expected, x)[0]
    for rank, result in enumerate(runs[world]):
        value, local_grad = result["koleo"]
        _close(value, expected, 1e-5)
        _close(local_grad, grad[_rows(rank, world)], 1e-5)


def _agreement_reference(zs0, zt1, memory, perm, partition_size):
    slots = perm[:partition_size]
    student = zs0.double() @ memory.double()[:, slots]
    top = slots[student.topk(min(5, partition_size), dim=1).indices]
    best = slots[(zt1.double() @ memory.double()[:, slots]).argmax(dim=1)]
    return torch.stack([(top[:, 0] == best).double().mean(), (top == best[:, None]).any(1).double().mean()])


@pytest.mark.parametrize("world", WORLDS)
def test_partition_agreement_over_ranks_equals_global_batch(runs, world):
    zs0, zt1 = _agreement_inputs()
    for i, partition_size in enumerate(PARTITIONS):
        expected = _agreement_reference(zs0, zt1, _initial_memory(), _perm(0), partition_size)
        assert 0 < expected[0] < expected[1] < 1  # inputs that can tell top-1 from top-5 from all
        for result in runs[world]:
            assert torch.equal(result["agreement"][i].double(), expected)


@pytest.mark.parametrize("world", WORLDS)
def test_gather_gradient_with_non_contiguous_incoming_gradient(runs, world):
    """Two all-gather pitfalls: a non-contiguous gradient into the gather's backward, and the backward
    sums the ranks' partial gradients: no factor W too many or too few)."""
    x_all, weight = _gather_inputs()
    for rank, result in enumerate(runs[world]):
        value, grad, incoming_contiguous = result["gather"]
        assert world == 1 or not incoming_contiguous
        _close(value, (weight * x_all.T ** 2).sum(), 1e-12)
        _close(grad, (2 * weight.T * x_all)[_rows(rank, world)], 1e-12)


def test_second_backward_recomputes_the_scaled_exponentials():
    """The unchunked path turns its kept student exponentials into probabilities in place during
    the backward; a retained graph's second backward must still give the same gradient."""
    zs_all, zt_all = _inputs(0, torch.float64)
    zs = zs_all.clone().requires_grad_()
    loss = massl_loss(zs, zt_all, _initial_memory(), _perm(0), 8, STUDENT_TEMP, TEACHER_TEMP)
    first = torch.autograd.grad(loss, zs, retain_graph=True)[0]
    second = torch.autograd.grad(loss, zs)[0]
    _close(second, first, 1e-14)
    _close(first, _reference_run(8, torch.float64)[1][0], 1e-10)


def test_float32_at_the_lowest_temperature_with_peaked_logits():
    """Temperatures at the config floor (0.025) and rows equal to memory columns (logits at the
    bound |z|/t = 40): the stabiliser keeps every exponential a normal float32."""
    memory = _initial_memory()
    zs_all, zt_all = _inputs(0, torch.float64)
    zs_all[:, :4] = memory.T[:4].double()
    zt_all[:, :4] = -memory.T[:4].double()  # partitions far from the row: exponentials near exp(-80)
    loss = massl_loss(zs_all.float().requires_grad_(), zt_all.float(), memory, _perm(0), 8, 0.025, 0.025)
    expected = massl_loss_reference(zs_all, zt_all, memory.double(), _perm(0), 8, 0.025, 0.025)
    _close(loss, expected, 1e-5)
