"""Triton GPU backend of the clustering core: one program per sample, one launch per call.

The kernel runs the rounds of :mod:`atc_det.clustering.native` (the C++ kernel) with the same tie
rules, the same round arithmetic and the same cut:

1. distances: given (upper triangle), or cosine distances ``max(1 - <x_i, x_j> / |x_i| |x_j|, 0)``
   of the features (``tl.dot`` in IEEE float32, each 16 x 16 tile once, stored on both sides);
   +inf on the diagonal and between tokens of different groups. Held in a scratch matrix
   ``[B, P, P]`` (P = N rounded up to a power of two) in global memory, read in row chunks.
2. rounds, each over all rows: every cluster's nearest neighbour (ties: smallest rank XOR rank,
   clusters ranked by first member).
   - complete / average: the mutual pairs merge (RNN); Lance-Williams updates in place (an entry
     between two merging pairs is combined over the lower pair first, as the C++ kernel does);
     merge heights made monotone.
   - single: Borůvka on the token matrix (every cluster joins its nearest cluster; the token pair
     of an edge is the smallest ``i * P + j`` at the edge's distance).
3. cut: static: the ``N - K`` lowest merges, stable by (height, round, rank), ``K`` per sample;
   dynamic: every merge with height <= threshold. Components by hooking and pointer jumping;
   clusters numbered by first member.

What is guaranteed, and what is not:

- On the same distances (``distances=``) the labels equal the C++ kernel's, bit for bit: the rounds
  only compare, take maxima and apply Lance-Williams updates, with floating-point contraction off
  on both sides (``enable_fp_fusion=False``; the C++ kernel is built with ``-ffp-contract=off``)
  and the size weights divided exactly.
- From features (``features=``) each backend computes the cosine distances itself, and the dot
  products round differently: on a GPU ``tl.dot`` compiles to one FMA chain over the channels,
  Triton's interpreter rounds once per 16-wide chunk, the C++ kernel sums in its own order. The
  distances may differ in the last bits, so from features the guarantee is SciPy's partition on
  distances that are not near-tied, not the C++ kernel's labels. (Features whose cosine distances
  are exact, e.g. +-1 entries, give the same distances everywhere, hence the same labels.)

Scratch memory per sample: the ``[P, P]`` matrix and two tables of vectors of length P, one int32
and one float, whose rows are named in :data:`INT_VECTORS` / :data:`FLOAT_VECTORS`; the launcher
sizes the tables from them and the kernel reads each row index as a constexpr global
``ROW_<name>``, as it reads the linkage codes of :data:`~atc_det.clustering.contract.LINKAGE_CODES`
(``LINKAGE_SINGLE`` ...). Per-sample offsets are 64-bit (the program id is widened to int64), so
``B * P * P`` and ``B * N * C`` may exceed 2**31. Nothing here synchronises with the host. Tests
run the kernel on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set before
``triton`` is imported); what the interpreter cannot show (races, int32 overflow, GPU rounding)
is tested on a GPU by ``tests/test_cuda.py``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from atc_det.clustering.contract import LINKAGE_CODES, TRITON_MAX_TOKENS

NUM_WARPS = 4  # warps per program unless ``cluster(..., num_warps=)`` says otherwise
WARP_CHOICES = (1, 2, 4, 8, 16, 32)
MAX_REGISTERS = 255  # per thread; without the cap ptxas spills a few bytes at N = 196
REGISTER_FILE = 65536  # 32-bit registers one program (thread block) may use, sm_80 and sm_90
# The per-sample scratch vectors (length P each), by name: its row in the int32 table
# [B, len(INT_VECTORS), P] or in the float table [B, len(FLOAT_VECTORS), P] is its index here.
INT_VECTORS = (
    "ACTIVE", "RANK", "NEAREST", "PARTNER", "IS_A",  # pair rounds (complete / average)
    "CLUSTER", "NEAREST_CLUSTER", "EDGE_PAIR", "TIE_KEY", "TREE_ROOT", "LOWEST_MEMBER",
    "NEW_INDEX",  # Borůvka rounds (single)
    "EDGE_CHILD", "EDGE_PARENT", "KEPT", "ROOT", "FIRST",  # the merges and the cut
)
FLOAT_VECTORS = (
    "NEAREST_DIST", "SIZE", "OWN_HEIGHT", "WEIGHT",  # pair rounds
    "TOKEN_MIN", "BEST",  # Borůvka rounds
    "EDGE_HEIGHT",  # the merges
)
SCRATCH_ROWS = {name: row for names in (INT_VECTORS, FLOAT_VECTORS) for row, name in enumerate(names)}
assert len(SCRATCH_ROWS) == len(INT_VECTORS) + len(FLOAT_VECTORS), "scratch vector names must be unique"
_import_error: str | None = None

try:
    import triton
    import triton.language as tl
except ImportError as error:  # a CPU-only torch build: the backend is unavailable
    triton = tl = None
    _import_error = str(error)


def available() -> bool:
    """True if Triton imports (the kernel also needs a CUDA tensor, or the interpreter)."""
    return triton is not None


def unavailable_reason() -> str | None:
    return _import_error


def interpreted() -> bool:
    """True if Triton runs kernels on CPU tensors through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_options(num_warps: int = NUM_WARPS) -> dict:
    """Compiler options of a launch with ``num_warps`` warps: no FP contraction (rounding as the
    C++ kernel), and the register cap: 255 per thread, lowered so that one program's threads fit
    an SM's 65536 registers (a program that asks for more does not launch; see
    ``benchmarks/triton_compile_report.py``)."""
    return {"enable_fp_fusion": False, "maxnreg": min(MAX_REGISTERS, REGISTER_FILE // (32 * num_warps))}


def padded_size(num_tokens: int) -> int:
    """P: N rounded up to a power of two, at least 16 (the ``tl.dot`` tile)."""
    return max(16, 1 << (max(num_tokens, 1) - 1).bit_length())


def chunk_rows(size: int) -> int:
    """Rows per chunk of the scans: about 4096 matrix entries (32 per thread of 4 warps)."""
    return max(1, min(size, 4096 // size))


if triton is not None:
    # What the kernel reads as constexpr globals (jit code reads no other globals): each scratch
    # vector's row ``ROW_<name>``, the tables' sizes and the linkage codes of the contract.
    for _name, _row in SCRATCH_ROWS.items():
        globals()[f"ROW_{_name}"] = tl.constexpr(_row)
    INT_ROWS = tl.constexpr(len(INT_VECTORS))
    FLOAT_ROWS = tl.constexpr(len(FLOAT_VECTORS))
    LINKAGE_SINGLE = tl.constexpr(LINKAGE_CODES["single"])
    LINKAGE_COMPLETE = tl.constexpr(LINKAGE_CODES["complete"])
    LINKAGE_AVERAGE = tl.constexpr(LINKAGE_CODES["average"])

    @triton.jit
    def _barrier():
        tl.debug_barrier()

    @triton.jit
    def _distances(D, X, G, b, N, C, stride_xb, stride_xn, DIST, stride_db, stride_dn,
                   FEATURES: tl.constexpr, HAS_GROUPS: tl.constexpr, P: tl.constexpr):
        """Fill the sample's scratch matrix D [P, P]: distances, +inf on the diagonal, between
        groups and past N."""
        T: tl.constexpr = 16
        inf = float("inf")
        ti = tl.arange(0, T)
        for i0 in range(0, P, T):
            rows = i0 + ti
            for j0 in range(i0, P, T):
                cols = j0 + ti
                if FEATURES:
                    dot = tl.zeros((T, T), dtype=tl.float32)
                    sq_r = tl.zeros((T,), dtype=tl.float32)
                    sq_c = tl.zeros((T,), dtype=tl.float32)
                    for c0 in range(0, C, T):
                        ch = c0 + ti
                        xr = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + ch[None, :],
                                     mask=(rows[:, None] < N) & (ch[None, :] < C), other=0.0)
                        xc = tl.load(X + b * stride_xb + cols[:, None] * stride_xn + ch[None, :],
                                     mask=(cols[:, None] < N) & (ch[None, :] < C), other=0.0)
                        dot += tl.dot(xr, tl.trans(xc), input_precision="ieee")
                        sq_r += tl.sum(xr * xr, 1)
                        sq_c += tl.sum(xc * xc, 1)
                    inv_r = tl.math.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq_r), 1e-12))
                    inv_c = tl.math.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq_c), 1e-12))
                    tile = tl.maximum(1.0 - dot * inv_r[:, None] * inv_c[None, :], 0.0)
                else:
                    tile = tl.load(DIST + b * stride_db + rows[:, None] * stride_dn + cols[None, :],
                                   mask=(rows[:, None] < N) & (cols[None, :] < N), other=inf)
                if j0 == i0:  # exactly symmetric on the diagonal tile too
                    tile = tl.minimum(tile, tl.trans(tile))
                keep = (rows[:, None] < N) & (cols[None, :] < N) & (rows[:, None] != cols[None, :])
                if HAS_GROUPS:
                    g_r = tl.load(G + b * N + rows, mask=rows < N, other=-1)
                    g_c = tl.load(G + b * N + cols, mask=cols < N, other=-2)
                    keep = keep & (g_r[:, None] == g_c[None, :])
                tile = tl.where(keep, tile, inf).to(D.dtype.element_ty)
                tl.store(D + rows[:, None] * P + cols[None, :], tile)
                tl.store(D + cols[None, :] * P + rows[:, None], tile)

    @triton.jit
    def _finished(EH, n_edges, lowest, num_merges, threshold, USE_THRESHOLD: tl.constexpr,
                  P: tl.constexpr):
        """Whether every later merge sorts after the ``num_merges`` lowest (or lies above
        ``threshold``), or no merge is left."""
        offs = tl.arange(0, P)
        if USE_THRESHOLD:
            done = lowest > threshold
        else:
            h = tl.load(EH + offs, mask=offs < n_edges, other=float("inf"))
            below = tl.sum(((h <= lowest) & (offs < n_edges)).to(tl.int32), 0)
            done = below >= num_merges
        return done | (lowest == float("inf"))

    @triton.jit
    def _lance_williams(u, v, wb, LINKAGE: tl.constexpr):
        """Distance to the union of a pair from the distances to its clusters (``wb``: weight of
        the absorbed cluster, as the C++ kernel rounds it)."""
        if LINKAGE == LINKAGE_COMPLETE:
            return tl.maximum(u, v)
        return u * (1.0 - wb) + v * wb  # LINKAGE_AVERAGE

    @triton.jit
    def _pair_rounds(D, IS, FS, EC, EP, EH, N, num_merges, threshold, LINKAGE: tl.constexpr,
                     USE_THRESHOLD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        """Complete / average linkage: RNN rounds; merges recorded in EC / EP / EH. Returns the
        number of merges."""
        offs = tl.arange(0, P)
        ro = tl.arange(0, ROWS)
        inf = float("inf")
        A, R, NN = IS + ROW_ACTIVE * P, IS + ROW_RANK * P, IS + ROW_NEAREST * P
        PART, ISA = IS + ROW_PARTNER * P, IS + ROW_IS_A * P
        ND, SZ = FS + ROW_NEAREST_DIST * P, FS + ROW_SIZE * P
        OH, W = FS + ROW_OWN_HEIGHT * P, FS + ROW_WEIGHT * P
        tl.store(A + offs, (offs < N).to(tl.int32))
        tl.store(SZ + offs, tl.full((P,), 1.0, SZ.dtype.element_ty))
        tl.store(OH + offs, tl.full((P,), -inf, OH.dtype.element_ty))
        n_edges = 0
        go = N > 1
        while go:
            _barrier()
            act = tl.load(A + offs) != 0
            rank = tl.cumsum(act.to(tl.int32), 0) - 1
            tl.store(R + offs, rank)
            _barrier()
            for r0 in range(0, P, ROWS):  # nearest neighbour of every row
                rows = r0 + ro
                r_act = tl.load(A + rows) != 0  # merged-away rows and columns are not read
                d = tl.load(D + rows[:, None] * P + offs[None, :], mask=r_act[:, None] & act[None, :],
                            other=inf)
                low = tl.min(d, 1)
                key = tl.where((d == low[:, None]) & act[None, :],
                               tl.load(R + rows)[:, None] ^ rank[None, :], P)
                best = tl.min(key, 1)
                nearest = tl.min(tl.where(key == best[:, None], offs[None, :], P), 1)
                tl.store(NN + rows, tl.where(low == inf, rows, nearest))
                tl.store(ND + rows, low)
            _barrier()
            nd = tl.load(ND + offs)
            nn = tl.load(NN + offs)
            lowest = tl.min(tl.where(act, nd, inf), 0)
            done = _finished(EH, n_edges, lowest, num_merges, threshold, USE_THRESHOLD, P)
            go = ~done
            if go:
                mutual = (tl.load(NN + nn) == offs) & (nn != offs) & act
                is_b = mutual & (nn < offs)
                is_a = mutual & (nn > offs)
                own = tl.load(OH + offs)
                size = tl.load(SZ + offs)
                size_partner = tl.load(SZ + nn)
                height = tl.maximum(nd, tl.maximum(own, tl.load(OH + nn)))
                # IEEE division (in float64: correctly rounded for float32 sizes as well).
                share = size.to(tl.float64) / (size + size_partner).to(tl.float64)
                wb = 1.0 - share.to(size.dtype)
                _barrier()
                position = n_edges + tl.cumsum(is_b.to(tl.int32), 0) - 1  # in rank order of b
                tl.store(EC + position, offs, mask=is_b)
                tl.store(EP + position, nn, mask=is_b)
                tl.store(EH + position, height, mask=is_b)
                n_edges += tl.sum(is_b.to(tl.int32), 0)
                tl.store(OH + offs, height, mask=is_a)
                tl.store(SZ + offs, size + size_partner, mask=is_a)
                tl.store(W + offs, wb)
                tl.store(PART + offs, tl.where(is_a, nn, offs))
                tl.store(ISA + offs, is_a.to(tl.int32))
                tl.store(A + offs, (act & ~is_b).to(tl.int32))
                _barrier()
                c_act = tl.load(A + offs) != 0
                c_a = tl.load(ISA + offs) != 0
                c_p = tl.load(PART + offs)
                c_w = tl.load(W + offs)
                for r0 in range(0, P, ROWS):  # rows and columns of the merged pairs, in place
                    rows = r0 + ro
                    r_act = tl.load(A + rows) != 0
                    r_a = tl.load(ISA + rows) != 0
                    r_p = tl.load(PART + rows)
                    r_w = tl.load(W + rows)
                    # Only the entries that change are read: rows and columns of the pairs.
                    update = (r_act[:, None] & c_act[None, :] & (r_a[:, None] | c_a[None, :])
                              & (rows[:, None] != offs[None, :]))
                    d_xy = tl.load(D + rows[:, None] * P + offs[None, :], mask=update, other=0.0)
                    d_py = tl.load(D + r_p[:, None] * P + offs[None, :], mask=update & r_a[:, None],
                                   other=0.0)
                    d_xq = tl.load(D + rows[:, None] * P + c_p[None, :], mask=update & c_a[None, :],
                                   other=0.0)
                    d_pq = tl.load(D + r_p[:, None] * P + c_p[None, :],
                                   mask=update & r_a[:, None] & c_a[None, :], other=0.0)
                    row_wb = r_w[:, None]
                    col_wb = c_w[None, :]
                    r1 = _lance_williams(d_xy, d_py, row_wb, LINKAGE)  # row pair first
                    r2 = _lance_williams(d_xq, d_pq, row_wb, LINKAGE)
                    c1 = _lance_williams(d_xy, d_xq, col_wb, LINKAGE)  # column pair first
                    c2 = _lance_williams(d_py, d_pq, col_wb, LINKAGE)
                    both = r_a[:, None] & c_a[None, :]
                    lower_row = rows[:, None] < offs[None, :]
                    value = tl.where(
                        both,
                        tl.where(lower_row, _lance_williams(r1, r2, col_wb, LINKAGE),
                                 _lance_williams(c1, c2, row_wb, LINKAGE)),
                        tl.where(r_a[:, None], r1, c1))
                    tl.store(D + rows[:, None] * P + offs[None, :], value, mask=update)
        return n_edges

    @triton.jit
    def _pointer_jump(PTR, P: tl.constexpr, LOG_P: tl.constexpr):
        """PTR[i] <- root of i in the forest PTR (roots point at themselves; depth < 2**LOG_P)."""
        offs = tl.arange(0, P)
        for _ in tl.static_range(LOG_P):
            _barrier()  # earlier stores to PTR are visible
            pointer = tl.load(PTR + offs)
            root = tl.load(PTR + pointer)
            _barrier()  # every thread has read before any thread writes
            tl.store(PTR + offs, root)
        _barrier()

    @triton.jit
    def _boruvka_rounds(D, IS, FS, EC, EP, EH, N, num_merges, threshold,
                        USE_THRESHOLD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr,
                        LOG_P: tl.constexpr):
        """Single linkage: Borůvka rounds on the token matrix; merges (token pairs) recorded in
        EC / EP / EH. Returns the number of merges."""
        offs = tl.arange(0, P)
        ro = tl.arange(0, ROWS)
        inf = float("inf")
        BIG = 2147483647
        CL, NN, PAIR = IS + ROW_CLUSTER * P, IS + ROW_NEAREST_CLUSTER * P, IS + ROW_EDGE_PAIR * P
        TK, ROOT, LOW = IS + ROW_TIE_KEY * P, IS + ROW_TREE_ROOT * P, IS + ROW_LOWEST_MEMBER * P
        NI = IS + ROW_NEW_INDEX * P
        TM, BEST = FS + ROW_TOKEN_MIN * P, FS + ROW_BEST * P
        tl.store(CL + offs, tl.where(offs < N, offs, -1))
        n_edges = 0
        n = N
        go = N > 1
        while go:
            _barrier()
            cluster = tl.load(CL + offs)
            for r0 in range(0, P, ROWS):  # each token's minimum over the other clusters
                rows = r0 + ro
                own = tl.load(CL + rows)
                d = tl.load(D + rows[:, None] * P + offs[None, :])
                d = tl.where(cluster[None, :] != own[:, None], d, inf)
                tl.store(TM + rows, tl.min(d, 1))
            _barrier()
            token_min = tl.load(TM + offs)
            for c0 in range(0, P, ROWS):  # each cluster's nearest distance
                ids = c0 + ro
                tl.store(BEST + ids, tl.min(tl.where(cluster[None, :] == ids[:, None],
                                                     token_min[None, :], inf), 1))
            _barrier()
            for r0 in range(0, P, ROWS):  # tie keys: (rank XOR rank, pair) at that distance
                rows = r0 + ro
                own = tl.load(CL + rows)
                best = tl.load(BEST + own, mask=own >= 0, other=inf)
                d = tl.load(D + rows[:, None] * P + offs[None, :])
                tie = (d == best[:, None]) & (cluster[None, :] != own[:, None]) & (best[:, None] != inf)
                key = (own[:, None] ^ cluster[None, :]) * (P * P) + rows[:, None] * P + offs[None, :]
                tl.store(TK + rows, tl.min(tl.where(tie, key, BIG), 1))
            _barrier()
            tie_key = tl.load(TK + offs)
            for c0 in range(0, P, ROWS):  # each cluster's nearest cluster and edge pair
                ids = c0 + ro
                key = tl.min(tl.where(cluster[None, :] == ids[:, None], tie_key[None, :], BIG), 1)
                found = key != BIG
                tl.store(NN + ids, tl.where(found, ids ^ (key // (P * P)), ids))
                tl.store(PAIR + ids, tl.where(found, key % (P * P), 0))
            _barrier()
            best = tl.load(BEST + offs)
            lowest = tl.min(tl.where(offs < n, best, inf), 0)
            done = _finished(EH, n_edges, lowest, num_merges, threshold, USE_THRESHOLD, P)
            go = ~done
            if go:
                nn = tl.load(NN + offs)
                mutual = (tl.load(NN + nn) == offs) & (nn != offs)
                edge = (offs < n) & (best != inf) & ~(mutual & (nn > offs))
                pair = tl.load(PAIR + offs)
                position = n_edges + tl.cumsum(edge.to(tl.int32), 0) - 1
                tl.store(EC + position, pair // P, mask=edge)
                tl.store(EP + position, pair % P, mask=edge)
                tl.store(EH + position, best, mask=edge)
                n_edges += tl.sum(edge.to(tl.int32), 0)
                # The edges' trees (a forest under the tie rule), numbered by their lowest rank.
                tl.store(ROOT + offs, tl.where(edge, nn, offs))
                tl.store(LOW + offs, tl.full((P,), P, tl.int32))
                _pointer_jump(ROOT, P, LOG_P)
                root = tl.load(ROOT + offs)
                tl.atomic_min(LOW + root, offs, mask=offs < n)
                _barrier()
                lowest_member = tl.load(LOW + root)
                is_lowest = (lowest_member == offs) & (offs < n)
                tl.store(NI + offs, tl.cumsum(is_lowest.to(tl.int32), 0) - 1)
                _barrier()
                new_index = tl.load(NI + lowest_member, mask=offs < n, other=0)
                _barrier()
                tl.store(NI + offs, new_index)
                _barrier()
                tl.store(CL + offs, tl.load(NI + cluster, mask=cluster >= 0, other=0), mask=cluster >= 0)
                n = tl.sum(is_lowest.to(tl.int32), 0)
                go = n > 1
        return n_edges

    @triton.jit
    def _cluster_kernel(X, DIST, G, K, LABELS, D, IS, FS, N, C, stride_xb, stride_xn, stride_db,
                        stride_dn, THRESHOLD, LINKAGE: tl.constexpr, FEATURES: tl.constexpr,
                        HAS_GROUPS: tl.constexpr, USE_THRESHOLD: tl.constexpr, P: tl.constexpr,
                        ROWS: tl.constexpr, LOG_P: tl.constexpr):
        """One sample per program: distances, rounds, cut, first-member labels."""
        b = tl.program_id(0).to(tl.int64)  # every per-sample offset in 64 bits
        offs = tl.arange(0, P)
        ro = tl.arange(0, ROWS)
        D = D + b * P * P
        IS = IS + b * (INT_ROWS * P)
        FS = FS + b * (FLOAT_ROWS * P)
        EC, EP, KEPT = IS + ROW_EDGE_CHILD * P, IS + ROW_EDGE_PARENT * P, IS + ROW_KEPT * P
        ROOT, FIRST = IS + ROW_ROOT * P, IS + ROW_FIRST * P
        EH = FS + ROW_EDGE_HEIGHT * P
        _distances(D, X, G, b, N, C, stride_xb, stride_xn, DIST, stride_db, stride_dn, FEATURES,
                   HAS_GROUPS, P)
        if USE_THRESHOLD:
            threshold = tl.load(THRESHOLD)
            num_merges = 0
        else:
            threshold = 0.0
            num_merges = tl.load(K + b)
        _barrier()
        if LINKAGE == LINKAGE_SINGLE:
            n_edges = _boruvka_rounds(D, IS, FS, EC, EP, EH, N, num_merges, threshold,
                                      USE_THRESHOLD, P, ROWS, LOG_P)
        else:
            n_edges = _pair_rounds(D, IS, FS, EC, EP, EH, N, num_merges, threshold, LINKAGE,
                                   USE_THRESHOLD, P, ROWS)
        _barrier()
        # The cut: the num_merges lowest merges by (height, position), or those <= threshold.
        heights = tl.load(EH + offs, mask=offs < n_edges, other=float("inf"))
        for e0 in range(0, P, ROWS):
            edges = e0 + ro
            if USE_THRESHOLD:
                kept = tl.load(EH + edges, mask=edges < n_edges, other=float("inf")) <= threshold
            else:
                h = tl.load(EH + edges, mask=edges < n_edges, other=float("inf"))
                before = (heights[None, :] < h[:, None]) | (
                    (heights[None, :] == h[:, None]) & (offs[None, :] < edges[:, None]))
                kept = tl.sum((before & (offs[None, :] < n_edges)).to(tl.int32), 1) < num_merges
            tl.store(KEPT + edges, (kept & (edges < n_edges)).to(tl.int32))
        tl.store(ROOT + offs, offs)
        _barrier()
        kept = tl.load(KEPT + offs) != 0
        child = tl.load(EC + offs, mask=kept, other=0)
        parent = tl.load(EP + offs, mask=kept, other=0)
        joined = N > 0
        while joined:  # hook the higher root onto the lower one, then jump to the roots
            root_c = tl.load(ROOT + child)
            root_p = tl.load(ROOT + parent)
            apart = kept & (root_c != root_p)
            joined = tl.sum(apart.to(tl.int32), 0) > 0
            _barrier()
            tl.atomic_min(ROOT + tl.maximum(root_c, root_p), tl.minimum(root_c, root_p), mask=apart)
            _pointer_jump(ROOT, P, LOG_P)
        root = tl.load(ROOT + offs)
        is_root = (root == offs) & (offs < N)
        tl.store(FIRST + offs, tl.cumsum(is_root.to(tl.int32), 0) - 1)
        _barrier()
        labels = tl.load(FIRST + root)
        tl.store(LABELS + b * N + offs, labels.to(tl.int64), mask=offs < N)


def cluster(linkage: str, num_merges: Tensor | None, threshold: float | None, groups: Tensor | None,
            *, distances: Tensor | None = None, features: Tensor | None = None,
            num_warps: int = NUM_WARPS) -> Tensor:
    """Labels [B, N] int64 (first-member order), from exactly one of ``distances`` [B, N, N]
    (symmetric; the upper triangle is used) or ``features`` [B, N, C] (float32; cosine distances
    inside). ``num_merges`` [B] int (static: the N - K lowest merges per sample) or ``threshold``;
    ``groups`` [B, N] int: tokens of different groups never merge. ``num_warps``: warps per
    program (one of :data:`WARP_CHOICES`). All on one device: CUDA, or CPU under
    ``TRITON_INTERPRET=1``. One kernel launch; no host synchronisation."""
    if triton is None:
        raise RuntimeError(f"backend='triton' needs triton (it comes with PyTorch's CUDA builds): "
                           f"{_import_error}")
    if num_warps not in WARP_CHOICES:
        raise ValueError(f"num_warps must be one of {WARP_CHOICES}, got {num_warps!r}")
    data = features if distances is None else distances
    if data.device.type != "cuda" and not interpreted():
        raise ValueError(f"backend='triton' runs on CUDA tensors (or on CPU tensors with "
                         f"TRITON_INTERPRET=1), got {data.device}; use backend='native' or 'auto'")
    batch, num_tokens = data.shape[:2]
    if num_tokens > TRITON_MAX_TOKENS:
        raise ValueError(f"backend='triton' supports at most {TRITON_MAX_TOKENS} tokens per sample, got "
                         f"{num_tokens}; use backend='torch' (or 'auto')")
    labels = torch.empty(batch, num_tokens, dtype=torch.long, device=data.device)
    if batch == 0:
        return labels
    size = padded_size(num_tokens)
    dtype = torch.float32 if features is not None else data.dtype
    if features is not None and features.dtype != torch.float32:
        raise TypeError(f"backend='triton' computes cosine distances from float32 features, got "
                        f"{features.dtype}; pass float32 features or distances")
    device = data.device
    scratch = torch.empty(batch, size, size, dtype=dtype, device=device)
    int_scratch = torch.empty(batch, len(INT_VECTORS), size, dtype=torch.int32, device=device)
    float_scratch = torch.empty(batch, len(FLOAT_VECTORS), size, dtype=dtype, device=device)
    data = data.contiguous()
    dummy = scratch  # pointer for the unused one of X / DIST / G / K
    # The kernel reads K [B] and groups [B, N] as dense int32 (an expanded or strided K is copied).
    merges = dummy if num_merges is None else num_merges.to(
        device=device, dtype=torch.int32, non_blocking=True).contiguous()
    group_ids = dummy if groups is None else groups.to(torch.int32).contiguous()
    options = {} if interpreted() else launch_options(num_warps)
    _cluster_kernel[(batch,)](
        data if features is not None else dummy, data if distances is not None else dummy,
        group_ids, merges, labels, scratch, int_scratch, float_scratch, num_tokens,
        data.shape[2] if features is not None else 0,
        data.stride(0) if features is not None else 0, data.stride(1) if features is not None else 0,
        data.stride(0) if distances is not None else 0, data.stride(1) if distances is not None else 0,
        dummy if threshold is None else torch.full((1,), threshold, dtype=dtype, device=device),
        LINKAGE=LINKAGE_CODES[linkage], FEATURES=features is not None, HAS_GROUPS=groups is not None,
        USE_THRESHOLD=threshold is not None, P=size, ROWS=chunk_rows(size), LOG_P=size.bit_length(),
        num_warps=num_warps, **options)
    return labels
