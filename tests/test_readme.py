"""The README's Python snippets run as written, in order, in one namespace (as a reader pastes them into one
session). The latent-diffusion snippet needs a LatentDiffusion model and its conditioning: a stand-in with the
attributes DDIMSampler reads (the training schedule, apply_model) and two conditioning tensors is provided."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class _StandInLatentDiffusion:
    """What ``dg.DDIMSampler`` reads of a latent-diffusion model: its training schedule and ``apply_model``."""

    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self.device = torch.device("cpu")

    def apply_model(self, x, t, cond):
        return 0.1 * torch.tanh(x)


def test_readme_snippets_run_as_written():
    snippets = _snippets()
    # Mutation checked: a snippet calling a name the package does not have (sample_dpmpp_2m_sde_gmm misspelt)
    # fails here; so does a snippet left out of the README's code blocks (the count below).
    assert len(snippets) >= 6
    namespace = {"model": _StandInLatentDiffusion(), "c": torch.zeros(4, 2, 8), "uc": torch.zeros(4, 2, 8)}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102  the README's own code
    assert torch.isfinite(namespace["x"]).all() and torch.isfinite(namespace["samples"]).all()


def test_a_generator_draws_the_noise_then_the_components_by_multinomial():
    """What the README's Randomness paragraph states for a `generator`: randn_tensor's draw, then
    torch.multinomial over the step's priors on the same generator, tables from seed 0 when seed is None, nothing
    from the global generator. Checked to fail with draw_components drawing from torch's global generator
    (generator=None) and with the components drawn before the noise."""
    from diffusers.utils.torch_utils import randn_tensor

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler

    scheduler = DDIMGMMScheduler(gmm_variant="ortho", gmm_n_components=4, gmm_scale=1.0)
    scheduler.set_timesteps(10)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = 0.1 * x
    t = scheduler.timesteps[2]
    ours = torch.Generator().manual_seed(7)
    replay = torch.Generator().manual_seed(7)
    global_state = torch.get_rng_state()
    scheduler.step(eps, t, x, eta=1.0, generator=ours)
    assert torch.equal(torch.get_rng_state(), global_state)
    randn_tensor(x.shape, generator=replay, dtype=x.dtype)
    priors = scheduler._gmm_for(x).tables(x)[0][2]  # step index 2; the tables of seed 0
    torch.multinomial(priors, x.shape[0], replacement=True, generator=replay)
    assert torch.equal(ours.get_state(), replay.get_state())
    one = DDIMGMMScheduler(gmm_variant="ortho", gmm_n_components=1, gmm_scale=1.0)  # k = 0 whatever the draw
    one.set_timesteps(10)
    noise = randn_tensor(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    by_generator = one.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    assert torch.equal(by_generator, one.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample)  # noise first
    seeded = DDIMGMMScheduler(gmm_variant="ortho", gmm_n_components=4, gmm_scale=1.0, seed=0)
    seeded.set_timesteps(10)
    assert torch.equal(seeded._gmm_for(x).tables(x)[0], scheduler._gmm_for(x).tables(x)[0])


def test_importing_the_diffusers_module_adds_names_and_changes_no_stock_class():
    """The README's sentence on the import, in a fresh process: each stock scheduler's attributes (its
    _compatibles included) are the same before and after, the new diffusers names are exactly our schedulers,
    whose __module__ is the public module. Checked to fail with publish() appending the drop-in to its stock
    class's _compatibles."""
    import subprocess
    import sys

    code = """
import json, diffusers
from diffusers import SchedulerMixin
def stock():
    out = {}
    for name in dir(diffusers):
        if name.endswith("Scheduler"):
            cls = getattr(diffusers, name)
            if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
                out[name] = {k: repr(v) for k, v in vars(cls).items() if k != "__doc__"}
    return out
before = stock()
import ddim_gmm_ext.diffusers as ours
after = stock()
print(json.dumps({
    "changed": sorted(k for k in before if before[k] != after[k]),
    "added": sorted(set(after) - set(before)),
    "modules": sorted({getattr(ours, k).__module__ for k in set(after) - set(before)}),
}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    import ddim_gmm_ext.diffusers as ours

    result = json.loads(done.stdout.strip().splitlines()[-1])
    schedulers = sorted(n for n in ours.__all__ if n.endswith("Scheduler"))
    assert result == {"changed": [], "added": schedulers, "modules": ["ddim_gmm_ext.diffusers"]}


def test_the_first_command_installs_what_the_demo_shows():
    """The README's first command installs the demo extra; the demo output it shows ends with the step-speed
    line, which needs diffusers (without it the demo prints that the comparison was skipped). Checked to fail
    with diffusers removed from the demo extra."""
    text = README.read_text()
    assert 'pip install --no-build-isolation -e ".[demo]" && ddim-gmm demo' in text.splitlines()[4]
    assert "diffusers DDIMScheduler.step" in text
    pyproject = (README.parent / "pyproject.toml").read_text()
    demo = re.search(r"^demo = \[(.*?)\]", pyproject, flags=re.M)
    assert demo is not None and '"diffusers"' in demo.group(1)
