"""Group exact and near-duplicate images so that no group straddles two splits.

Why: the Rice Image set holds exact duplicate pairs and the Rice Disease set is built from
flipped/rotated copies; if two copies land in train and test, test accuracy measures memory.
Every image therefore belongs to a group (exact pixel match or a perceptual-hash match under any
of the 8 flips/90-degree rotations, joined transitively).
"""

from __future__ import annotations

import numpy as np


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def near_duplicate_pairs(phash: np.ndarray, max_bits: int, block: int = 32) -> list[tuple[int, int]]:
    """Pairs (i < j) whose pHash distance, minimised over the 8 transforms of i, is <= max_bits."""
    n = len(phash)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, block):
        rows = phash[start : start + block]  # (B, 8, 4)
        xor = rows[:, :, None, :] ^ phash[None, None, :, 0, :]  # (B, 8, N, 4)
        dist = np.bitwise_count(xor).sum(axis=3, dtype=np.int64).min(axis=1)  # (B, N)
        for bi, j in zip(*np.nonzero(dist <= max_bits)):
            i = start + int(bi)
            if i < j:
                pairs.append((i, int(j)))
    return pairs


def group_duplicates(exact: list[bytes], phash: np.ndarray, max_bits: int) -> tuple[np.ndarray, dict]:
    """Group id per image (0..G-1, numbered by first member) and duplicate counts."""
    uf = _UnionFind(len(exact))
    first: dict[bytes, int] = {}
    exact_extra = 0
    for i, key in enumerate(exact):
        if key in first:
            uf.union(first[key], i)
            exact_extra += 1
        else:
            first[key] = i
    near = [(i, j) for i, j in near_duplicate_pairs(phash, max_bits) if exact[i] != exact[j]]
    for i, j in near:
        uf.union(i, j)
    roots = [uf.find(i) for i in range(len(exact))]
    ids: dict[int, int] = {}
    groups = np.array([ids.setdefault(r, len(ids)) for r in roots], dtype=np.int64)
    sizes = np.bincount(groups) if len(groups) else np.zeros(0, np.int64)
    n_exact_groups = len({exact[i] for i in range(len(exact)) if first[exact[i]] != i})
    stats = {"exact_groups": n_exact_groups, "exact_extra_images": exact_extra,
             "near_pairs": len(near), "groups_with_copies": int((sizes > 1).sum()),
             "images_in_groups": int(sizes[sizes > 1].sum())}
    return groups, stats
