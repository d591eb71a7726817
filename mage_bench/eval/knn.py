"""DINO's weighted k-nearest-neighbour classifier on L2-normalised features (cosine similarity).

Each test feature's k most similar training features vote for their class with weight
exp(similarity / T); the classes are ranked by total vote (top-1, top-5). Exact search runs through
faiss (`IndexFlatIP`), moved to the GPU only when faiss sees one.
"""

from __future__ import annotations

import numpy as np

from mage_bench.eval import check_features, l2_normalise, top1_top5
from mage_bench.metrics import Metric

# The records of the `knn` evaluator: classification at each k, then retrieval with the same features.
METRICS = (Metric("top1", True, "kNN top-1"), Metric("top5", True, "kNN top-5"),
           Metric("map_at_r", True, "retrieval mAP@R"), Metric("precision_at_10", True, "retrieval precision@10"))


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
    top1, top5 = top1_top5(votes, test_y)  # ties: the lower class id first
    return {"top1": top1, "top5": top5, "k": k}


def retrieval_metrics(database_x: np.ndarray, database_y: np.ndarray, query_x: np.ndarray, query_y: np.ndarray,
                      precision_ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """Retrieval quality with same class = relevant, cosine similarity, each query against the database.

    mAP@R (Musgrave et al., 2020): R is the number of database items of the query's class; AP@R is the
    mean over the top R ranks of precision@i at the ranks i that are relevant. Queries whose class is
    absent from the database have nothing to retrieve and are left out (`queries` says how many count).
    precision@k: the share of the k nearest database items that are relevant, over all queries.
    """
    database = l2_normalise(check_features("retrieval", database_x, database_y)).astype(np.float32)
    queries = l2_normalise(check_features("retrieval", query_x, query_y)).astype(np.float32)
    database_y, query_y = np.asarray(database_y, dtype=np.int64), np.asarray(query_y, dtype=np.int64)
    class_sizes = np.bincount(database_y, minlength=int(max(database_y.max(), query_y.max())) + 1)
    r = class_sizes[query_y]  # (Q,)
    depth = int(min(database.shape[0], max(int(r.max()), *precision_ks)))
    _, idx = nearest_neighbours(database, queries, depth)
    relevant = database_y[idx] == query_y[:, None]  # (Q, depth)
    ranks = np.arange(1, depth + 1)
    within_r = ranks[None, :] <= r[:, None]
    hits = np.cumsum(relevant & within_r, axis=1)
    ap = ((hits / ranks) * (relevant & within_r)).sum(axis=1) / np.maximum(r, 1)
    counted = r > 0
    out = {"map_at_r": float(ap[counted].mean()) if counted.any() else float("nan"),
           "queries": int(counted.sum())}
    for k in precision_ks:
        kk = min(k, depth)
        out[f"precision_at_{k}"] = float(relevant[:, :kk].mean())
    return out
