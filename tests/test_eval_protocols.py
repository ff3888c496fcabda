"""Evaluation protocols against independent references: brute-force float64 k-NN and retrieval
written here, scikit-learn's logistic regression for low-shot, torch.optim.SGD for the probe sweep."""
import math

import pytest
import torch
import torch.nn.functional as F

from massl.eval.knn import knn_classify
from massl.eval.linear import sgd_probe_accuracy, train_sgd_probes
from massl.eval.lowshot import lowshot_accuracy, lowshot_draws
from massl.eval.retrieval import retrieval_metrics


def clustered(n: int, classes: int, dim: int, seed: int, spread: float = 1.0):
    """Random features around random class centres (unnormalised), and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_knn_matches_brute_force_for_every_k():
    train_x, train_y = clustered(90, 6, 8, 0, spread=3.0)
    test_x, test_y = clustered(37, 6, 8, 1, spread=3.0)
    ks, T = [1, 3, 10, 20, 200], 0.1
    got = knn_classify(train_x, train_y, test_x, test_y, ks, T, num_classes=6, chunk_elements=8 * 90)
    a = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    q = test_x.double() / test_x.double().norm(dim=1, keepdim=True)
    for k, result in zip(ks, got):
        kk = min(k, 90)
        hits1 = hits5 = 0
        for i in range(37):
            sims = sorted(((float(q[i] @ a[j]), j) for j in range(90)), reverse=True)[:kk]
            score = [0.0] * 6
            for s, j in sims:
                score[int(train_y[j])] += math.exp(s / T)
            ranked = sorted((c for c in range(6) if score[c] > 0), key=lambda c: -score[c])
            hits1 += ranked[0] == int(test_y[i])
            hits5 += int(test_y[i]) in ranked[:5]
        assert result["k"] == kk
        assert result["top1"] == pytest.approx(hits1 / 37, abs=1e-12)
        assert result["top5"] == pytest.approx(hits5 / 37, abs=1e-12)
    assert len({r["top1"] for r in got}) > 1  # the k really differ on these features


def test_retrieval_matches_brute_force():
    db_x, db_y = clustered(70, 5, 6, 2, spread=2.5)
    q_x, q_y = clustered(23, 6, 6, 3, spread=2.5)  # class 5 has no database image: such queries are left out
    got = retrieval_metrics(db_x, db_y, q_x, q_y, recall_ks=(1, 4, 10), chunk_elements=150)
    a = db_x.double() / db_x.double().norm(dim=1, keepdim=True)
    q = q_x.double() / q_x.double().norm(dim=1, keepdim=True)
    aps, recall, counted = [], {1: 0, 4: 0, 10: 0}, 0
    for i in range(23):
        ranked = [j for _, j in sorted(((float(q[i] @ a[j]), j) for j in range(70)), reverse=True)]
        rel = [int(db_y[j]) == int(q_y[i]) for j in ranked]
        if not any(rel):
            continue
        counted += 1
        found, precisions = 0, []
        for r, is_rel in enumerate(rel, start=1):
            if is_rel:
                found += 1
                precisions.append(found / r)
        aps.append(sum(precisions) / len(precisions))
        for k in recall:
            recall[k] += any(rel[:k])
    assert counted < 23 and got["n_queries"] == counted and got["n_queries_without_match"] == 23 - counted
    assert got["mAP"] == pytest.approx(sum(aps) / counted, abs=1e-12)
    for r in got["recall"]:
        assert r["recall"] == pytest.approx(recall[r["k"]] / counted, abs=1e-12)


def test_lowshot_draws():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 7)
    first = lowshot_draws(y, 3, shots=2, draws=4, seed=7)
    again = lowshot_draws(y, 3, shots=2, draws=4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for rows in first:
        assert len(set(rows.tolist())) == 6 and torch.bincount(y[rows], minlength=3).tolist() == [2, 2, 2]
    assert len({tuple(r.tolist()) for r in first}) > 1
    with pytest.raises(ValueError, match="class 1 has only 3"):
        lowshot_draws(y, 3, shots=4, draws=1)


def test_lowshot_matches_sklearn_and_nearest_mean_reference():
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = clustered(200, 4, 6, 4, spread=2.0)
    test_x, test_y = clustered(150, 4, 6, 5, spread=2.0)
    shots, draws, wd = (1, 3, 8), 3, 0.05
    got = lowshot_accuracy(train_x, train_y, test_x, test_y, 4, shots, draws, seed=11, weight_decay=wd)
    a = F.normalize(train_x.double(), dim=1).numpy()
    t = F.normalize(test_x.double(), dim=1).numpy()
    for n, result in zip(shots, got):
        ref_lr, ref_ncm = [], []
        for rows in lowshot_draws(train_y, 4, n, draws, seed=11):
            x, y = a[rows.numpy()], train_y[rows].numpy()
            # sklearn minimises C * sum(CE) + |W|^2 / 2; ours mean(CE) + wd * |W|^2
            clf = LogisticRegression(C=1.0 / (2 * wd * len(y)), tol=1e-12, max_iter=100000).fit(x, y)
            ref_lr.append(float((clf.predict(t) == test_y.numpy()).mean()))
            means = [x[y == c].mean(0) for c in range(4)]
            means = [m / (m ** 2).sum() ** 0.5 for m in means]
            pred = [max(range(4), key=lambda c: float(row @ means[c])) for row in t]
            ref_ncm.append(float((torch.tensor(pred) == test_y).double().mean()))
        assert result["logreg"]["top1"] == pytest.approx(ref_lr, abs=1e-12)
        assert result["ncm"]["top1"] == pytest.approx(ref_ncm, abs=1e-12)
        assert result["logreg"]["top1_mean"] == pytest.approx(sum(ref_lr) / draws)
        mean = sum(ref_lr) / draws
        assert result["logreg"]["top1_std"] == pytest.approx((sum((v - mean) ** 2 for v in ref_lr) / (draws - 1)) ** 0.5)


def test_sgd_probes_trained_at_once_equal_torch_sgd_one_at_a_time():
    """Each classifier of the sweep is the one torch.optim.SGD (momentum 0.9, cosine schedule,
    lr x batch / 256) trains alone from the same initial weights on the same batches."""
    x, y = clustered(50, 3, 5, 6, spread=2.0)
    lrs, epochs, batch, seed = [0.05, 0.5, 5.0], 3, 16, 9
    w, b = train_sgd_probes(x, y, 3, lrs, epochs, batch, seed)
    g = torch.Generator().manual_seed(seed)  # the documented draws: initial weights, then one order per epoch
    w0 = torch.randn(3, 5, generator=g) * 0.01
    orders = [torch.randperm(50, generator=g) for _ in range(epochs)]
    steps = epochs * math.ceil(50 / batch)
    for j, lr in enumerate(lrs):
        probe = torch.nn.Linear(5, 3)
        with torch.no_grad():
            probe.weight.copy_(w0)
            probe.bias.zero_()
        opt = torch.optim.SGD(probe.parameters(), lr=lr * batch / 256, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        for order in orders:
            for idx in order.split(batch):
                opt.zero_grad()
                F.cross_entropy(probe(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
        assert torch.allclose(w[j], probe.weight, atol=1e-5) and torch.allclose(b[j], probe.bias, atol=1e-5)
    assert not torch.allclose(w[0], w[2], atol=1e-3)


def test_sgd_probe_picks_the_best_heldout_lr():
    x, y = clustered(300, 4, 8, 7, spread=1.5)
    r = sgd_probe_accuracy(x[:200], y[:200], x[200:], y[200:], 4, lrs=[1e-6, 1.0], epochs=20, batch_size=32)
    assert [h["lr"] for h in r["heldout_top1"]] == [1e-6, 1.0]
    assert r["heldout_top1"][1]["top1"] > r["heldout_top1"][0]["top1"] and r["best_lr"] == 1.0
    assert r["n_fit"] + r["n_heldout"] == 200 and r["top1"] > 0.8
