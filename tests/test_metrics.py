"""Pure metrics against references: clean-fid's frechet_distance, hand-computed values."""

import numpy as np
import pytest
from cleanfid.fid import frechet_distance as cleanfid_frechet

from diffdistill.eval import metrics


def test_fid_agrees_with_clean_fid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    mu_a, s_a = metrics.gaussian_stats(a)
    mu_b, s_b = metrics.gaussian_stats(b)
    ref = cleanfid_frechet(mu_a, s_a, mu_b, s_b)
    assert metrics.fid(a, b) == pytest.approx(ref, rel=1e-6)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 4))
    assert metrics.fid(a, a + np.array([1.0, 0, 0, 2.0])) == pytest.approx(5.0, rel=1e-6)


def test_clip_score_accuracy_diversity():
    img = np.array([[1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert metrics.clip_score(img, txt) == pytest.approx((np.sqrt(0.5) + 1.0) / 2)
    assert metrics.clip_score(img, txt, scale=100) == pytest.approx(50 * (np.sqrt(0.5) + 1.0))
    assert metrics.prompt_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    # group 0: two orthogonal unit vectors (distance sqrt 2); group 1: identical (0)
    assert metrics.diversity(feats, [0, 0, 1, 1]) == pytest.approx(np.sqrt(2) / 2)
    with pytest.raises(ValueError, match="paired row by row"):
        metrics.clip_score(img, txt[:1])
