"""torch.ops.ddimgmm.thin_svd (docs/design.md 1.4) against LAPACK, and the GMM initialisation built on it.

Oracles: torch.linalg.svd in float64 (up to column signs), orthonormality, span, singular-value order, the
sign convention of reference.thin_svd, and the GMM identities of docs/design.md 1.3 (eq. 8, VUB table).
"""

import math

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference
from tests.helpers import DEVICES, assert_close

# (S, D, K): K = 1, K = D - 1, both fused-route bucket edges (K = 8, 17, 32) and the BLAS route (K = 40).
SHAPES = [(1, 5, 1), (3, 64, 8), (2, 9, 8), (4, 200, 17), (2, 33, 32), (2, 300, 40), (1, 41, 40), (2, 20000, 4)]
DTYPES = [torch.float32, torch.float64]


def _gaussian(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


def _lapack_u(A: torch.Tensor) -> torch.Tensor:
    """float64 LAPACK U of A with the reference's sign convention, on the CPU."""
    return reference.thin_svd(A.detach().to("cpu", torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_lapack_and_is_orthonormal(shape, dtype, device):
    A = _gaussian(shape, dtype, device)
    U = dg.thin_svd(A)
    assert U.shape == A.shape and U.dtype == dtype and U.device == A.device
    expected = _lapack_u(A)
    # Same signs by convention, so plain closeness; the gap between random singular values bounds how
    # well any method (LAPACK in float32 included) determines the vectors, hence the scale.
    assert_close(U, expected, scale=10)
    U64, K = U.to("cpu", torch.float64), shape[2]
    gram_error = torch.linalg.matrix_norm(U64.mT @ U64 - torch.eye(K, dtype=torch.float64))
    assert gram_error.max() <= (1e-5 if dtype == torch.float32 else 1e-12)
    # span: U U^T A = A
    O64 = A.to("cpu", torch.float64)
    assert_close(U64 @ (U64.mT @ O64), O64, dtype=dtype, scale=10)


@pytest.mark.parametrize("device", DEVICES)
def test_order_and_sign_convention(device):
    # Known singular values, deliberately out of order, on a random orthonormal basis.
    D, K = 50, 6
    Q = torch.linalg.qr(_gaussian((2, D, K), torch.float64, "cpu")).Q
    sigma = torch.tensor([0.5, 3.0, 1.0, 7.0, 2.0, 0.1], dtype=torch.float64)
    A = (Q * sigma).to(device)
    U = dg.thin_svd(A).cpu()
    order = sigma.argsort(descending=True)
    # U's columns are Q's in decreasing singular value, up to sign; the sign makes the largest |entry|
    # positive.
    assert_close(U.abs(), Q[:, :, order].abs())
    pivot = torch.gather(U, 1, U.abs().argmax(1, keepdim=True))
    assert (pivot > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sign_ties_take_the_first_entry(device):
    # Column [-1, 1] / sqrt(2): both entries have the largest magnitude, the first decides -> [1, -1].
    A = torch.tensor([[[-1.0], [1.0]]], dtype=torch.float64, device=device)
    U = dg.thin_svd(A).cpu()
    assert_close(U, torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64) / 2**0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_sign_ties_across_row_chunks(device):
    # D = 5000 spans three of the CUDA kernel's 2048-row chunks: the tied largest entries of column 0 sit in
    # the first and the last chunk, so the first (negative) must decide across chunks, and column 1's
    # deciding entry is in a middle chunk. Checked to fail on CUDA with the cross-chunk merge keeping the
    # last chunk on ties (">=" in fix_signs) -- not yet run on a GPU -- and on CPU with ">=" in the CPU
    # kernel's merge of its row chunks (4096 rows: D = 5000 is two).
    D = 5000
    A = torch.zeros(1, D, 2, dtype=torch.float64)
    A[0, :, 0] = 1e-3
    A[0, 100, 0], A[0, 4000, 0] = -1.0, 1.0
    A[0, :, 1] = torch.linspace(-1e-3, 1e-3, D, dtype=torch.float64)
    A[0, 2500, 1] = -0.5
    A[0, 100, 1] = A[0, 4000, 1] = 0.0  # rows 100 and 4000 of U are then +-(the same value): an exact tie
    U = dg.thin_svd(A.to(device)).cpu()
    assert_close(U, _lapack_u(A))
    assert U[0, 100, 0] > 0 and U[0, 4000, 0] < 0 and U[0, 2500, 1] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_more_matrices_than_a_grid_dimension(device):
    # S = 65537 > 65535 (a CUDA grid's y extent): the CUDA kernel runs in slabs; the matrices past the first
    # slab must be as right as the first ones. Mutation to check on a GPU (none lent yet): the slab offset
    # left off the output pointer, so the last two matrices' U stays unwritten.
    A = _gaussian((65537, 6, 2), torch.float32, "cpu")
    U = dg.thin_svd(A.to(device)).cpu()
    picks = [0, 65534, 65535, 65536]
    assert_close(U[picks], _lapack_u(A[picks]), scale=10)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_independent_of_thread_count(device):
    A = _gaussian((3, 9000, 5), torch.float32, device)
    first = dg.thin_svd(A)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dg.thin_svd(A)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, dg.thin_svd(A))
    assert torch.equal(first, single)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    A = _gaussian((4, 8, 100), torch.float64, device).transpose(1, 2)
    assert_close(dg.thin_svd(A), _lapack_u(A))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 16, 4), (3, 16, 0)])
def test_empty(shape, device):
    U = dg.thin_svd(torch.empty(shape, device=device))
    assert U.shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 12, 3), (2, 80, 40)])
def test_opcheck(shape, device):
    torch.library.opcheck(torch.ops.ddimgmm.thin_svd, (_gaussian(shape, torch.float32, device),))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [3, 40])
def test_rank_deficient_raises(K, device):
    A = _gaussian((3, 60, K), torch.float64, device)
    A[1, :, -1] = A[1, :, 0] * 2  # A[1] has rank K - 1
    with pytest.raises(RuntimeError, match=r"O\[1\] is numerically rank-deficient"):
        torch.ops.ddimgmm.thin_svd(A)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [3, 40])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad, K, device):
    A = _gaussian((2, 60, K), torch.float32, device)
    A[1, 7, 1] = bad
    with pytest.raises(RuntimeError, match=r"O must be finite; O\[1\]"):
        torch.ops.ddimgmm.thin_svd(A)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "A, error, message",
    [
        (torch.zeros(2, 3, 4), ValueError, "K <= D"),
        (torch.zeros(3, 4), ValueError, r"shape \[S, D, K\]"),
        (torch.zeros(2, 5, 3, dtype=torch.int64), TypeError, "O must have a floating dtype"),
        (torch.zeros(2, 5, 3, dtype=torch.float16), TypeError, "O must be float32 or float64"),
    ],
)
def test_bad_arguments(A, error, message, device):
    with pytest.raises(error, match=message):
        dg.thin_svd(A.to(device))
    with pytest.raises(RuntimeError, match="thin_svd: O"):  # the op checks on its own too
        torch.ops.ddimgmm.thin_svd(A.to(device))


# ---------------------------------------------------------------------------------------------------------
# GMM initialisation through the op
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["ortho", "ortho-vub", "ortho-vub*"])
@pytest.mark.parametrize("uniform_priors", [True, False])
def test_gmm_matches_reference(variant, uniform_priors, device):
    dim, K, steps = 300, 5, 4
    gmm = dg.GMM.create(
        dim,
        K,
        steps,
        scale=0.7,
        variant=variant,
        uniform_priors=uniform_priors,
        seed=3,
        device=device,
        dtype=torch.float64,
    )
    base, shared = (variant.rstrip("*"), variant.endswith("*"))
    expected = reference.gmm_parameters(
        dim, K, steps, 0.7, base, shared, uniform_priors, seed=3, dtype=torch.float64, thin_svd_fn=reference.thin_svd
    )
    for actual, ref in zip((gmm.priors, gmm.offsets, gmm.var_offsets), expected, strict=False):
        assert_close(actual, ref)
    # eq. 8, exactly up to float64 rounding of the centring
    mean = (gmm.priors[:, :, None] * gmm.offsets).sum(1)
    assert mean.abs().max() <= 1e-15
    if base == "ortho-vub":
        ascending = gmm.priors.sort(-1).values
        table = 0.7**2 * ascending[:, None, :] / (K * gmm.priors[:, :, None])
        assert_close(gmm.var_offsets, table)
        if uniform_priors:
            assert_close(gmm.var_offsets, torch.full_like(gmm.var_offsets, 0.7**2 / K))


def _conditioned(cond, D=300, K=8, scale=1.0, dtype=torch.float64, seed=0):
    """[1, D, K] with singular values log-spaced from 1 to 1 / cond, times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -math.log10(cond), K, dtype=torch.float64)
    return (scale * (U * s) @ V.T)[None].to(dtype)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6, 1e9])
def test_accuracy_at_any_condition_on_cpu(cond):
    # The Gram route alone loses ~eps cond^2 (U off LAPACK's by 2.5e-11 at cond 1e4, 1.9e-8 at 1e6, refused
    # beyond); sets past cond 1e3 go to LAPACK. Checked to fail with the fallback removed.
    A = _conditioned(cond)
    U = dg.thin_svd(A)
    assert_close(U, dg.reference.thin_svd(A), kind="f64_svd")
    assert (U[0].T @ U[0] - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_and_huge_magnitudes(dtype):
    # Scaling each matrix before the Gram: a full-rank 1e-170 matrix is not "rank-deficient" (its Gram would
    # underflow); U does not depend on the scale. Checked to fail without the scaling.
    scale = 1e-170 if dtype == torch.float64 else 1e-30
    A = _conditioned(1e2, scale=scale, dtype=dtype)
    kind = "f32_step" if dtype == torch.float32 else "f64_abs"
    assert_close(dg.thin_svd(A), dg.thin_svd(A / scale), kind=kind)


def test_truly_rank_deficient_and_non_finite_raise_value_error():
    A = _gaussian((3, 60, 3), torch.float64, "cpu")
    A[1, :, 2] = 2 * A[1, :, 0]
    with pytest.raises(ValueError, match=r"O\[1\] is rank-deficient"):
        dg.thin_svd(A)
    A = _gaussian((3, 60, 3), torch.float64, "cpu")
    A[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"O must be finite; O\[2\]"):
        dg.thin_svd(A)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [8, 40])
def test_op_hands_ill_conditioned_sets_to_lapack(K, dtype):
    # The CPU op itself reads each set's condition from its Gram's eigenvalues and recomputes sets past
    # cond 1e3 (float64; 1e4 float32) by LAPACK, on both routes; the well-conditioned set keeps the Gram
    # route. The float64 cases checked to fail with kGramMaxCond raised to 1e300 (the Gram U is then off
    # LAPACK's by ~1e-9); float32's tolerance cannot see that.
    cond = 1e5
    A = torch.cat([_conditioned(cond, K=K, seed=1), _gaussian((1, 300, K), torch.float64, "cpu")]).to(dtype)
    U = torch.ops.ddimgmm.thin_svd(A)
    expected = reference.thin_svd(A.double()).to(dtype)
    assert_close(U[0], expected[0], kind="f64_svd" if dtype == torch.float64 else "f32_step")
    assert_close(U[1], expected[1], scale=10)


@pytest.mark.parametrize("K", [8, 40])
def test_op_scales_matrices_whose_gram_would_over_or_underflow(K):
    # The op scales a matrix whose Gram would under- or overflow by a power of two before the Gram (so
    # dg.thin_svd needs no pass of its own); every later step is scale-free, so 2^+-565 O gives U of O to
    # the bit. Checked to fail with the scaling removed (rank-deficient and non-finite errors).
    A = _conditioned(1e2, K=K)
    U = torch.ops.ddimgmm.thin_svd(A)
    for scale in (2.0**-565, 2.0**565):
        assert torch.equal(torch.ops.ddimgmm.thin_svd(A * scale), U)
    assert_close(torch.ops.ddimgmm.thin_svd(A * 1e-170), U, kind="f64_abs")


def test_schedules_give_the_same_bits():
    # With 4 threads [8, 9000, 5] runs stage by stage over (matrix, row chunk) items; with 1 thread each
    # matrix goes whole through every stage. Same chunks, partial sums added in the same order: the same
    # bits. Checked to fail with the item schedule adding its first Gram's chunks in reverse order.
    A = _gaussian((8, 9000, 5), torch.float64, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        by_item = torch.ops.ddimgmm.thin_svd(A)
        torch.set_num_threads(1)
        by_matrix = torch.ops.ddimgmm.thin_svd(A)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(by_item, by_matrix)
