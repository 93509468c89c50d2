"""Metric math on feature arrays (rows are samples). No models here: see backbones.py."""

import numpy as np
from cleanfid.fid import fid_from_feats, kernel_distance
from scipy.special import log_softmax, logsumexp


def as_feature_matrix(features: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, dims) array, got shape {features.shape}")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {features.shape[0]}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} contains NaN or inf")
    return features


def as_feature_pair(
    feats_a: np.ndarray, feats_b: np.ndarray, min_rows: int, names: tuple[str, str] = ("feats_a", "feats_b")
) -> tuple[np.ndarray, np.ndarray]:
    feats_a = as_feature_matrix(feats_a, names[0], min_rows)
    feats_b = as_feature_matrix(feats_b, names[1], min_rows)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: {names[0]} has {feats_a.shape[1]}, {names[1]} has {feats_b.shape[1]}")
    return feats_a, feats_b


def unit_rows(embeddings: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} has an all-zero row: cosine is undefined")
    return embeddings / norms


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets (clean-fid)."""
    feats_a, feats_b = as_feature_pair(feats_a, feats_b, min_rows=2)
    return float(fid_from_feats(feats_a, feats_b))


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    seed: int = 0,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
) -> float:
    """clean-fid's subset-averaged unbiased MMD^2 (cubic polynomial kernel), reproducible via `seed`."""
    feats_a, feats_b = as_feature_pair(feats_a, feats_b, min_rows=2)
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and max_subset_size >= 2, got {num_subsets}, {max_subset_size}")
    # kernel_distance draws its subsets from numpy's global RNG: seed it, then put the caller's state back
    caller_rng_state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(feats_a, feats_b, num_subsets=num_subsets, max_subset_size=max_subset_size)
    finally:
        np.random.set_state(caller_rng_state)


def kid_unbiased(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Unbiased MMD^2 over all samples with k(x, y) = (x.y / d + 1)^3: the reference KID, no subsets."""
    feats_a, feats_b = as_feature_pair(feats_a, feats_b, min_rows=2)
    n_a, n_b, dim = feats_a.shape[0], feats_b.shape[0], feats_a.shape[1]
    k_aa = (feats_a @ feats_a.T / dim + 1) ** 3
    k_bb = (feats_b @ feats_b.T / dim + 1) ** 3
    k_ab = (feats_a @ feats_b.T / dim + 1) ** 3
    # unbiased: within-set sums leave out the diagonal k(x, x)
    mean_aa = (k_aa.sum() - np.trace(k_aa)) / (n_a * (n_a - 1))
    mean_bb = (k_bb.sum() - np.trace(k_bb)) / (n_b * (n_b - 1))
    return float(mean_aa + mean_bb - 2 * k_ab.mean())


def image_text_cosines(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Cosine between image i and its prompt i, one per image."""
    image_emb, text_emb = as_feature_pair(image_emb, text_emb, min_rows=1, names=("image_emb", "text_emb"))
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"need one text per image, got {image_emb.shape[0]} images and {text_emb.shape[0]} texts")
    return np.sum(unit_rows(image_emb, "image_emb") * unit_rows(text_emb, "text_emb"), axis=1)


def style_cosines(gen_emb: np.ndarray, ref_emb: np.ndarray) -> np.ndarray:
    """Mean cosine of each generated image to the reference images, one per generated image."""
    gen_emb, ref_emb = as_feature_pair(gen_emb, ref_emb, min_rows=1, names=("gen_emb", "ref_emb"))
    cosines = unit_rows(gen_emb, "gen_emb") @ unit_rows(ref_emb, "ref_emb").T  # (n_gen, n_ref)
    return cosines.mean(axis=1)


def set_consistency(emb: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per image: its mean cosine to the other images of its set (StyleAligned's pairwise DINO similarity).

    The mean of the returned values is the mean over all within-set pairs when sets have equal sizes.
    An image alone in its set gets NaN.
    """
    unit = unit_rows(emb, "emb")
    groups = np.asarray(groups)
    cosines = unit @ unit.T
    same_set = (groups[:, None] == groups[None, :]) & ~np.eye(len(unit), dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(same_set, cosines, 0).sum(axis=1) / same_set.sum(axis=1)


def inception_score_of_log_probs(log_probs: np.ndarray) -> float:
    """exp(mean over images of KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over these images (in logs throughout: a
    class no image gives any probability leaves no log(0))."""
    log_marginal = logsumexp(log_probs, axis=0) - np.log(len(log_probs))
    return float(np.exp(np.mean(np.sum(np.exp(log_probs) * (log_probs - log_marginal), axis=1))))


def inception_score(logits: np.ndarray) -> float:
    """The Inception Score (Salimans et al. 2016) of images with these class logits (rows), as one split: p(y|x) is
    the softmax of a row. The usual 10 splits of 5,000 images would leave a handful of images per split here, whose
    p(y) says little; one split over all images is compared at equal image counts only."""
    logits = as_feature_matrix(logits, "logits", min_rows=1)
    return inception_score_of_log_probs(log_softmax(logits, axis=1))


def inception_score_bootstrap(logits: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The Inception Score of each resample logits[indices[r]] (its p(y) from the resample's images)."""
    log_probs = log_softmax(as_feature_matrix(logits, "logits", min_rows=1), axis=1)
    return np.array([inception_score_of_log_probs(log_probs[idx]) for idx in indices])


# ----------------------------------------------------------------------------- bootstrap over images


def bootstrap_indices(n: int, seed: int, resamples: int = 200) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement: the same draws for every metric of one model."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval; NaN values (degenerate resamples) are left out."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def kid_bootstrap(feats_a: np.ndarray, feats_b: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Unbiased KID (as `kid_unbiased`) of each resample feats_a[indices[r]] against all of feats_b.

    A resample repeats images; pairs of copies of one image are left out of the within-set mean like the
    diagonal is, else k(x, x) would inflate it. A resample of a single distinct image gives NaN.
    """
    feats_a, feats_b = as_feature_pair(feats_a, feats_b, min_rows=2)
    dim, n_b = feats_a.shape[1], feats_b.shape[0]
    k_aa = (feats_a @ feats_a.T / dim + 1) ** 3
    k_bb = (feats_b @ feats_b.T / dim + 1) ** 3
    mean_bb = (k_bb.sum() - np.trace(k_bb)) / (n_b * (n_b - 1))
    mean_ab_per_image = ((feats_a @ feats_b.T / dim + 1) ** 3).mean(axis=1)
    values = np.empty(len(indices))
    for r, idx in enumerate(indices):
        distinct_pairs = idx[:, None] != idx[None, :]
        pair_count = distinct_pairs.sum()
        mean_aa = k_aa[np.ix_(idx, idx)][distinct_pairs].sum() / pair_count if pair_count else np.nan
        values[r] = mean_aa + mean_bb - 2 * mean_ab_per_image[idx].mean()
    return values
