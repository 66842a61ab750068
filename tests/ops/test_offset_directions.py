"""ddimgmm::offset_directions draws the GMM direction matrices of the reference's random stream."""

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as ref
from tests.helpers import assert_close


@pytest.mark.parametrize("shape", [(3, 10, 3), (2, 7, 1), (1, 5, 4), (0, 4, 2), (2, 3, 0)])
@pytest.mark.parametrize("seed", [0, 2**40 + 7])
def test_offset_directions_equal_the_reference_stream(shape, seed):
    """Same Philox words; the float64 log / cos / sin of libm and of torch may differ in the last bit."""
    ours, spec = dg.api.offset_directions(*shape, seed), ref.offset_directions(*shape, seed)
    assert ours.shape == spec.shape and ours.dtype == torch.float64
    assert_close(ours, spec, kind="f64_last_bit")


def test_offset_directions_opcheck():
    torch.library.opcheck(torch.ops.ddimgmm.offset_directions.default, (2, 9, 3, 1))


def test_offset_directions_bad_input():
    with pytest.raises(RuntimeError, match="n_sets, dim, n_components must be >= 0"):
        torch.ops.ddimgmm.offset_directions(1, -2, 3, 0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        dg.api.offset_directions(1, 4, 3, -1)


def test_seeds_above_2_63_are_unsigned_keys():
    # The op takes the key's bits as an int64: seed 2**64 - 1 arrives as -1 and draws the reference's stream.
    ours = dg.api.offset_directions(2, 5, 3, 2**64 - 1)
    assert torch.equal(ours, ref.offset_directions(2, 5, 3, 2**64 - 1))
    assert not torch.equal(ours, ref.offset_directions(2, 5, 3, 2**63 - 1))
    gmm = dg.GMM.create(16, n_components=2, n_steps=2, seed=2**64 - 1)
    assert torch.isfinite(gmm.offsets).all()


@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub"])
def test_gmm_built_by_the_ops_equals_the_reference(variant):
    gmm = dg.GMM.create(
        300, n_components=6, n_steps=3, scale=1.7, variant=variant, uniform_priors=False, seed=9, dtype=torch.float64
    )
    priors, offsets, var_offsets = ref.gmm_parameters(
        300, 6, 3, 1.7, variant, uniform_priors=False, seed=9, dtype=torch.float64
    )
    assert torch.equal(gmm.priors, priors)
    assert_close(gmm.offsets, offsets, kind="f64_abs")
    assert_close(gmm.var_offsets, var_offsets, kind="f64_abs")
