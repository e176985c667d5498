"""CUDA-only checks: what Triton's interpreter cannot show (races between the threads of a
program, 64-bit offsets, the compiled kernel at every warp count), and a reduced ViT on the GPU
(no host synchronisation, CUDA-graph replay, ``torch.compile``). Skipped without a GPU.

References: the C++ kernel on CPU copies of the same distances (exact label equality: the
guarantee of :mod:`atc_det.clustering.triton_kernel` on the distances path), SciPy on
well-separated features (the guarantee from features), the eager model (graphs, compile).

Triton's interpreter (switched on by tests/conftest.py) is switched off for this module and back
on after it. An interpreted kernel that calls other jit functions leaves ``triton.language``
patched for the rest of the process (Triton 3.8), so after interpreted tests in the same process
these tests skip: run this file in its own pytest process (``scripts/gpu_check.sh`` does).
"""
import functools
import importlib
import os

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage as scipy_linkage
from scipy.spatial.distance import pdist

from atc_det.clustering import agglomerative_clustering, cosine_distances, native, triton_kernel
from atc_det.clustering.contract import group_counts
from conftest import same_partition, small_vit, vit_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LINKAGES = ("single", "complete", "average")
SIZES = (2, 15, 16, 17, 33, 64, 65, 196, 257, 513, 1000, 1024)
PATTERNS = ("uniform", "cosine", "all_equal", "integer", "duplicated", "path", "triangular", "pairs")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def compiled_kernel():
    """The Triton kernel compiled for this GPU (the module reloaded with TRITON_INTERPRET=0)
    while this module runs; interpreted again afterwards. Also builds the C++ reference and lets
    it use every CPU core (tests/conftest.py caps torch at 2 threads)."""
    import triton.language as tl

    if getattr(tl.core.tensor.to, "__name__", "") == "<lambda>":  # left patched by the interpreter
        pytest.skip("Triton's interpreter ran earlier in this process and left triton.language "
                    "patched: run tests/test_cuda.py in its own pytest process")
    try:
        native.cluster_library()
    except native.NativeUnavailable as error:
        pytest.fail(f"the C++ reference kernel is unavailable: {error}")
    previous, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "0"
    importlib.reload(triton_kernel)
    torch.set_num_threads(os.cpu_count() or 1)
    yield triton_kernel
    torch.set_num_threads(threads)
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous
    importlib.reload(triton_kernel)


def window(pattern: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """One window's distances [n, n] float32 (CPU), exactly symmetric, zero diagonal, of a tie
    pattern: random ("uniform", "cosine"), all equal, small integers, duplicated tokens, the path
    metric |i - j|, points at i(i+1)/2 on a line (deep single-linkage trees), or many disjoint
    tight pairs at one distance; the structured ones in a random token order."""
    index = torch.arange(n, dtype=torch.float32)
    if pattern == "uniform":
        dist = torch.rand(n, n, generator=generator)
    elif pattern == "cosine":
        dist = cosine_distances(torch.randn(1, n, 8, generator=generator))[0]
    elif pattern == "all_equal":
        dist = torch.ones(n, n)
    elif pattern == "integer":
        dist = torch.randint(1, 4, (n, n), generator=generator).float()
    elif pattern == "duplicated":
        prototypes = torch.randn(max(1, n // 4), 6, generator=generator)
        tokens = prototypes[torch.randint(len(prototypes), (n,), generator=generator)]
        dist = cosine_distances(tokens[None])[0]
    elif pattern == "path":
        dist = (index[:, None] - index[None, :]).abs()
    elif pattern == "triangular":
        points = index * (index + 1) / 2
        dist = (points[:, None] - points[None, :]).abs()
    elif pattern == "pairs":
        dist = 1.0 + torch.rand(n, n, generator=generator)
        pair = torch.arange(n) // 2
        dist[pair[:, None] == pair[None, :]] = 0.125
    else:
        raise ValueError(pattern)
    if pattern in ("path", "triangular", "pairs"):
        order = torch.randperm(n, generator=generator)
        dist = dist[order][:, order]
    upper = torch.triu(dist, diagonal=1)
    return upper + upper.T


@functools.lru_cache(maxsize=None)
def mixed_batch(n: int, batch: int, seed: int):
    """``batch`` windows of ``n`` tokens cycling through PATTERNS: distances [B, n, n] float32,
    groups [B, n] int64 (every 3rd window padded: a suffix of invalid tokens, group 1; every 5th
    with a protected first token, group 2), merges [B] int64 (N - K, K random in each window's
    range). All on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    dist = torch.stack([window(PATTERNS[b % len(PATTERNS)], n, generator) for b in range(batch)])
    groups = torch.zeros(batch, n, dtype=torch.long)
    real = torch.randint(1, n + 1, (batch,), generator=generator)
    padded = torch.arange(batch) % 3 == 1
    groups[padded] = (torch.arange(n) >= real[padded, None]).long()
    if n > 1:
        groups[torch.arange(batch) % 5 == 2, 0] = 2
    fewest = group_counts(groups)
    k = fewest + (torch.rand(batch, generator=generator) * (n - fewest + 1)).long().clamp_max(n - fewest)
    return dist, groups, n - k


def reference(linkage: str, dist, groups, merges=None, threshold=None) -> torch.Tensor:
    """The C++ kernel's labels [B, N] on a copy of the same CPU distances."""
    return native.cluster(linkage, merges, threshold, groups, distances=dist.clone())


def on_gpu(linkage: str, dist, groups, merges=None, threshold=None, num_warps=triton_kernel.NUM_WARPS):
    """The Triton kernel's labels [B, N] (CPU) on GPU copies; K [B] passed as a strided view."""
    strided = None if merges is None else torch.stack([merges, merges], 1).to(CUDA)[:, 0]
    assert strided is None or not strided.is_contiguous()
    labels = triton_kernel.cluster(linkage, strided, threshold, groups.to(CUDA), distances=dist.to(CUDA),
                                   num_warps=num_warps)
    return labels.cpu()


def assert_same_labels(got, expected, what: str) -> None:
    bad = (got != expected).any(1).nonzero().flatten().tolist()
    assert not bad, (f"{what}: {len(bad)} of {len(got)} windows differ, first {bad[0]} "
                     f"(pattern {PATTERNS[bad[0] % len(PATTERNS)]})")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("linkage", LINKAGES)
def test_labels_equal_native_on_mixed_windows(linkage, n):
    """Random and tie-heavy windows (padding, protected tokens, a K per window): the compiled
    kernel's labels equal the C++ kernel's on the same distances, launch after launch."""
    batch = 1024 if n <= 65 else 256 if n <= 196 else 24
    dist, groups, merges = mixed_batch(n, batch, seed=n)
    expected = reference(linkage, dist, groups, merges)
    first = on_gpu(linkage, dist, groups, merges)
    assert_same_labels(first, expected, f"{linkage} N={n}")
    assert torch.equal(on_gpu(linkage, dist, groups, merges), first), "a second launch differs"


@pytest.mark.parametrize("num_warps", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("linkage", LINKAGES)
def test_every_warp_count_gives_the_same_labels_every_launch(linkage, num_warps):
    """512 mixed windows of 196 tokens (and 1024 of 15 at 1 and 16 warps, more threads than
    entries): five launches, each equal to the C++ kernel (a race shows as a difference)."""
    cases = [(196, 512)] + ([(15, 1024)] if num_warps in (1, 16) else [])
    for n, batch in cases:
        dist, groups, merges = mixed_batch(n, batch, seed=1000 + n)
        expected = reference(linkage, dist, groups, merges)
        for launch in range(5):
            got = on_gpu(linkage, dist, groups, merges, num_warps=num_warps)
            assert_same_labels(got, expected, f"{linkage} N={n} warps={num_warps} launch {launch}")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_threshold_cut_equals_native(linkage):
    """Dynamic cut at a threshold that is itself a distance of the windows (merges exactly at
    the threshold are kept): labels equal the C++ kernel's."""
    dist, groups, _ = mixed_batch(196, 256, seed=7)
    for threshold in (float(dist[0, 0, 1]), float(dist[1].median()), 0.0):
        expected = reference(linkage, dist, groups, threshold=threshold)
        assert_same_labels(on_gpu(linkage, dist, groups, threshold=threshold), expected,
                           f"{linkage} threshold {threshold}")


def test_float64_distances_equal_native():
    dist, groups, merges = mixed_batch(65, 256, seed=8)
    dist = dist.double()
    assert_same_labels(on_gpu("average", dist, groups, merges), reference("average", dist, groups, merges),
                       "average float64")


def separated_features(batch: int, n: int, channels: int, seed: int):
    """Well-separated clusters: features [B, n, C] float32 (orthonormal centres + noise 1e-3,
    so within-cluster cosine distances ~1e-6 and between clusters ~1) and K [B] (2..16)."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.randint(2, 17, (batch,), generator=generator)
    x = torch.empty(batch, n, channels)
    for b in range(batch):
        centres = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0][: int(k[b])]
        member = torch.randperm(n, generator=generator) % int(k[b])
        x[b] = centres[member] + 1e-3 * torch.randn(n, channels, generator=generator)
    return x, k


@pytest.mark.parametrize("n, batch, linkages", [(196, 64, LINKAGES), (1000, 6, ("average",))])
def test_features_path_gives_scipy_partition_on_separated_data(n, batch, linkages):
    """From features (cosine distances computed in the kernel, ``tl.dot`` on the GPU): SciPy's
    partition where distances are not near-tied."""
    x, k = separated_features(batch, n, 32, seed=n)
    for linkage in linkages:
        labels = agglomerative_clustering(x.to(CUDA), k.to(CUDA), linkage, backend="triton").cpu()
        for b in range(batch):
            expected = fcluster(scipy_linkage(pdist(x[b].double().numpy(), "cosine"), method=linkage),
                                int(k[b]), "maxclust")
            assert same_partition(labels[b].numpy(), expected), (linkage, n, b)


@pytest.mark.parametrize("channels", [4, 16, 64])
def test_features_path_equals_native_on_exact_cosines(channels):
    """+-1 features with C a power of 4: every cosine distance is exact in any summation order,
    so the features path gives the C++ kernel's labels on the GPU too."""
    generator = torch.Generator().manual_seed(channels)
    x = (torch.randint(0, 2, (128, 196, channels), generator=generator) * 2 - 1).float()
    k = torch.randint(1, 197, (128,), generator=generator)
    for linkage in LINKAGES:
        got = agglomerative_clustering(x.to(CUDA), k.to(CUDA), linkage, backend="triton").cpu()
        assert_same_labels(got, agglomerative_clustering(x, k, linkage, backend="native"), linkage)


def test_offsets_past_two_to_the_31():
    """Samples that start past element 2**31 of the input (B * N * N and B * N * C >= 2**31):
    their labels equal the C++ kernel's (32-bit offsets wrap there)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    n = 1024
    dist, groups, merges = mixed_batch(n, 3, seed=9)
    batch = 2**31 // (n * n) + 3
    pick = torch.arange(batch) % 3
    zero = torch.zeros(batch, dtype=torch.long)
    zero[-3:] = merges[pick[-3:]]  # real merges in the last three samples only (the others: one scan)
    labels = triton_kernel.cluster("average", zero.to(CUDA), None, groups.to(CUDA)[pick.to(CUDA)],
                                   distances=dist.to(CUDA)[pick.to(CUDA)])
    expected = reference("average", dist[pick[-3:]], groups[pick[-3:]], merges[pick[-3:]])
    assert_same_labels(labels[-3:].cpu(), expected, "distances past 2**31")
    del labels
    torch.cuda.empty_cache()

    n, channels = 16, 2**16  # +-1 features, C = 4**8: exact cosine distances
    generator = torch.Generator().manual_seed(10)
    x = (torch.randint(0, 2, (3, n, channels), generator=generator) * 2 - 1).float()
    k = torch.tensor([3, 5, 8])
    batch = 2**31 // (n * channels) + 3
    pick = torch.arange(batch) % 3
    merges = torch.zeros(batch, dtype=torch.long)
    merges[-3:] = n - k[pick[-3:]]
    labels = triton_kernel.cluster("single", merges.to(CUDA), None, None,
                                   features=x.to(CUDA)[pick.to(CUDA)])
    expected = agglomerative_clustering(x[pick[-3:]], k[pick[-3:]], "single", backend="native")
    assert_same_labels(labels[-3:].cpu(), expected, "features past 2**31")


def reduced_vit():
    """A small Detectron2 ViT at 320 px (padded 14 x 14 windows), ATC keep 0.5 in blocks 1-2,
    on the GPU."""
    from atc_det import apply_atc

    vit = small_vit(img_size=320, depth=3, window_block_indexes=[0, 1])
    apply_atc(vit, keep_rate=0.5, linkage="average", blocks=[1, 2])
    return vit.to(CUDA)


def test_reduced_forward_never_synchronises(monkeypatch):
    """``torch.cuda.set_sync_debug_mode("error")`` through a warmed-up reduced forward: no host
    synchronisation; both reductions run the Triton kernel (auto backend)."""
    vit = reduced_vit()
    images = torch.randn(2, 3, 320, 320, device=CUDA)
    vit_features(vit, images)
    torch.cuda.synchronize()
    calls = []
    kernel = triton_kernel.cluster
    monkeypatch.setattr(triton_kernel, "cluster", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = vit_features(vit, images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2 and torch.isfinite(out).all()


def test_cuda_graph_replay_equals_eager():
    """A reduced forward captured in a CUDA graph on static inputs (after warm-up on a side
    stream), replayed on two new images: each output equals the eager forward's."""
    vit = reduced_vit()
    static = torch.randn(2, 3, 320, 320, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            vit(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = vit(static)["last_feat"]
    outputs = []
    for seed in (1, 2):
        image = torch.randn(2, 3, 320, 320, device=CUDA, generator=torch.Generator(CUDA).manual_seed(seed))
        static.copy_(image)
        graph.replay()
        torch.cuda.synchronize()
        outputs.append(captured.clone())
        torch.testing.assert_close(outputs[-1], vit_features(vit, image), rtol=1e-5, atol=1e-5)
    assert not torch.equal(outputs[0], outputs[1])


def test_torch_compile_equals_eager():
    """``torch.compile`` of the reduced ViT on the GPU: the output equals eager's (float
    tolerance: inductor fuses the dense ops; labels come from the one clustering op)."""
    vit = reduced_vit()
    images = torch.randn(2, 3, 320, 320, device=CUDA)
    eager = vit_features(vit, images)
    compiled = torch.compile(vit)
    torch.testing.assert_close(vit_features(compiled, images), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vit_features(compiled, images * 0.5), vit_features(vit, images * 0.5),
                               rtol=1e-4, atol=1e-4)
