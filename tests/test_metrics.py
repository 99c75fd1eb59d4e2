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


def test_fid_equals_clean_fid_fid_from_feats():
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 12))
    b = rng.standard_t(df=5, size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.5 - 0.2
    ref = fid_from_feats(a, b)
    assert ref > 1.0  # a non-trivial distance, so the relative tolerance is meaningful
    assert metrics.fid(a, b) == pytest.approx(ref, rel=1e-6)


def _kid_sets(seed=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(120, 16)), rng.normal(size=(90, 16)) * 1.3 + 0.4


def test_kid_equals_clean_fid_kernel_distance_on_whole_sets():
    from cleanfid.fid import kernel_distance

    a, b = _kid_sets()
    a = a[:90]  # equal sizes: one subset of m = N rows is the whole of each set, whatever the RNG
    ref = kernel_distance(a, b, num_subsets=1, max_subset_size=90)
    assert ref > 0.01
    assert metrics.kid(a, b, num_subsets=1, subset_size=90) == pytest.approx(ref, rel=1e-6)


def test_kid_replicates_clean_fid_subsets():
    from cleanfid.fid import kernel_distance

    a, b = _kid_sets()
    np.random.seed(7)
    ref = kernel_distance(a, b, num_subsets=10, max_subset_size=40)
    ours = metrics.kid(a, b, num_subsets=10, subset_size=40, seed=7)
    assert ours == pytest.approx(ref, rel=1e-6)
    # another seed takes other subsets and gives another value
    assert metrics.kid(a, b, num_subsets=10, subset_size=40, seed=8) != pytest.approx(ref, rel=1e-6)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = metrics.kid(a, b, num_subsets=20, subset_size=200)
    shifted = metrics.kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 0.01 < shifted  # unbiased: can dip below 0, centred on 0
    with pytest.raises(ValueError, match="equal D"):
        metrics.kid(a, b[:, :4])


def _naive_precision_recall(real, fake, k):
    def radii(x):
        return np.array([sorted(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def inside(q, s, rad):
        return np.mean([any(np.linalg.norm(p - s[j]) <= rad[j] for j in range(len(s))) for p in q])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_hand_made_cases():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 4))
    assert metrics.precision_recall(real, real.copy(), k=3) == {"precision": 1.0, "recall": 1.0}
    far = rng.normal(size=(150, 4)) + 100.0
    assert metrics.precision_recall(real, far, k=3) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(6)
    centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], dtype=float)
    real = np.concatenate([c + rng.normal(size=(300, 2)) for c in centres])
    fake = np.concatenate([c + rng.normal(size=(600, 2)) for c in centres[:2]])  # two of four modes
    pr = metrics.precision_recall(real, fake, k=3, chunk=257)  # several chunks
    assert pr["recall"] == pytest.approx(0.5, abs=0.03)
    assert pr["precision"] > 0.95  # what it does generate is realistic


def test_precision_recall_matches_a_naive_loop():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(60, 3)), rng.normal(size=(50, 3)) * 1.5 + 0.3
    p, r = _naive_precision_recall(real, fake, k=2)
    assert 0 < p < 1 and 0 < r < 1
    assert metrics.precision_recall(real, fake, k=2, chunk=7) == {"precision": pytest.approx(p),
                                                                  "recall": pytest.approx(r)}
