"""OOD-detection scores and metrics (higher score = more in-distribution).

Scores, from a classifier's logits (B, C) or its penultimate features (B, H):

- `msp`: maximum softmax probability (Hendrycks & Gimpel, 2017).
- `energy`: the negative free energy, `T * logsumexp(logits / T)`, T = 1 (Liu et al., 2020).
- `Mahalanobis`: class-conditional Gaussians with one shared covariance fitted on the
  in-distribution training features; the score is minus the smallest squared Mahalanobis distance
  to a class mean (Lee et al., 2018, without input preprocessing or feature ensembles).

Metrics, with in-distribution as the positive class:

- `auroc`: the probability that a random ID example scores above a random OOD one (ties count 1/2).
- `fpr_at_95`: the fraction of OOD examples scored at or above the threshold that keeps 95% of the
  ID examples (FPR at 95% TPR; lower is better).

    maha = Mahalanobis.fit(train_features, train_labels)
    auroc(msp(id_logits), msp(ood_logits)), fpr_at_95(maha(id_feats), maha(ood_feats))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability per row: (B, C) -> (B,)."""
    return logits.double().softmax(-1).amax(-1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy per row, T * logsumexp(logits / T): (B, C) -> (B,)."""
    return temperature * torch.logsumexp(logits.double() / temperature, dim=-1)


@dataclass
class Mahalanobis:
    """Class means and the inverse of the shared (tied) covariance, fitted on ID training features."""

    means: torch.Tensor  # (C, H)
    precision: torch.Tensor  # (H, H)

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4) -> Mahalanobis:
        """Fit on (N, H) features with (N,) class ids; `ridge` (relative to the mean variance) keeps
        the covariance invertible when N is small against H."""
        x = features.double()
        classes = int(labels.max()) + 1
        missing = [c for c in range(classes) if not bool((labels == c).any())]
        if missing:
            raise ValueError(f"Mahalanobis.fit: classes {missing} have no training features")
        means = torch.stack([x[labels == c].mean(0) for c in range(classes)])  # (C, H)
        centred = x - means[labels]  # (N, H)
        cov = centred.T @ centred / len(x)  # (H, H)
        cov += ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), dtype=cov.dtype)
        return cls(means, torch.linalg.inv(cov))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """-min_c (x - mu_c)^T S^-1 (x - mu_c) per row: (B, H) -> (B,)."""
        d = features.double()[:, None, :] - self.means[None]  # (B, C, H)
        dist = torch.einsum("bch,hk,bck->bc", d, self.precision, d)  # (B, C)
        return -dist.amin(-1)


def _check(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(id_scores).double().flatten(), torch.as_tensor(ood_scores).double().flatten()
    if not len(a) or not len(b):
        raise ValueError(f"need ID and OOD scores, got {len(a)} ID and {len(b)} OOD")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("scores hold NaN or Inf")
    return a, b


def auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """Area under the ROC curve, ID positive: the Mann-Whitney U statistic with tied ranks averaged."""
    a, b = _check(id_scores, ood_scores)
    both = torch.cat([a, b])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=both.dtype)
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    sums = torch.zeros_like(values).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]  # tied scores share their mean rank
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def fpr_at_95(id_scores: torch.Tensor, ood_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate is at least `tpr`."""
    a, b = _check(id_scores, ood_scores)
    k = math.ceil(tpr * len(a) - 1e-9)  # ID examples that must be kept
    threshold = a.sort(descending=True).values[k - 1]
    return float((b >= threshold).double().mean())
