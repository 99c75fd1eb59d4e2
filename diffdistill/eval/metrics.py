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
