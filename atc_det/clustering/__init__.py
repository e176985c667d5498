"""The clustering core: exact agglomerative token clustering (ATC), batched, with no Detectron2
import. One module per part:

- :mod:`~atc_det.clustering.contract`: the method contract and the rules every method shares
  (checks, token groups, first-member labels, cosine distances) and the backends' constants;
- :mod:`~atc_det.clustering.dispatch`: :func:`agglomerative_clustering` and its registered op;
- :mod:`~atc_det.clustering.torch_rounds`: the torch backend (RNN and Borůvka rounds);
- :mod:`~atc_det.clustering.native`: the C++ backend (``csrc/rnn_rounds.cpp``);
- :mod:`~atc_det.clustering.triton_kernel`: the Triton backend (imports triton; GPU tensors).
"""

from atc_det.clustering.contract import (
    BACKENDS,
    LINKAGES,
    check_tokens,
    cosine_distances,
    first_member_labels,
    relabel_by_first_member,
    token_groups,
)
from atc_det.clustering.dispatch import agglomerative_clustering, clustering_op

__all__ = ["BACKENDS", "LINKAGES", "agglomerative_clustering", "check_tokens",
           "clustering_op", "cosine_distances", "first_member_labels", "relabel_by_first_member",
           "token_groups"]
