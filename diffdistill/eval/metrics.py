"""Pure metrics on feature arrays (numpy or torch, ``(N, D)``); no models here."""

from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return (x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64))


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    f = _np(feats)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. The trace of the matrix square root is taken
    from the eigenvalues of the symmetric ``S1^(1/2) S2 S1^(1/2)``, which is stable for singular
    covariances (clean-fid uses scipy's ``sqrtm`` with a diagonal offset instead)."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(_np(v)) for v in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def prompt_accuracy(predicted, labels) -> float:
    p, y = _np(predicted), _np(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    return float((p == y).mean())


def per_class_accuracy(predicted, labels, num_classes: int) -> list[float | None]:
    """The accuracy within each true class ``0 .. num_classes - 1`` (None for a class with no samples)."""
    p, y = _np(predicted), _np(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    return [float((p[y == c] == c).mean()) if (y == c).any() else None for c in range(num_classes)]


def clip_score(image_emb, text_emb, scale: float = 1.0) -> float:
    """Mean cosine similarity of paired image and text embeddings (DMD2/GigaGAN report it; x100 optional)."""
    a, b = _np(image_emb), _np(text_emb)
    if a.shape != b.shape:
        raise ValueError(f"image {a.shape} and text {b.shape} embeddings must be paired row by row")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(scale * (a * b).sum(1).mean())


def diversity(feats, groups) -> float:
    """Mean pairwise L2 distance between unit-normalised features of images that share a prompt group,
    averaged over groups. A collapsed generator scores near 0."""
    f, g = _np(feats), _np(groups)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    scores = []
    for value in np.unique(g):
        x = f[g == value]
        if len(x) < 2:
            continue
        d = np.sqrt(np.clip(((x[:, None] - x[None]) ** 2).sum(-1), 0, None))
        scores.append(d.sum() / (len(x) * (len(x) - 1)))
    if not scores:
        raise ValueError("diversity needs at least one group with two or more images")
    return float(np.mean(scores))


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", eq. 4): the unbiased
    MMD^2 estimate with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
    ``num_subsets`` random subsets of ``m = min(N_a, N_b, subset_size)`` rows of each set.

    Subsets are drawn without replacement from ``np.random.RandomState(seed)``, ``b``'s before ``a``'s,
    the order clean-fid's ``kernel_distance(a, b)`` draws them from numpy's global state, so the two
    agree exactly after ``np.random.seed(seed)``."""
    a, b = _np(feats_a), _np(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kid needs (N, D) feature sets of equal D, got {a.shape} and {b.shape}")
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError(f"kid needs subsets of at least 2 rows, got m = {m} (shapes {a.shape}, {b.shape})")
    d = a.shape[1]
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        y = b[rng.choice(len(b), m, replace=False)]
        x = a[rng.choice(len(a), m, replace=False)]
        k_xx, k_yy, k_xy = ((u @ v.T / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        off_diag = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
        total += off_diag / (m * (m - 1)) - 2 * k_xy.sum() / m**2
    return float(total / num_subsets)


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(x), len(y))``."""
    sq = (x**2).sum(1)[:, None] + (y**2).sum(1)[None] - 2 * x @ y.T
    return np.sqrt(np.clip(sq, 0, None))


def _knn_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Distance from each row of ``x`` to its ``k``-th nearest other row (the row itself, at 0, is skipped)."""
    return np.concatenate([np.partition(_distances(x[i:i + chunk], x), k, axis=1)[:, k]
                           for i in range(0, len(x), chunk)])


def _inside_manifold(query: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """Whether each query row lies in at least one ball ``B(support_j, radii_j)``."""
    return np.concatenate([(_distances(query[i:i + chunk], support) <= radii[None]).any(1)
                           for i in range(0, len(query), chunk)])


def precision_recall(real, fake, k: int = 3, chunk: int = 512) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
    for Assessing Generative Models", eqs. 1-3). Each set's manifold is the union of balls around its
    points with radius the distance to the point's ``k``-th nearest neighbour in the same set.
    Precision: the fraction of fake points inside the real manifold (fidelity). Recall: the fraction of
    real points inside the fake manifold (coverage). Returns ``{"precision": p, "recall": r}``."""
    r, f = _np(real), _np(fake)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) feature sets of equal D, got {r.shape} and {f.shape}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"each set needs more than k = {k} points, got {len(r)} real and {len(f)} fake")
    radii_real, radii_fake = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    return {"precision": float(_inside_manifold(f, r, radii_real, chunk).mean()),
            "recall": float(_inside_manifold(r, f, radii_fake, chunk).mean())}
