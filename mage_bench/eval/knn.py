"""DINO's weighted k-nearest-neighbour classifier on L2-normalised features (cosine similarity).

Each test feature's k most similar training features vote for their class with weight
exp(similarity / T); the classes are ranked by total vote (top-1, top-5). Exact search runs through
faiss (`IndexFlatIP`), moved to the GPU only when faiss sees one.
"""

from __future__ import annotations

import numpy as np

from mage_bench.eval import check_features, l2_normalise

KEY_TOP1, KEY_TOP5 = "top1", "top5"


def nearest_neighbours(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [Q, k], indices [Q, k]) of the k most similar database rows (inner product)."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Weighted kNN accuracy: {"top1", "top5", "k"} (k is clamped to the training-set size)."""
    train = l2_normalise(check_features("knn", train_x, train_y)).astype(np.float32)
    test = l2_normalise(check_features("knn", test_x, test_y)).astype(np.float32)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    k = min(k, train.shape[0])
    sims, idx = nearest_neighbours(train, test, k)  # (Q, k)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((test.shape[0], num_classes))
    np.add.at(votes, (np.arange(test.shape[0])[:, None], train_y[idx]), np.exp(sims.astype(np.float64) / temperature))
    ranking = np.argsort(-votes, axis=1, kind="stable")  # ties: the lower class id first
    top1 = float((ranking[:, 0] == test_y).mean())
    top5 = float((ranking[:, :5] == test_y[:, None]).any(axis=1).mean())
    return {KEY_TOP1: top1, KEY_TOP5: top5, "k": k}
