"""ATC core checked against SciPy's hierarchy (an independent reference)."""

import errno
import os
import platform
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.cluster.tests.hierarchy_test_data as scipy_data
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from atc_det.clustering import native
from atc_det.registry import get_method
from atc_det.clustering import agglomerative_clustering, cosine_distances
from conftest import ROOT, same_partition

LINKAGES = ("single", "complete", "average")
# "portable": the native kernel built without AVX-512 (the code path of CPUs without it).
KERNELS = ("native", "portable")
# "triton": the GPU kernel, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1).
BACKENDS = ("torch", *KERNELS, "triton")
PORTABLE_FLAGS = ["-mno-avx512f"]
# Each test over BACKENDS gets backend="native" for "portable", with that build loaded.
over_backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
over_kernels = pytest.mark.parametrize("backend", KERNELS, indirect=True)


@pytest.fixture(scope="module")
def portable_kernel(tmp_path_factory):
    """The kernel compiled with ``PORTABLE_FLAGS`` into a temporary folder, loaded."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("AVX-512 is x86-64 only: the default build is the portable code path")
    folder = tmp_path_factory.mktemp("portable_kernel")
    probe = folder / "probe.cpp"
    probe.write_text("#if defined(__AVX512F__)\n#error AVX-512 is enabled\n#endif\n")
    native.compile_kernel(probe, folder / "probe.so", PORTABLE_FLAGS)  # fails if AVX-512 is on
    native.compile_kernel(native.SOURCE, folder / "rnn_rounds.so", PORTABLE_FLAGS)
    return native.load_library(folder / "rnn_rounds.so")


@pytest.fixture
def backend(request, monkeypatch) -> str:
    """The ``backend`` argument for a name of BACKENDS (the portable build routed as "native")."""
    if request.param != "portable":
        return request.param
    library = request.getfixturevalue("portable_kernel")
    monkeypatch.setattr(native, "cluster_library", lambda: library)
    return "native"


def numbered_by_first_member(labels) -> bool:
    seen = []
    for label in labels.tolist():
        if label not in seen:
            seen.append(label)
    return seen == list(range(len(seen)))


@over_backends
def test_random_cases_match_scipy_maxclust(backend):
    """1,200 random cases (B = 4 samples each over N, C, K, linkage; the first 480 of them for
    Triton's interpreter, which is slow): same partition as SciPy."""
    rng = np.random.default_rng(0)
    for _ in range(40 if backend == "triton" else 100):
        num_tokens, channels = int(rng.integers(2, 48)), int(rng.integers(2, 12))
        x = torch.from_numpy(rng.standard_normal((4, num_tokens, channels)))
        for method in LINKAGES:
            k = int(rng.integers(1, num_tokens + 1))
            labels = agglomerative_clustering(x, k, method, backend=backend)
            for b in range(4):
                ref = fcluster(linkage(pdist(x[b].numpy(), "cosine"), method=method), k, "maxclust")
                assert same_partition(labels[b], ref), (num_tokens, channels, k, method)
                assert labels[b].max() == k - 1 and numbered_by_first_member(labels[b])


@over_backends
@pytest.mark.parametrize("method", LINKAGES)
def test_threshold_matches_scipy_distance_criterion(method, backend):
    rng = np.random.default_rng(1)
    for _ in range(30):
        x = torch.from_numpy(rng.standard_normal((3, int(rng.integers(2, 40)), 6)))
        dist = [pdist(x[b].numpy(), "cosine") for b in range(3)]
        threshold = float(np.quantile(np.concatenate(dist), rng.uniform(0.0, 0.6)))
        labels = agglomerative_clustering(x, linkage=method, threshold=threshold, backend=backend)
        for b in range(3):
            ref = fcluster(linkage(dist[b], method=method), threshold, "distance")
            assert same_partition(labels[b], ref)


@over_backends
@pytest.mark.parametrize("method", LINKAGES)
def test_scipy_ytdist_vectors(method, backend):
    """SciPy's stored linkages of ``ytdist``: every cut of them equals ours on that matrix."""
    expected_z = getattr(scipy_data, f"linkage_ytdist_{method}")
    dist = torch.from_numpy(squareform(scipy_data.ytdist))[None]
    for k in range(1, 7):
        labels = agglomerative_clustering(linkage=method, num_clusters=k, distances=dist, backend=backend)
        assert same_partition(labels[0], fcluster(expected_z, k, "maxclust"))


@over_backends
def test_scipy_fcluster_vectors(backend):
    """SciPy's stored single-linkage Euclidean flat clusters of ``Q_X`` (maxclust and distance)."""
    dist = torch.from_numpy(squareform(pdist(scipy_data.Q_X)))[None]
    for k, expected in scipy_data.fcluster_maxclust.items():
        labels = agglomerative_clustering(num_clusters=int(k), linkage="single", distances=dist,
                                          backend=backend)
        assert same_partition(labels[0], expected)
    for t, expected in scipy_data.fcluster_distance.items():
        labels = agglomerative_clustering(linkage="single", distances=dist, threshold=t, backend=backend)
        assert same_partition(labels[0], expected)


@over_backends
@pytest.mark.parametrize("method", LINKAGES)
def test_valid_and_protected_match_scipy_with_separated_groups(method, backend):
    """Reference: SciPy on the same distances with a huge distance between groups."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        num_tokens, protected = int(rng.integers(4, 30)), int(rng.integers(0, 3))
        x = torch.from_numpy(rng.standard_normal((3, num_tokens, 5)))
        valid = torch.from_numpy(rng.random((3, num_tokens)) < 0.7)
        fewest = protected + 2
        k = int(rng.integers(fewest, num_tokens + 1))
        labels = agglomerative_clustering(x, k, method, valid=valid, protected=protected, backend=backend)
        for b in range(3):
            group = np.where(valid[b].numpy(), 0, 1)
            group[:protected] = 2 + np.arange(protected)
            dist = squareform(pdist(x[b].numpy(), "cosine"))
            dist[group[:, None] != group[None, :]] = 1e3
            np.fill_diagonal(dist, 0)
            ref = fcluster(linkage(squareform(dist), method=method), k, "maxclust")
            assert same_partition(labels[b], ref)
            assert labels[b].max() == k - 1
            assert labels[b, :protected].tolist() == list(range(protected))
            lab = labels[b].numpy()
            assert not np.isin(lab[group == 0], lab[group != 0]).any()


@over_backends
def test_batch_members_are_independent(backend):
    torch.manual_seed(3)
    x = torch.randn(5, 40, 8)
    x[1] = x[0, torch.randperm(40)]  # different sizes of rounds across the batch
    x[2] = 0.0  # all identical
    labels = agglomerative_clustering(x, 13, "average", backend=backend)
    for b in range(5):
        assert torch.equal(labels[b], agglomerative_clustering(x[b:b + 1], 13, "average", backend=backend)[0])


@over_backends
@pytest.mark.parametrize("method", LINKAGES)
def test_all_identical_tokens_and_duplicates(method, backend):
    x = torch.ones(2, 64, 4)
    for k in (1, 5, 64):
        labels = agglomerative_clustering(x, k, method, backend=backend)
        assert [len(set(row.tolist())) for row in labels] == [k, k]
        assert numbered_by_first_member(labels[0])
    # Exact duplicates of distinct points: K = number of distinct points recovers them.
    torch.manual_seed(4)
    points = torch.randn(1, 6, 5)
    x = points[:, torch.arange(48) % 6]
    labels = agglomerative_clustering(x, 6, method, backend=backend)
    assert same_partition(labels[0], np.arange(48) % 6)


@over_backends
def test_edge_cases(backend):
    x = torch.randn(3, 1, 4)
    assert agglomerative_clustering(x, 1, backend=backend).tolist() == [[0], [0], [0]]
    assert agglomerative_clustering(torch.randn(0, 5, 3), 2, backend=backend).shape == (0, 5)
    x = torch.randn(2, 9, 4)
    assert torch.equal(agglomerative_clustering(x, 9, backend=backend), torch.arange(9).expand(2, 9))
    assert agglomerative_clustering(x, 1, "single", backend=backend).abs().sum() == 0
    assert agglomerative_clustering(x, linkage="complete", threshold=0.0, backend=backend).max() == 8
    half = agglomerative_clustering(x.half(), 4, backend=backend)
    assert half.dtype == torch.int64 and half.max() == 3
    assert get_method("atc") is agglomerative_clustering


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(metric=torch.full((1, 4, 2), float("nan")), num_clusters=2), ValueError, "NaN or Inf"),
    (dict(metric=torch.full((1, 4, 2), float("inf")), num_clusters=2), ValueError, "NaN or Inf"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=0), ValueError, "num_clusters"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=5), ValueError, "num_clusters"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2.0), TypeError, "num_clusters"),
    (dict(metric=torch.ones(1, 4, 2), threshold=-0.1), ValueError, "threshold"),
    (dict(metric=torch.ones(1, 4, 2), threshold=float("nan")), ValueError, "threshold"),
    (dict(metric=torch.ones(1, 4, 2), distances=torch.zeros(1, 4, 4), num_clusters=2),
     ValueError, "exactly one of metric"),
    (dict(num_clusters=2), ValueError, "exactly one of metric"),
    (dict(metric=torch.ones(1, 4, 2)), ValueError, "num_clusters .* or threshold"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2, threshold=0.5), ValueError, "exactly one of"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2, linkage="ward"), ValueError, "linkage"),
    (dict(metric=torch.ones(4, 2), num_clusters=2), TypeError, r"\[B, N, C\]"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2, protected=5), ValueError, "protected"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2, protected=2), ValueError, "num_clusters"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2, valid=torch.ones(1, 3, dtype=torch.bool)),
     TypeError, "valid"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=1, valid=torch.tensor([[True, False, True, True]])),
     ValueError, "num_clusters"),
    (dict(distances=torch.rand(1, 4, 4) + torch.eye(4), num_clusters=2), ValueError, "symmetric"),
    (dict(distances=torch.ones(1, 4, 3), num_clusters=2), TypeError, r"\[B, N, N\]"),
    (dict(metric=torch.ones(1, 4, 2), num_clusters=2, backend="cuda"), ValueError, "backend"),
])
def test_bad_input_raises_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        agglomerative_clustering(**kwargs)


@over_backends
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_feature_anywhere_raises(backend, bad):
    """The native kernel checks finiteness while it normalises; one bad value in one sample fails."""
    x = torch.randn(6, 30, 8, dtype=torch.float64)
    x[4, 17, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        agglomerative_clustering(x, 10, "average", backend=backend)


@over_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", LINKAGES)
def test_native_kernel_equals_torch_path_with_ties(method, dtype, backend):
    """Same rounds, tie rules and cut: identical labels on the same distances, also tie-heavy ones
    (integer features). From features the two paths round the cosine distances differently."""
    generator = torch.Generator().manual_seed(5)
    for trial in range(20):  # per dtype
        num_tokens = int(torch.randint(2, 70, (1,), generator=generator))
        x = torch.randn(4, num_tokens, 6, generator=generator, dtype=dtype)
        if trial % 2:
            x = x.round()  # many equal distances
        valid = torch.rand(4, num_tokens, generator=generator) < 0.7
        valid[:, 0] = True
        k = int(torch.randint(1, num_tokens + 1, (1,), generator=generator))
        calls = [dict(num_clusters=k), dict(threshold=float(torch.rand(1, generator=generator)) * 0.6)]
        if num_tokens >= 4:
            calls.append(dict(num_clusters=max(k, 3 + int(not bool(valid[:, 1:].all()))),
                              valid=valid, protected=1))
            calls.append(dict(threshold=0.3, valid=valid))
        dist = cosine_distances(x)
        for kwargs in calls:
            expected = agglomerative_clustering(linkage=method, distances=dist, backend="torch", **kwargs)
            got = agglomerative_clustering(linkage=method, distances=dist, backend=backend, **kwargs)
            assert torch.equal(got, expected), (trial, kwargs)


@over_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", LINKAGES)
def test_native_kernel_exact_features_equal_their_distances(method, dtype, backend):
    """Features of +-1 entries in C = 4, 16, 64 (norm 2, 4, 8): unit features, dot products and
    cosine distances are exact, so the kernel's own distances (normalisation and tiles, AVX-512
    or portable) must give the labels of torch's distances given to the kernel, ties and all."""
    generator = torch.Generator().manual_seed(8)
    for trial in range(30):
        num_tokens, channels = int(torch.randint(2, 70, (1,), generator=generator)), 4 ** (1 + trial % 3)
        x = (torch.randint(0, 2, (3, num_tokens, channels), generator=generator) * 2 - 1).to(dtype)
        k = int(torch.randint(1, num_tokens + 1, (1,), generator=generator))
        for kwargs in (dict(num_clusters=k), dict(threshold=0.5)):
            expected = agglomerative_clustering(linkage=method, distances=cosine_distances(x),
                                                backend=backend, **kwargs)
            got = agglomerative_clustering(x, linkage=method, backend=backend, **kwargs)
            assert torch.equal(got, expected), (trial, kwargs)


@over_backends
def test_per_sample_num_clusters_equal_one_call_per_sample(backend):
    """K as a [B] tensor: each sample gets its own K in one call (N = 1, K = N and K = 1 included),
    with padding and a protected token: the labels of one call per sample, and SciPy's partition."""
    generator = torch.Generator().manual_seed(3)
    for num_tokens in (1, 2, 9, 33):
        x = torch.randn(5, num_tokens, 6, generator=generator, dtype=torch.float64)
        k = torch.randint(1, num_tokens + 1, (5,), generator=generator)
        k[0], k[-1] = num_tokens, 1
        for method in LINKAGES:
            labels = agglomerative_clustering(x, k, method, backend=backend)
            for b in range(5):
                one = agglomerative_clustering(x[b:b + 1], int(k[b]), method, backend=backend)
                assert torch.equal(labels[b], one[0]), (num_tokens, method, b)
                ref = fcluster(linkage(pdist(x[b].numpy(), "cosine"), method=method), int(k[b]),
                               "maxclust") if num_tokens > 1 else np.ones(1)
                assert same_partition(labels[b], ref) and labels[b].max() == k[b] - 1
        if num_tokens < 9:
            continue
        valid = torch.arange(num_tokens) < torch.tensor([num_tokens, 7, 8, 5, 9])[:, None]
        k = torch.tensor([6, 4, 5, 3, 9])  # protected + real clusters + one padding cluster
        for method in LINKAGES:
            labels = agglomerative_clustering(x, k, method, valid=valid, protected=1, backend=backend)
            for b in range(5):
                one = agglomerative_clustering(x[b:b + 1], int(k[b]), method, valid=valid[b:b + 1],
                                               protected=1, backend=backend)
                assert torch.equal(labels[b], one[0]), (method, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clusters=torch.tensor([2, 5])), r"num_clusters\[1\] must lie in 1..4"),
    (dict(num_clusters=torch.tensor([2.0, 3.0])), "integer tensor of shape"),
    (dict(num_clusters=torch.tensor([2, 3, 2])), r"shape \[B\] = \[2\]"),
    (dict(num_clusters=torch.tensor([1, 2]), valid=torch.tensor([[True, True, False, True]] * 2)),
     r"num_clusters\[0\] must lie in 2..4"),
])
def test_bad_per_sample_num_clusters_is_one_clear_error(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        agglomerative_clustering(torch.randn(2, 4, 3), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", LINKAGES)
def test_triton_kernel_equals_native_kernel_with_ties(method, dtype):
    """The Triton kernel (interpreted) against the C++ kernel on the same distances: identical
    labels, also on tie-heavy ones (rounded and +-1 features), with padding, a protected token,
    per-sample K and thresholds; and from +-1 features (exact cosine distances) on both sides."""
    generator = torch.Generator().manual_seed(11)
    for trial in range(8):
        num_tokens = int(torch.randint(2, 60, (1,), generator=generator))
        if trial % 2:
            x = (torch.randint(0, 2, (3, num_tokens, 4 ** (1 + trial % 3)), generator=generator) * 2 - 1)
        else:
            x = torch.randn(3, num_tokens, 6, generator=generator).round()
        x = x.to(dtype)
        valid = torch.rand(3, num_tokens, generator=generator) < 0.7
        valid[:, :2] = True
        k = torch.randint(1, num_tokens + 1, (3,), generator=generator)
        calls = [dict(num_clusters=k), dict(threshold=float(torch.rand(1, generator=generator)) * 0.6)]
        if num_tokens >= 4:
            calls += [dict(num_clusters=k.clamp_min(3), valid=valid, protected=1),
                      dict(threshold=0.3, valid=valid)]
        dist = cosine_distances(x)
        for kwargs in calls:
            expected = agglomerative_clustering(linkage=method, distances=dist, backend="native", **kwargs)
            got = agglomerative_clustering(linkage=method, distances=dist, backend="triton", **kwargs)
            assert torch.equal(got, expected), (trial, kwargs)
        if trial % 2:
            expected = agglomerative_clustering(x, k, method, backend="native")
            assert torch.equal(agglomerative_clustering(x, k, method, backend="triton"), expected), trial


def test_triton_kernel_window_size_equals_native_kernel():
    """ViTDet windows: N = 196 (P = 256) with edge-window padding and a K per window; the labels
    from the metric (each backend computes the distances) equal the native kernel's."""
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(3, 196, 16, generator=generator)
    valid = torch.arange(196) < torch.tensor([196, 140, 100])[:, None]
    k = torch.tensor([98, 71, 51])
    for method in LINKAGES:
        expected = agglomerative_clustering(x, k, method, valid=valid, backend="native")
        assert torch.equal(agglomerative_clustering(x, k, method, valid=valid, backend="triton"), expected), method


def test_native_kernel_large_sample_splits_rows():
    """One sample of N >= 512 runs row-parallel inside the kernel: still SciPy's partition, and
    with padding (as for image-scope clustering in ViTDet) the torch path's labels."""
    x = torch.randn(1, 600, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for method in LINKAGES:
        labels = agglomerative_clustering(x, 150, method, backend="native")
        ref = fcluster(linkage(pdist(x[0].numpy(), "cosine"), method=method), 150, "maxclust")
        assert same_partition(labels[0], ref)
    valid = torch.arange(600)[None] < 520
    dist = cosine_distances(x)
    for method in LINKAGES:
        expected = agglomerative_clustering(linkage=method, num_clusters=200, distances=dist,
                                            valid=valid, backend="torch")
        got = agglomerative_clustering(linkage=method, num_clusters=200, distances=dist, valid=valid,
                                       backend="native")
        assert torch.equal(got, expected), method


def test_without_compiler_auto_falls_back_with_a_warning_and_native_errors(tmp_path):
    """No C++ compiler: "auto" warns once and uses the torch path; "native" is one clear error."""
    script = """
import warnings, torch
from atc_det.clustering import agglomerative_clustering
x = torch.randn(2, 30, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    auto = agglomerative_clustering(x, 7, "average")
assert any("native clustering kernel unavailable" in str(w.message) for w in caught), caught
assert torch.equal(auto, agglomerative_clustering(x, 7, "average", backend="torch"))
try:
    agglomerative_clustering(x, 7, "average", backend="native")
except RuntimeError as error:
    assert "no C++ compiler" in str(error), error
else:
    raise AssertionError("backend='native' without a compiler did not fail")
print("ok")
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), ATC_DET_NATIVE_CACHE=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_clustering_imports_without_fcntl():
    """As on Windows (no fcntl module): the clustering core imports, the kernel lock is portable."""
    script = "import sys; sys.modules['fcntl'] = None; import atc_det.clustering, atc_det.clustering.native"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_kernel_lock_on_windows_retries_msvcrt_and_unlocks(monkeypatch, tmp_path):
    """msvcrt.locking gives up after ~10 s with EDEADLOCK: the lock retries, then unlocks on exit;
    any other error is raised."""
    calls = []

    def locking(fd, mode, nbytes):
        calls.append(mode)
        if mode == fake.LK_LOCK and calls.count(fake.LK_LOCK) == 1:
            raise OSError(errno.EDEADLOCK, "another process holds the lock")

    fake = types.SimpleNamespace(LK_LOCK=1, LK_UNLCK=0, locking=locking)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.setattr(sys, "platform", "win32")
    with native._exclusive_lock(tmp_path / "kernel.lock"):
        assert calls == [fake.LK_LOCK, fake.LK_LOCK]
    assert calls == [fake.LK_LOCK, fake.LK_LOCK, fake.LK_UNLCK]

    def denied(fd, mode, nbytes):
        raise OSError(errno.EACCES, "denied")

    fake.locking = denied
    with pytest.raises(OSError, match="denied"):
        with native._exclusive_lock(tmp_path / "kernel.lock"):
            pass


def test_auto_backend_picks_triton_for_cuda_tensors_and_warns_once_without_it(monkeypatch):
    """Dispatch only (no GPU here): CUDA tensors take Triton when it imports, else the torch path
    with one warning; samples above the kernel's size and CPU tensors keep their backends."""
    from atc_det.clustering import dispatch as clustering, triton_kernel as triton_clustering

    cuda = types.SimpleNamespace(device=torch.device("cuda"), shape=(25, 196, 64))
    assert clustering._backend("auto", cuda) == "triton"
    large = types.SimpleNamespace(device=torch.device("cuda"), shape=(1, 4096, 64))
    assert clustering._backend("auto", large) == "torch"
    assert clustering._backend("auto", torch.zeros(2, 196, 4)) == "native"
    monkeypatch.setattr(triton_clustering, "available", lambda: False)
    monkeypatch.setattr(clustering, "_warned", set())
    with pytest.warns(RuntimeWarning, match="triton unavailable"):
        assert clustering._backend("auto", cuda) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clustering._backend("auto", cuda) == "torch"  # warned once


def test_triton_backend_on_cpu_tensors_without_the_interpreter_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        agglomerative_clustering(torch.randn(1, 8, 4), 3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="at most 1024 tokens"):
        agglomerative_clustering(torch.randn(1, 1025, 4), 3, backend="triton", linkage="single")
