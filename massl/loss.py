"""MaSSL objective (method.md, steps 3-6), exact when the memory is sharded across ranks.

For student view i, teacher view j != i, partition n and sample b, with slots k in partition n:
    CE = -sum_k softmax(lt[j,b])_k * log_softmax(ls[i,b])_k
       = logZs[i,b,n] - sum_k pt[j,b,k] * ls[i,b,k]          (the target sums to 1 over n)
so the loss needs, per (row, partition), only the log-normaliser logZ = log sum_k exp(l_k), and
otherwise sums of per-slot terms. Both split over any set of slots: each rank sums over the slots
it owns, one all-reduce combines the per-(row, partition) sums, one more the scalar. No rank
holds the logits of slots it does not own, and the bytes moved depend on rows x partitions,
never on the memory size K.

Stabiliser: embeddings and memory columns are unit vectors, so |l| <= |z| / t. Subtracting the
per-row bound |z| / t (known on every rank without communication) keeps exp() in
[exp(-2|z|/t), 1]; config validation keeps temperatures >= 0.025 (exp(-80) = 1.8e-35 is still a normal fp32).

Gradient w.r.t. the logits of student view i: c_i * softmax_s - (sum of the targets of the
teacher views j != i), c_i = number of such j; each rank computes its part on its own slots,
already multiplied by the memory (so in embedding space, [rows, D]), and the all-gather's
backward sums the ranks' parts (dist.py).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist import gather_rows, gather_rows_with_grad, sum_partials, world_of


def random_partition_perm(size: int, seed: int, step: int, device: torch.device) -> torch.Tensor:
    """The step's permutation of the K slots: the same on every rank, drawn on `device`, no host sync."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return torch.randperm(size, generator=g, device=device)


def slot_partitions(perm: torch.Tensor, partition_size: int) -> torch.Tensor:
    """Partition index of every slot: part[perm[n*P + q]] = n; slots left over when P does not divide K get N."""
    size = perm.numel()
    n_parts = size // partition_size
    used = n_parts * partition_size
    part = torch.full((size,), n_parts, dtype=torch.long, device=perm.device)
    part[perm[:used]] = torch.arange(used, device=perm.device) // partition_size
    return part


def _view_weights(n_views: int, like: torch.Tensor) -> torch.Tensor:
    """c_i: the number of teacher views j in {0, 1} paired with student view i (j != i)."""
    c = torch.full((n_views,), 2.0, dtype=like.dtype, device=like.device)
    c[:2] = 1.0
    return c


def _exp_logits(z: torch.Tensor, memory: torch.Tensor, temp: float) -> torch.Tensor:
    """exp(l - |z|/t) for the logits l = z.m/t of rows z [R, g, D] against slots memory [D, Kl];
    one [R, g, Kl] buffer, stabilised in place (module docstring). One [R*g, D] x [D, Kl] product:
    a batched product over the R row blocks would stream the memory R times (slow for small g)."""
    logits = (z.reshape(-1, z.shape[-1]) @ memory).view(*z.shape[:-1], -1)
    return logits.sub_(z.norm(dim=-1, keepdim=True)).mul_(1.0 / temp).exp_()


def _scale_by_partition_(e: torch.Tensor, inv: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """e[r, b, k] *= inv[r, b, part[k]] in place: exponentials to probabilities. Row block by row
    block, so the gathered factors never take more than one [g, Kl] temporary."""
    for r in range(e.shape[0]):
        e[r].mul_(inv[r].index_select(-1, part))
    return e


class _PartitionCrossEntropy(torch.autograd.Function):
    """Sum over view pairs, partitions and samples of the partition cross-entropy (not yet averaged).

    zs_all [V, G, D], zt_all [2, G, D]: the global batch's embeddings; memory [D, Kl]: this rank's
    slots; part [Kl]: their partition ids (n_parts = unused). `chunk` samples are processed at a time.
    The cross term sum_k pt[j,b,k] ls[i,b,k] = zs[i,b].q[j,b] / t_s goes through the teacher targets
    pulled back to embedding space, q[j,b] = sum_k pt[j,b,k] m_k (this rank's slots), so the only
    [rows, Kl] buffer kept for the backward is the student's exponentials when there is one chunk;
    with several, the backward recomputes them chunk by chunk.
    """

    @staticmethod
    def forward(ctx: Any, zs_all: torch.Tensor, zt_all: torch.Tensor, memory: torch.Tensor, part: torch.Tensor,
                n_parts: int, student_temp: float, teacher_temp: float, group: Optional[dist.ProcessGroup],
                chunk: int) -> torch.Tensor:
        V, G, D = zs_all.shape
        onehot = torch.zeros(part.numel(), n_parts + 1, dtype=memory.dtype, device=memory.device)
        onehot.scatter_(1, part[:, None], 1.0)
        onehot = onehot[:, :n_parts]
        chunks = [slice(a, min(a + chunk, G)) for a in range(0, G, chunk)]
        one_pass = len(chunks) == 1

        # Per (row, partition) sums of exp(l - bound) over this rank's slots, then over all ranks.
        sums_s, sums_t = zs_all.new_empty(V, G, n_parts), zs_all.new_empty(2, G, n_parts)
        for sl in chunks:
            es = _exp_logits(zs_all[:, sl], memory, student_temp)
            sums_s[:, sl] = es @ onehot
            et = _exp_logits(zt_all[:, sl], memory, teacher_temp)
            sums_t[:, sl] = et @ onehot
            kept = (es, et) if one_pass else None
            del es, et  # release a chunk's buffers before the next chunk allocates its own
        sums = torch.cat([sums_s.flatten(), sums_t.flatten()])
        if group is not None:
            dist.all_reduce(sums, group=group)
        sums_s, sums_t = sums[: sums_s.numel()].view_as(sums_s), sums[sums_s.numel():].view_as(sums_t)
        # 1/sum per slot's partition, 0 for unused slots, so probabilities are e * inv[part].
        pad = sums.new_zeros(1)
        inv_s = torch.cat([sums_s.reciprocal(), pad.expand(V, G, 1)], -1)
        inv_t = torch.cat([sums_t.reciprocal(), pad.expand(2, G, 1)], -1)

        q = zt_all.new_empty(2, G, D)
        for sl in chunks:
            pt = kept[1] if kept is not None else _exp_logits(zt_all[:, sl], memory, teacher_temp)
            q[:, sl] = _scale_by_partition_(pt, inv_t[:, sl], part) @ memory.T
            del pt
        student_exp = kept[0] if kept is not None and ctx.needs_input_grad[0] else None  # kept for the backward
        del kept
        cross = ((zs_all * (q[0] + q[1])).sum() - (zs_all[:2] * q).sum()) / student_temp
        if group is not None:
            dist.all_reduce(cross, group=group)

        bound_s = zs_all.norm(dim=-1) / student_temp  # [V, G]
        logz_s = bound_s[..., None] + sums_s.log()  # [V, G, N]
        weights = _view_weights(V, zs_all)
        total: torch.Tensor = (weights * logz_s.sum((1, 2))).sum() - cross

        ctx.save_for_backward(zs_all, memory, part, inv_s, q)
        ctx.chunks, ctx.student_temp, ctx.student_exp = chunks, student_temp, student_exp
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        zs_all, memory, part, inv_s, q = ctx.saved_tensors
        grad_zs = torch.empty_like(zs_all)
        for sl in ctx.chunks:
            es = ctx.student_exp if ctx.student_exp is not None else _exp_logits(zs_all[:, sl], memory, ctx.student_temp)
            ctx.student_exp = None  # scaled in place below: a second backward recomputes it
            grad_zs[:, sl] = _scale_by_partition_(es, inv_s[:, sl], part) @ memory.T
            del es
        # d total / d zs_i = (c_i sum_k ps_i,k m_k - sum_{j != i} q_j) / t_s on this rank's slots;
        # the all-gather's backward sums the ranks' parts.
        grad_zs.mul_(_view_weights(zs_all.shape[0], zs_all)[:, None, None]).sub_(q[0] + q[1])
        grad_zs[:2] += q
        return grad_zs * (grad_total / ctx.student_temp), None, None, None, None, None, None, None, None


def massl_loss(
    zs: torch.Tensor,
    zt: torch.Tensor,
    memory: torch.Tensor,
    perm: torch.Tensor,
    partition_size: int,
    student_temp: float,
    teacher_temp: float,
    group: Optional[dist.ProcessGroup] = None,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """The MaSSL loss of method.md, averaged over partitions and the global batch, then over pairs.

    zs [V, B, D] student and zt [2, B, D] teacher embeddings of this rank (L2-normalised);
    memory [D, K/W] this rank's contiguous slots (all K when `group` is None); perm the global
    permutation of the K slots. Returns the same value on every rank; the gradient reaching the
    local `zs` is its slice of the single-process gradient. No gradient reaches zt or memory.
    chunk_rows > 0 bounds the logits held at once to about chunk_rows x K/W (recomputed in backward).
    """
    V, B, D = zs.shape
    if V < 2 or zt.shape != (2, B, D):
        raise ValueError(f"massl_loss: expected zs [V>=2, B, D] and zt [2, B, D], got {tuple(zs.shape)} and {tuple(zt.shape)}")
    rank, world = world_of(group)
    size, local = perm.numel(), memory.shape[1]
    if local * world != size or memory.shape[0] != D:
        raise ValueError(f"massl_loss: memory shard {tuple(memory.shape)} does not match D={D}, K={size}, world={world}")
    if not 1 <= partition_size <= size:
        raise ValueError(f"massl_loss: partition_size {partition_size} must be in [1, K={size}]")
    dtype = torch.float64 if zs.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type="cuda" if zs.is_cuda else "cpu", enabled=False):  # (or meta: FLOP counts)
        zs, zt, memory = zs.to(dtype), zt.detach().to(dtype), memory.detach().to(dtype)
        # Gather [B, V*D] rows (contiguous), then view as [V, G, D]: global batch in rank-major order.
        zs_all = gather_rows_with_grad(zs.transpose(0, 1).reshape(B, V * D), group).view(-1, V, D).transpose(0, 1)
        zt_all = gather_rows(zt.transpose(0, 1).reshape(B, 2 * D), group).view(-1, 2, D).transpose(0, 1)
        n_parts = size // partition_size
        part = slot_partitions(perm, partition_size)[rank * local:(rank + 1) * local]
        global_batch = zs_all.shape[1]
        chunk = max(1, chunk_rows // V) if chunk_rows > 0 else global_batch
        total: torch.Tensor = _PartitionCrossEntropy.apply(
            zs_all, zt_all, memory, part, n_parts, student_temp, teacher_temp, group, chunk)
        return total / (n_parts * global_batch * (2 * V - 2))


def koleo_loss(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser: -mean_b log(distance of x_b to its nearest neighbour among the rows of `group`).

    x [B, D] are this rank's rows. group None: this rank's batch alone (the published code,
    loss.koleo_scope=local). With a group, neighbours come from the global batch: each rank sums
    the terms of its own rows and the all-reduce gives every rank the global value (gradients
    stay per-rank partials, see dist.py).
    """
    rank, _ = world_of(group)
    x = F.normalize(x.float(), dim=-1, eps=eps)
    x_all = gather_rows_with_grad(x, group)
    own = x_all[rank * x.shape[0]:(rank + 1) * x.shape[0]]
    with torch.no_grad():
        sims = own @ x_all.T
        sims[torch.arange(own.shape[0]), rank * x.shape[0] + torch.arange(own.shape[0])] = -2.0
        nearest = sims.argmax(dim=1)
    dists = F.pairwise_distance(own, x_all[nearest], eps=eps)
    return sum_partials(-torch.log(dists + eps).sum() / x_all.shape[0], group)


@torch.no_grad()
def partition_agreement(zs0: torch.Tensor, zt1: torch.Tensor, memory: torch.Tensor, perm: torch.Tensor,
                        partition_size: int, group: Optional[dist.ProcessGroup] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Monitoring (method.md): top-1/top-5 agreement of the student's partition-0 prediction for
    view 0 with the teacher's argmax for view 1, over the global batch. Returns device scalars."""
    rank, world = world_of(group)
    local = memory.shape[1]
    zs0, zt1, memory = gather_rows(zs0.float(), group), gather_rows(zt1.float(), group), memory.float()
    in_part0 = slot_partitions(perm, partition_size)[rank * local:(rank + 1) * local] == 0
    mask = torch.where(in_part0, 0.0, float("-inf"))
    k = min(5, partition_size, local)
    s_val, s_idx = (zs0 @ memory + mask).topk(k, dim=1)
    t_val, t_idx = (zt1 @ memory + mask).topk(1, dim=1)
    s_val, s_idx, t_val, t_idx = (gather_rows(t.T.contiguous(), group) for t in (s_val, s_idx + rank * local, t_val, t_idx + rank * local))
    # [world * k, G] candidates -> global top-k per sample
    s_idx = s_idx.gather(0, s_val.topk(min(5, partition_size), dim=0).indices)
    t_idx = t_idx.gather(0, t_val.argmax(dim=0, keepdim=True))[0]
    top1 = (s_idx[0] == t_idx).float().mean()
    top5 = (s_idx == t_idx[None]).any(0).float().mean()
    return top1, top5
