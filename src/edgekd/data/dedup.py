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


def near_duplicate_pairs(phash: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Pairs (i < j) whose pHash distance, minimised over the 8 transforms of i, is <= max_bits.

    Multi-index hashing, so that the cost grows with the number of images, not with its square:
    the 256 bits are cut into max_bits + 1 chunks, and a pair within max_bits differs in at most
    max_bits of them, so it agrees exactly on at least one (pigeonhole). Candidates are the pairs
    that share a chunk, found by sorting the chunk values; each is then verified on all 256 bits.
    The result is exactly the exhaustive all-pairs search's (tests/test_data.py compares the two).
    """
    n = len(phash)
    if n < 2:
        return []
    bits = np.unpackbits(phash.astype(">u8").view(np.uint8).reshape(n, 8, 32), axis=2)  # (N, 8, 256)
    candidates = []
    for chunk in np.array_split(np.arange(bits.shape[2]), max_bits + 1):
        packed = np.packbits(bits[:, :, chunk], axis=2)  # (N, 8, ceil(len/8)) uint8
        keys = np.unique(packed.reshape(n * 8, -1), axis=0, return_inverse=True)[1].reshape(n, 8)
        order = np.argsort(keys[:, 0], kind="stable")  # images by their untransformed chunk value
        lo = np.searchsorted(keys[order, 0], keys, "left").ravel()  # (N * 8,)
        hi = np.searchsorted(keys[order, 0], keys, "right").ravel()
        counts = hi - lo
        i = np.repeat(np.arange(n * 8) // 8, counts)
        j = order[np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
        keep = i < j
        candidates.append(i[keep] * n + j[keep])
    pairs = np.unique(np.concatenate(candidates))
    i, j = pairs // n, pairs % n
    dist = np.bitwise_count(phash[i] ^ phash[j, None, 0]).sum(axis=2, dtype=np.int64).min(axis=1)
    near = dist <= max_bits
    return list(zip(i[near].tolist(), j[near].tolist()))


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
