"""Correlation and hierarchical clustering of Task-Layer Interaction Vectors, and how stable the
clusters are when the probe docs are resampled (bootstrap -> adjusted Rand index).

Sub-tasks whose interaction vector is constant (no layer changes anything) have no correlation with
anything; they are left out of the clustering and named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import dendrogram, fcluster, linkage
from scipy.spatial.distance import squareform


def correlation_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pearson correlation between rows; an undefined correlation (constant row) counts as 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(vectors)
    corr = np.nan_to_num(np.atleast_2d(corr), nan=0.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def average_linkage(corr: np.ndarray) -> np.ndarray:
    """Average-linkage tree over the correlation distance 1 - r."""
    distance = np.clip(1.0 - corr, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return linkage(squareform(distance, checks=False), method="average")


def flat_clusters(tree: np.ndarray, count: int) -> np.ndarray:
    return fcluster(tree, count, criterion="maxclust")


def adjusted_rand_index(a, b) -> float:
    """Hubert & Arabie's ARI between two labelings (1 = identical partitions, ~0 = chance)."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return (x * (x - 1) // 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one cluster, or all singletons) and equal
        return 1.0
    return float((index - expected) / (maximum - expected))


@dataclass
class Clustering:
    names: list[str]  # sub-tasks clustered, in input order
    corr: np.ndarray
    tree: np.ndarray
    order: list[int]  # dendrogram leaf order
    labels: np.ndarray  # flat cluster per sub-task

    def members(self) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for index in self.order:
            groups.setdefault(int(self.labels[index]), []).append(self.names[index])
        return groups


def cluster(names: list[str], vectors: np.ndarray, count: int) -> Clustering:
    corr = correlation_matrix(vectors)
    tree = average_linkage(corr)
    order = dendrogram(tree, no_plot=True)["leaves"]
    return Clustering(names, corr, tree, order, flat_clusters(tree, count))


@dataclass
class Stability:
    ari: np.ndarray  # per bootstrap resample
    co_clustered: np.ndarray  # fraction of resamples in which sub-tasks i and j share a cluster

    def summary(self) -> dict:
        return {
            "mean": float(self.ari.mean()),
            "sd": float(self.ari.std()),
            "p05": float(np.quantile(self.ari, 0.05)),
            "median": float(np.median(self.ari)),
            "p95": float(np.quantile(self.ari, 0.95)),
            "resamples": len(self.ari),
        }


def bootstrap_stability(differences: list[np.ndarray], reference: Clustering, resamples: int, seed: int) -> Stability:
    """Resample each sub-task's probe docs with replacement, recompute the interaction vectors
    (mean per-doc difference), recluster into as many clusters, and compare with the reference.

    `differences[i]` is sub-task i's (layers x probe docs) matrix of knocked-out minus base scores.
    """
    rng = np.random.default_rng(seed)
    count = len(set(reference.labels.tolist()))
    n = len(differences)
    aris = np.empty(resamples)
    together = np.zeros((n, n))
    for b in range(resamples):
        vectors = np.stack([d[:, rng.integers(0, d.shape[1], d.shape[1])].mean(axis=1) for d in differences])
        labels = flat_clusters(average_linkage(correlation_matrix(vectors)), count)
        aris[b] = adjusted_rand_index(reference.labels, labels)
        together += labels[:, None] == labels[None, :]
    return Stability(aris, together / resamples)
