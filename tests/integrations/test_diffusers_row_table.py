"""The row table of the diffusers schedulers (integrations/diffusers/_row_table.py): one owner of a schedule's
float64 rows, their gmm_steps gating (kept across a multistep restart at a begin index), DDIM's per-eta rows and
the per-(variant, device, dtype) copies."""

import pytest
import torch

pytest.importorskip("diffusers")

import ddim_gmm_ext.diffusers as gd  # noqa: E402
from ddim_gmm_ext.gmm import matched_steps  # noqa: E402
from ddim_gmm_ext.integrations.diffusers._row_table import RowTable  # noqa: E402

SHAPE = (2, 3, 4, 4)
STEPS = 7
MATCHED = dict(gmm_variant="ortho-lr", gmm_n_components=3, gmm_steps="matched", seed=0)


def _matched_mask(gmm, c) -> list[bool]:
    """The oracle: the matched steps of ``gmm`` at noise stds ``c`` (g = 1), the last step Gaussian."""
    return [m and i < STEPS - 1 for i, m in enumerate(matched_steps(gmm, c, torch.ones(STEPS)))]


# Mutation checked: RowTable.restart installing the new rows without gmm_steps (the ungated rows as its rows)
# fails: the restarted rows put the mixture back on the clipping step.
def test_a_multistep_restart_at_a_begin_index_keeps_the_matched_steps():
    s = gd.DPMSolverMultistepGMMScheduler(algorithm_type="sde-dpmsolver++", **MATCHED)
    s.set_timesteps(STEPS)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    s.prepare_gmm(x)
    before = s._rows.clone()  # noqa: SLF001
    s.set_begin_index(3)
    for t in s.timesteps[3:]:
        x = s.step(torch.tanh(x), t, x).prev_sample
    rows = s._rows  # noqa: SLF001
    assert not torch.equal(rows[:, 6:], before[:, 6:])  # restarted: the order count begins at step 3
    expected = _matched_mask(s.gmm, rows[:, 4])
    assert False in expected[:-1]  # "matched" leaves a mixture step out here
    assert rows[:, 5].ne(0).tolist() == expected
    assert torch.isfinite(x).all()


# Mutation checked: RowTable._warm clearing the gated rows but not the copies fails (the eta-1 float32 copy keeps
# the mixture on the clipping steps); RowTable.table without mapping None to the default variant fails the
# identity (a second copy of the eta-0 rows under another key).
def test_ddim_per_eta_copies_share_one_key_and_follow_the_matched_steps():
    s = gd.DDIMGMMScheduler(**MATCHED)
    s.set_timesteps(STEPS)
    x = torch.zeros(SHAPE)
    ungated = s._table_at(1.0, x.device, torch.float32)[:, 5].ne(0).tolist()  # noqa: SLF001
    s.prepare_gmm(x)
    assert s._table(x) is s._table_at(0.0, x.device, torch.float32)  # noqa: SLF001
    eta1 = s._table_at(1.0, x.device, torch.float32)  # noqa: SLF001
    expected = _matched_mask(s.gmm, s._row_table.rows(1.0)[:, 4])  # noqa: SLF001
    assert expected != ungated
    assert eta1[:, 5].ne(0).tolist() == expected
    assert torch.equal(eta1, s._row_table.rows(1.0).float())  # noqa: SLF001


# Mutation checked: RowTable.restart keeping the old gated rows (no _warm) fails: the new rows never arrive; so
# does a restart installing them ungated.
def test_an_explicit_gmm_steps_list_gates_new_rows_of_a_restart():
    def rows(value):
        return torch.full((5, 6), value, dtype=torch.float64)

    table = RowTable(rows(1.0), [1, 3])
    assert table.rows()[:, 5].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert table.table(torch.device("cpu"), torch.float32).dtype == torch.float32
    table.restart(rows(2.0))
    assert table.rows()[:, 5].tolist() == [0.0, 2.0, 0.0, 2.0, 0.0]
    assert table.table(torch.device("cpu"), torch.float32)[:, 0].tolist() == [2.0] * 5
    assert table.n_steps == 5
