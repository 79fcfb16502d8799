"""Every subset the project takes is a sample: each class in proportion, fixed by a seed."""

from __future__ import annotations

import numpy as np

from serve.core.sampling import stratified


def test_a_class_sorted_set_is_sampled_across_its_classes() -> None:
    labels = np.repeat(np.arange(10), 1000)  # as CIFAR-10's test arrays: sorted by class
    idx = stratified(labels, 64, seed=0)
    assert len(idx) == 64 and idx == sorted(idx) and len(set(idx)) == 64
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.min() >= 6 and counts.max() <= 7  # 6.4 each
    assert stratified(labels, 64, seed=0) == idx  # the same for a seed
    assert stratified(labels, 64, seed=1) != idx


def test_small_and_uneven_sets() -> None:
    labels = np.array([0] * 70 + [1] * 83)  # the ants/bees val split
    counts = np.bincount(labels[stratified(labels, 32)])
    assert list(counts) == [15, 17]
    assert len(stratified(labels, 0)) == len(stratified(labels, 500)) == 153  # all
    rare = np.array([0] * 100 + [1] * 2)
    assert 1 in rare[stratified(rare, 5)]  # a small class is not left out
