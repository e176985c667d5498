import math

import pytest
import torch

from atc_det.clustering import agglomerative_clustering
from atc_det.merge import compose_source, merge_tokens, unmerge_tokens
from atc_det.reduction import cluster_attention_bias


def _loop_merge(x, labels, k, size):
    """Straightforward per-cluster loop, independent of the scatter implementation."""
    out = torch.zeros(x.shape[0], k, x.shape[2], dtype=x.dtype)
    out_size = torch.zeros(x.shape[0], k, dtype=x.dtype)
    for b in range(x.shape[0]):
        for c in range(k):
            members = [i for i in range(x.shape[1]) if int(labels[b, i]) == c]
            weights = [float(size[b, i]) for i in members]
            out_size[b, c] = sum(weights)
            for i, w in zip(members, weights):
                out[b, c] += w * x[b, i]
            out[b, c] /= out_size[b, c]
    return out, out_size


def test_merge_equals_weighted_loop():
    torch.manual_seed(0)
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    size = torch.randint(1, 5, (3, 9)).double()
    labels = agglomerative_clustering(x, 4, "average")
    merged, merged_size = merge_tokens(x, labels, 4, size)
    ref, ref_size = _loop_merge(x, labels, 4, size)
    torch.testing.assert_close(merged, ref)
    torch.testing.assert_close(merged_size, ref_size)


def test_merge_without_size_counts_members():
    labels = torch.tensor([[0, 1, 0, 2, 0]])
    x = torch.arange(5.0).reshape(1, 5, 1)
    merged, size = merge_tokens(x, labels, 3)
    assert size.tolist() == [[3.0, 1.0, 1.0]]
    assert merged[0, :, 0].tolist() == [(0 + 2 + 4) / 3, 1.0, 3.0]


def test_identity_merge_unmerge_roundtrip():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 5)
    labels = agglomerative_clustering(x, 7)  # K = N: every token its own cluster
    merged, size = merge_tokens(x, labels, 7)
    assert torch.equal(size, torch.ones(2, 7))
    torch.testing.assert_close(unmerge_tokens(merged, labels), x)


def test_unmerge_gives_every_member_its_cluster_mean():
    torch.manual_seed(2)
    x = torch.randn(2, 12, 3)
    labels = agglomerative_clustering(x, 5, "complete")
    merged, _ = merge_tokens(x, labels, 5)
    back = unmerge_tokens(merged, labels)
    for b in range(2):
        for i in range(12):
            members = labels[b] == labels[b, i]
            torch.testing.assert_close(back[b, i], x[b, members].mean(0))


def test_empty_cluster_is_zero_with_masked_bias():
    merged, size = merge_tokens(torch.ones(1, 2, 3), torch.tensor([[0, 0]]), 2)
    assert merged[0, 1].abs().sum() == 0 and size.tolist() == [[2.0, 0.0]]
    assert cluster_attention_bias(size, prop_attn=True)[0, 1] == -math.inf
    # Without proportional attention: no bias for the used slot, the empty one still masked.
    assert cluster_attention_bias(size, prop_attn=False).tolist() == [[0.0, -math.inf]]


def test_size_bias_equals_duplicated_keys():
    """Attention over merged keys with log-size bias equals attention over the duplicated keys."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    size = torch.tensor([[2.0, 1.0, 3.0]])
    bias = cluster_attention_bias(size, prop_attn=True)
    assert bias.shape == (1, 3)
    out = (q @ k.mT + bias[:, None, :]).softmax(-1) @ v
    repeat = torch.tensor([0, 0, 1, 2, 2, 2])
    ref = (q @ k[:, repeat].mT).softmax(-1) @ v[:, repeat]
    torch.testing.assert_close(out, ref)


def test_compose_source_over_two_reductions():
    torch.manual_seed(4)
    x = torch.randn(2, 16, 6)
    labels1 = agglomerative_clustering(x, 10)
    merged, size = merge_tokens(x, labels1, 10)
    labels2 = agglomerative_clustering(merged, 4)
    source = compose_source(compose_source(None, labels1), labels2)
    assert source.shape == (2, 16)
    merged2, size2 = merge_tokens(merged, labels2, 4, size)
    # Unmerging with the composed source equals unmerging the two reductions one after the other.
    stepwise = unmerge_tokens(unmerge_tokens(merged2, labels2), labels1)
    torch.testing.assert_close(unmerge_tokens(merged2, source), stepwise, rtol=0, atol=0)
    # The merged-twice token equals the size-weighted mean of its original positions.
    for b in range(2):
        for c in range(4):
            torch.testing.assert_close(merged2[b, c], x[b, source[b] == c].mean(0))
            assert size2[b, c] == (source[b] == c).sum()


def test_merge_rejects_bad_label_shape():
    with pytest.raises(ValueError, match="labels"):
        merge_tokens(torch.ones(1, 3, 2), torch.zeros(1, 4, dtype=torch.long), 1)


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_merge_rejects_labels_outside_0_to_k_minus_1(bad):
    """One clear error naming the labels and the valid range (scatter_add alone raises an index
    RuntimeError on CPU, a device-side assert on CUDA)."""
    labels = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    labels[1, 2] = bad
    low, high = min(0, bad), max(2, bad)
    with pytest.raises(ValueError, match=rf"labels must lie in 0\.\.2 .*got labels in {low}\.\.{high}$"):
        merge_tokens(torch.ones(2, 4, 5), labels, 3)


def test_merge_accepts_empty_inputs():
    merged, size = merge_tokens(torch.ones(0, 4, 2), torch.zeros(0, 4, dtype=torch.long), 3)
    assert merged.shape == (0, 3, 2) and size.shape == (0, 3)
