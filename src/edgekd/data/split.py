"""The seeded, class-stratified train/val/test split that assigns whole duplicate groups."""

from __future__ import annotations

import numpy as np

from edgekd.data.prepared import SPLITS


def split_groups(labels: np.ndarray, groups: np.ndarray, fractions: dict[str, float],
                 seed: int) -> np.ndarray:
    """Split index per image (order of SPLITS), stratified by class, whole groups at a time.

    Groups are visited in a seeded random order, biggest first, and each goes to the split whose
    quota for the group's majority class is relatively least filled, so big groups spread over
    all splits; with singleton groups this is an exact per-class stratified split.
    """
    n_classes = int(labels.max()) + 1
    per_class = np.bincount(labels, minlength=n_classes)
    target = np.array([[fractions[s] * c for c in per_class] for s in SPLITS])  # (3, C)
    have = np.zeros_like(target)
    members = [np.flatnonzero(groups == g) for g in range(int(groups.max()) + 1)]
    order = np.random.default_rng(seed).permutation(len(members))
    order = sorted(order, key=lambda g: -len(members[g]))  # stable: keeps the random order
    split = np.empty(len(labels), dtype=np.int64)
    for g in order:
        counts = np.bincount(labels[members[g]], minlength=n_classes)
        major = int(counts.argmax())
        # Unfilled share of each quota; ties go to test, then val, so small classes reach them.
        room = [(target[k, major] - have[k, major]) / max(target[k, major], 1e-9) for k in (2, 1, 0)]
        s = (2, 1, 0)[int(np.argmax(room))]
        split[members[g]] = s
        have[s] += counts
    return split


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices (all, if fewer) drawn at random within each class, in proportion to the
    class sizes (largest remainders), returned in a seeded random order.

    The prepared splits are stored sorted by class, so a prefix of a split is one or two classes:
    calibration or statistics taken on it describe those classes only.
    """
    rng = np.random.default_rng(seed)
    per_class = np.bincount(labels)
    count = min(count, len(labels))
    quota = per_class * count / len(labels)
    take = np.floor(quota).astype(np.int64)
    short = count - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False) for c, n in enumerate(take)]
    return rng.permutation(np.concatenate(picked))
