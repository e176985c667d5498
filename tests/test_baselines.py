import itertools

import numpy as np
import pytest
import torch

from atc_det.baselines import dpcknn_clustering, kmedoids_clustering, random_clustering, tome_clustering
from atc_det.registry import get_method, method_names
from conftest import same_partition

BASELINES = ("tome", "kmedoids", "dpcknn", "random")


def cosine(x):
    x = np.asarray(x, dtype=np.float64)
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    upper = np.triu(1.0 - unit @ unit.T, 1)
    return upper + upper.T


def blobs(seed, num_blobs, per_blob, channels=8, spread=0.05):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_blobs, channels, generator=gen)
    truth = torch.arange(num_blobs).repeat_interleave(per_blob)
    x = centres[truth] + spread * torch.randn(len(truth), channels, generator=gen)
    perm = torch.randperm(len(truth), generator=gen)
    return x[perm][None], truth[perm]


@pytest.mark.parametrize("name", BASELINES)
def test_exact_k_groups_and_numbering(name):
    fn = get_method(name)
    torch.manual_seed(0)
    x = torch.randn(4, 40, 8)
    valid = torch.rand(4, 40) < 0.6
    for k, kwargs in ((1, {}), (7, {}), (40, {}), (9, dict(valid=valid, protected=3))):
        labels = fn(x, k, **kwargs)
        assert labels.shape == (4, 40) and labels.dtype == torch.int64
        for row in labels:
            assert sorted(set(row.tolist())) == list(range(k))
            firsts = [row.tolist().index(c) for c in range(k)]
            assert firsts == sorted(firsts)  # numbered by first member
        if "valid" in kwargs:
            assert torch.equal(labels[:, :3], torch.arange(3).expand(4, 3))
            for b in range(4):
                inside, outside = labels[b, 3:][valid[b, 3:]], labels[b, 3:][~valid[b, 3:]]
                assert not set(inside.tolist()) & set(outside.tolist())
                assert not set(labels[b, 3:].tolist()) & {0, 1, 2}


@pytest.mark.parametrize("name", ("tome", "kmedoids", "dpcknn"))
def test_deterministic_and_batch_independent(name):
    fn = get_method(name)
    torch.manual_seed(1)
    x = torch.randn(3, 30, 6)
    labels = fn(x, 8)
    assert torch.equal(labels, fn(x, 8))
    for b in range(3):
        assert torch.equal(labels[b], fn(x[b:b + 1], 8)[0])


@pytest.mark.parametrize("name", ("tome", "kmedoids", "dpcknn"))
def test_recovers_well_separated_blobs(name):
    x, truth = blobs(seed=2, num_blobs=5, per_blob=8)
    assert same_partition(get_method(name)(x, 5)[0], truth)


def test_tome_single_step_merges_most_similar_bipartite_pair():
    """K = N - 1: the one merged pair is the most similar (even index, odd index) pair."""
    torch.manual_seed(3)
    for _ in range(10):
        x = torch.randn(1, 11, 5, dtype=torch.float64)
        sim = 1.0 - cosine(x[0])
        a, b = max(((i, j) for i in range(0, 11, 2) for j in range(1, 11, 2)), key=lambda p: sim[p])
        expected = np.arange(11)
        expected[max(a, b)] = min(a, b)
        assert same_partition(tome_clustering(x, 10)[0], expected)


def test_tome_merge_count_per_step_limited_by_set_a():
    """N = 8, K = 2: the first step can merge at most |A| = 4, so two steps are needed."""
    x, truth = blobs(seed=4, num_blobs=2, per_blob=4)
    labels = tome_clustering(x, 2)[0]
    assert same_partition(labels, truth)


def test_kmedoids_optimal_on_tiny_cases_and_fixed_point():
    """Objective equals the brute-force optimum over all medoid sets on tiny clustered inputs,
    and the result is a fixed point of the alternating iteration."""
    for seed in range(8):
        x, _ = blobs(seed=seed, num_blobs=3, per_blob=3, spread=0.2)
        dist = cosine(x[0])
        labels = kmedoids_clustering(x.double(), 3)[0].numpy()
        cost = sum(min(dist[i, labels == c].sum() for i in np.where(labels == c)[0]) for c in range(3))
        optimum = min(dist[:, list(m)].min(1).sum() for m in itertools.combinations(range(9), 3))
        assert cost == pytest.approx(optimum, abs=1e-9)
        medoids = [np.where(labels == c)[0][np.argmin(dist[np.ix_(labels == c, labels == c)].sum(1))]
                   for c in range(3)]
        assert (labels == np.argmin(dist[:, medoids], axis=1)).all()


def test_dpcknn_matches_loop_reference():
    """Straightforward per-token loops of DPC-KNN (Du et al. 2016) on random inputs."""
    rng = np.random.default_rng(5)
    for _ in range(10):
        n, k = int(rng.integers(5, 20)), int(rng.integers(1, 5))
        num_clusters = int(rng.integers(1, n + 1))
        x = rng.standard_normal((n, 4))
        dist = cosine(x)
        density = []
        for i in range(n):
            others = sorted(dist[i, j] for j in range(n) if j != i)[:k]
            density.append(np.exp(-np.mean(np.square(others))))
        delta = []
        for i in range(n):
            higher = [dist[i, j] for j in range(n)  # equal density: the lower index is higher
                      if density[j] > density[i] or (density[j] == density[i] and j < i)]
            delta.append(min(higher) if higher else max(dist[i, j] for j in range(n) if j != i))
        score = np.array(density) * np.array(delta)
        centres = sorted(range(n), key=lambda i: -score[i])[:num_clusters]
        expected = [min(centres, key=lambda c: dist[i, c]) for i in range(n)]
        labels = dpcknn_clustering(torch.from_numpy(x)[None], num_clusters, k_neighbors=k)[0]
        assert same_partition(labels, expected)


def test_random_clustering_uses_generator():
    x = torch.randn(2, 20, 4)
    first = random_clustering(x, 6, generator=torch.Generator().manual_seed(0))
    again = random_clustering(x, 6, generator=torch.Generator().manual_seed(0))
    other = random_clustering(x, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_registry_and_bad_input():
    assert set(method_names()) == {"atc", *BASELINES}
    for name in BASELINES:
        with pytest.raises(ValueError, match="num_clusters"):
            get_method(name)(torch.randn(1, 5, 3), 6)
        with pytest.raises(ValueError, match="NaN or Inf"):
            get_method(name)(torch.full((1, 5, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="k_neighbors"):
        dpcknn_clustering(torch.randn(1, 5, 3), 2, k_neighbors=0)
