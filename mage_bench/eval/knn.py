"""DINO's weighted k-nearest-neighbour classifier and retrieval metrics on L2-normalised features (cosine).

Each test feature's k most similar training features vote for their class with weight
exp(similarity / T); the classes are ranked by total vote (top-1, top-5). Retrieval takes the test
features as queries against the training split, same class = relevant (mAP@R, precision@k).

Search: exact inner product, once per evaluation at the largest depth needed (`knn_evaluate`: the
largest k, and the largest class for mAP@R); every k's vote is read off the first k columns (neighbours
come sorted by similarity). The search runs through faiss (`IndexFlatIP`, moved to the GPU when faiss
sees one) while the depth fits the index: GPU faiss returns at most GPU_SEARCH_K_LIMIT neighbours per
query, and deeper searches (mAP@R on CIFAR-10 needs 5,000) run as an exact chunked matmul + top-k in
torch instead (`exact_neighbours`), never a silently truncated depth. Every search function takes
`k_limit`, the limit to assume (None: the limit of the index in use), so a CPU can stand in for a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mage_bench.eval import check_features, l2_normalise, top1_top5
from mage_bench.metrics import Metric

# The records of the `knn` evaluator: classification at each k, then retrieval with the same features.
METRICS = (Metric("top1", True, "kNN top-1"), Metric("top5", True, "kNN top-5"),
           Metric("map_at_r", True, "retrieval mAP@R"), Metric("precision_at_10", True, "retrieval precision@10"))

# faiss's GPU k-selection handles k <= 2048 (GPU_MAX_SELECTION_K); a larger k fails on a GPU index.
GPU_SEARCH_K_LIMIT = 2048
# Similarities held at once by the exact search: 2^26 float32 = 256 MB per query chunk.
EXACT_CHUNK_ELEMENTS = 1 << 26
# Queries per block when turning neighbours into mAP@R, so the [Q, depth] temporaries stay small.
RETRIEVAL_BLOCK = 4096


def _faiss_on_gpu() -> bool:
    import faiss

    return faiss.get_num_gpus() > 0


def search_k_limit(k_limit: int | None = None) -> int | None:
    """The most neighbours per query the faiss index in use returns: `k_limit` when given (a stand-in),
    else GPU_SEARCH_K_LIMIT when faiss runs on a GPU, else None (no limit on CPU)."""
    if k_limit is not None:
        return k_limit
    return GPU_SEARCH_K_LIMIT if _faiss_on_gpu() else None


def _faiss_neighbours(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(database)
    return index.search(queries, k)


def exact_neighbours(database: np.ndarray, queries: np.ndarray, k: int, device: str | None = None,
                     chunk_elements: int = EXACT_CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(similarities float32 [Q, k], indices int64 [Q, k]) by exact inner products in torch: a chunk of
    queries against the whole database (matmul), then top-k, sorted by similarity. No limit on k.

    `device`: where the products run (None: cuda when visible, else cpu)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    k = min(k, len(database))
    db = torch.from_numpy(database).to(device)
    rows = max(1, chunk_elements // max(len(database), 1))
    sims, idx = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    with torch.inference_mode():
        for start in range(0, len(queries), rows):
            chunk = torch.from_numpy(queries[start:start + rows]).to(device)
            top = torch.topk(chunk @ db.T, k, dim=1, largest=True, sorted=True)
            sims[start:start + len(chunk)] = top.values.cpu().numpy()
            idx[start:start + len(chunk)] = top.indices.cpu().numpy()
    return sims, idx


def nearest_neighbours(database: np.ndarray, queries: np.ndarray, k: int, k_limit: int | None = None,
                       device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [Q, k], indices [Q, k]) of the k most similar database rows (inner product), sorted.

    k is clamped to the database size. faiss searches when k fits its limit (`search_k_limit`); beyond
    it, `exact_neighbours` on `device` gives the same neighbours (ties aside)."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, database.shape[0])
    limit = search_k_limit(k_limit)
    if limit is not None and k > limit:
        return exact_neighbours(database, queries, k, device)
    return _faiss_neighbours(database, queries, k)


def _unit_rows(name: str, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return l2_normalise(check_features(name, x, labels)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# kNN classification


def knn_from_neighbours(sims: np.ndarray, idx: np.ndarray, train_y: np.ndarray, test_y: np.ndarray,
                        ks: Sequence[int], temperature: float = 0.07,
                        num_classes: int | None = None) -> list[dict[str, float]]:
    """Weighted kNN accuracy at each k of `ks` from one search's neighbours (sorted by similarity, at least
    max(ks) columns after clamping to the training size): [{"top1", "top5", "k"}] in the order of `ks`.

    The votes of a larger k add the next columns to those of the smaller one, in column order, so each
    cell sums the same terms in the same order as a search at that k alone."""
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    clamped = [min(k, len(train_y)) for k in ks]
    depth = max(clamped)
    if idx.shape[1] < depth:
        raise ValueError(f"knn: {idx.shape[1]} neighbours per query, but k = {depth} asked for")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    weights = np.exp(sims[:, :depth].astype(np.float64) / temperature)
    labels = train_y[idx[:, :depth]]
    votes, rows, done = np.zeros((len(test_y), num_classes)), np.arange(len(test_y))[:, None], 0
    scores: dict[int, tuple[float, float]] = {}
    for k in sorted(set(clamped)):
        np.add.at(votes, (rows, labels[:, done:k]), weights[:, done:k])
        done = k
        scores[k] = top1_top5(votes, test_y)  # ties: the lower class id first
    return [{"top1": scores[k][0], "top5": scores[k][1], "k": k} for k in clamped]


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 20, temperature: float = 0.07, k_limit: int | None = None,
                 device: str | None = None) -> dict[str, float]:
    """Weighted kNN accuracy: {"top1", "top5", "k"} (k is clamped to the training-set size)."""
    train = _unit_rows("knn", train_x, train_y)
    test = _unit_rows("knn", test_x, test_y)
    sims, idx = nearest_neighbours(train, test, min(k, train.shape[0]), k_limit, device)  # (Q, k)
    return knn_from_neighbours(sims, idx, train_y, test_y, [k], temperature)[0]


# --------------------------------------------------------------------------------------------
# Retrieval


def _retrieval_depth(database_y: np.ndarray, query_y: np.ndarray, precision_ks: Sequence[int]) -> tuple[int, Any]:
    """(search depth, R per query): the largest R (database items of the query's class) or precision k."""
    class_sizes = np.bincount(database_y, minlength=int(max(database_y.max(), query_y.max())) + 1)
    r = class_sizes[query_y]  # (Q,)
    return int(min(len(database_y), max(int(r.max()), *precision_ks))), r


def retrieval_from_neighbours(idx: np.ndarray, database_y: np.ndarray, query_y: np.ndarray,
                              precision_ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Retrieval metrics (see `retrieval_metrics`) from one search's neighbour indices, sorted by similarity,
    with at least as many columns as the largest R or precision k (clamped to the database size)."""
    database_y, query_y = np.asarray(database_y, dtype=np.int64), np.asarray(query_y, dtype=np.int64)
    depth, r = _retrieval_depth(database_y, query_y, precision_ks)
    if idx.shape[1] < depth:
        raise ValueError(f"retrieval: {idx.shape[1]} neighbours per query, but depth {depth} needed")
    ranks = np.arange(1, depth + 1)
    ap = np.empty(len(query_y))
    relevant_at = {k: 0 for k in precision_ks}
    for start in range(0, len(query_y), RETRIEVAL_BLOCK):  # per block: [block, depth] temporaries only
        block = slice(start, start + RETRIEVAL_BLOCK)
        relevant = database_y[idx[block, :depth]] == query_y[block, None]
        within_r = relevant & (ranks[None, :] <= r[block, None])
        hits = np.cumsum(within_r, axis=1)
        ap[block] = ((hits / ranks) * within_r).sum(axis=1) / np.maximum(r[block], 1)
        for k in precision_ks:
            relevant_at[k] += int(relevant[:, :min(k, depth)].sum())
    counted = r > 0
    out = {"map_at_r": float(ap[counted].mean()) if counted.any() else float("nan"),
           "queries": int(counted.sum())}
    for k in precision_ks:
        out[f"precision_at_{k}"] = relevant_at[k] / (len(query_y) * min(k, depth))
    return out


def retrieval_metrics(database_x: np.ndarray, database_y: np.ndarray, query_x: np.ndarray, query_y: np.ndarray,
                      precision_ks: tuple[int, ...] = (10,), k_limit: int | None = None,
                      device: str | None = None) -> dict[str, float]:
    """Retrieval quality with same class = relevant, cosine similarity, each query against the database.

    mAP@R (Musgrave et al., 2020): R is the number of database items of the query's class; AP@R is the
    mean over the top R ranks of precision@i at the ranks i that are relevant. Queries whose class is
    absent from the database have nothing to retrieve and are left out (`queries` says how many count).
    precision@k: the share of the k nearest database items that are relevant, over all queries.
    R is never truncated: a depth beyond the index's limit is searched exactly another way.
    """
    database = _unit_rows("retrieval", database_x, database_y)
    queries = _unit_rows("retrieval", query_x, query_y)
    database_y, query_y = np.asarray(database_y, dtype=np.int64), np.asarray(query_y, dtype=np.int64)
    depth, _ = _retrieval_depth(database_y, query_y, precision_ks)
    _, idx = nearest_neighbours(database, queries, depth, k_limit, device)
    return retrieval_from_neighbours(idx, database_y, query_y, precision_ks)


# --------------------------------------------------------------------------------------------
# Both at once (the `knn` evaluator)


def knn_evaluate(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 precision_ks: tuple[int, ...] = (10,), k_limit: int | None = None,
                 device: str | None = None) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(kNN results per k of `ks`, as `knn_classify` gives them; retrieval metrics of the test split against
    the training split, as `retrieval_metrics` gives them) from ONE search at the largest depth either needs."""
    train = _unit_rows("knn", train_x, train_y)
    test = _unit_rows("knn", test_x, test_y)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    retrieval_depth, _ = _retrieval_depth(train_y, test_y, precision_ks)
    depth = min(len(train_y), max(max(ks), retrieval_depth))
    sims, idx = nearest_neighbours(train, test, depth, k_limit, device)
    return (knn_from_neighbours(sims, idx, train_y, test_y, ks, temperature),
            retrieval_from_neighbours(idx, train_y, test_y, precision_ks))
