"""OOD scores and metrics on synthetic inputs with known answers, against brute force and sklearn."""
from __future__ import annotations

import math

import pytest
import torch

from colaflow.studies.ood import Mahalanobis, auroc, energy, fpr_at_95, msp
from colaflow.studies.tasks.intents import INTENTS, OOD_INTENTS, make_intents


def brute_auroc(a: list[float], b: list[float]) -> float:
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / (len(a) * len(b))


def brute_fpr(a: list[float], b: list[float], tpr: float = 0.95) -> float:
    """The smallest FPR over every threshold (each distinct score) whose TPR is at least `tpr`."""
    best = 1.0
    for t in sorted(set(a + b)):
        if sum(x >= t for x in a) / len(a) >= tpr:
            best = min(best, sum(y >= t for y in b) / len(b))
    return best


def test_metrics_known_answers():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0  # perfectly separated
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0, 1.0]) == 0.5  # all tied
    assert auroc([1.0, 3.0], [2.0]) == 0.5
    assert fpr_at_95(torch.arange(100.0) + 100, torch.arange(100.0)) == 0.0
    # 100 ID scores 1..100: keeping 95 of them puts the threshold at 6; OOD 0..9 has 4 scores >= 6
    assert fpr_at_95(torch.arange(1.0, 101.0), torch.arange(10.0)) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="OOD"):
        auroc([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        fpr_at_95([1.0, float("nan")], [0.0])


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_brute_force_and_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(57, generator=g) + 1).round(decimals=1)  # rounded: many ties
    b = torch.randn(41, generator=g).round(decimals=1)
    assert auroc(a, b) == pytest.approx(brute_auroc(a.tolist(), b.tolist()), abs=1e-12)
    assert fpr_at_95(a, b) == pytest.approx(brute_fpr(a.tolist(), b.tolist()), abs=1e-12)
    try:
        from sklearn.metrics import roc_auc_score, roc_curve
    except ImportError:
        return
    y = [1] * len(a) + [0] * len(b)
    s = torch.cat([a, b]).tolist()
    assert auroc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr_at_95(a, b) == pytest.approx(min(f for f, t in zip(fpr, tpr) if t >= 0.95), abs=1e-12)


def test_msp_and_energy():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert msp(logits)[1] == pytest.approx(1 / 3)
    assert msp(logits)[0] == pytest.approx(1 / (1 + 2 * math.exp(-10)))
    assert energy(logits)[1] == pytest.approx(1 + math.log(3))
    assert energy(logits + 5).sub(energy(logits)).tolist() == pytest.approx([5.0, 5.0])  # shift-equivariant


def test_mahalanobis_recovers_the_gaussians():
    """Two classes with a known shared covariance: the fitted score is minus the true squared distance,
    and points far from both means score lowest."""
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    chol = torch.linalg.cholesky(cov)
    means = torch.tensor([[0.0, 0.0], [6.0, 3.0]])
    labels = torch.arange(20000) % 2
    x = means[labels] + torch.randn(20000, 2, generator=g) @ chol.T
    maha = Mahalanobis.fit(x, labels)
    assert torch.allclose(maha.means.float(), means, atol=0.05)
    probe = torch.tensor([[1.0, 1.0], [6.0, 2.0]])
    d = probe - means[[0, 1]]
    want = -torch.einsum("bh,hk,bk->b", d, torch.linalg.inv(cov), d)
    assert torch.allclose(maha(probe).float(), want, rtol=0.03)
    ood = torch.tensor([[-10.0, 10.0]])
    assert maha(ood) < maha(x[:100]).min()
    with pytest.raises(ValueError, match=r"classes \[1\] have no training features"):
        Mahalanobis.fit(x[labels == 0][:10], torch.tensor([0] * 9 + [2]))


def test_intents_are_deterministic_and_disjoint():
    data = make_intents(seed=0)
    assert make_intents(seed=0) == data and make_intents(seed=1).train != data.train
    assert len(data.intents) == len(INTENTS) - len(OOD_INTENTS) and not set(data.intents) & set(OOD_INTENTS)
    assert len(data.train) == 32 * len(data.intents) and len(data.test) == 16 * len(data.intents)
    assert {label for _, label in data.train} == set(range(len(data.intents)))
    assert not {u for u, _ in data.train} & {u for u, _ in data.test}  # held-out phrasings
    train_words = {w for u, _ in data.train for w in u.split()}
    assert any(w not in train_words for u in data.ood for w in u.split())  # OOD brings words never trained on

    with pytest.raises(ValueError, match="unknown `ood_intents`"):
        make_intents(ood_intents=("smalltalk",))
