"""Seeded, class-stratified random subsets of a split (PTQ calibration draws its images this way)."""

from __future__ import annotations

import numpy as np

from edgekd.data.split import stratified_sample


def test_stratified_sample_keeps_class_shares_and_random_order():
    labels = np.repeat(np.arange(5), [400, 300, 200, 100, 24])  # sorted by class, like a prepared split
    pick = stratified_sample(labels, 100, seed=42)
    assert len(pick) == len(set(pick.tolist())) == 100
    counts = np.bincount(labels[pick], minlength=5)
    assert counts.tolist() == [39, 29, 20, 10, 2]  # 100 * class share, largest remainders
    assert not np.all(np.diff(pick) > 0)  # not in file order: batches mix the classes
    assert np.array_equal(pick, stratified_sample(labels, 100, seed=42))  # the seed fixes it
    assert not np.array_equal(np.sort(pick), np.sort(stratified_sample(labels, 100, seed=1)))


def test_stratified_sample_of_more_than_the_split_is_all_of_it():
    labels = np.repeat(np.arange(3), 4)
    assert sorted(stratified_sample(labels, 1000, seed=0).tolist()) == list(range(12))
