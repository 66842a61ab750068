"""Small networks trained on scikit-learn's 8x8 digits (1797 x 64, scaled to [-1, 1]) and shipped as package
data: an epsilon-prediction diffusion model, a rectified-flow velocity model and a classifier whose
penultimate features feed the digits-FD and precision / recall of :mod:`ddim_gmm_ext.quality.metrics`.

Each network is written by ``ddim-gmm train-digits --net {eps,flow,classifier}`` as ``digits_<net>.pt`` (a
float32 state dict) beside ``digits_<net>.json``, its manifest: architecture, training command, seed, final
loss (or held-out accuracy), date, sha256 of the weights. :func:`load` rebuilds the network from the manifest
after checking the checksum; nothing is downloaded.

Model conventions (the contract of ``ddim-gmm eval --model module:callable`` as well):

* eps model:  ``eps_model(x [B, 64], t [B] int64) -> eps [B, 64]`` with t a training timestep in [0, 1000) of
  the paper's schedule (:data:`ddim_gmm_ext.quality.sampling.BETAS`: linear betas 0.0015 to 0.0195, appendix A.5).
* flow model: ``flow_model(x [B, 64], t [B] float) -> v [B, 64]``, v = eps - x0 on x_t = (1 - t) x0 + t eps.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shlex
import time
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .analytic import load_digits_scaled
from .sampling import training_alphas_cumprod

DATA_DIR = Path(__file__).parent / "data"
NETS = ("eps", "flow", "classifier")
N_CLASSES = 10
# Held-out split of the classifier (stratified, fixed): the accuracy in its manifest is measured on it.
CLASSIFIER_TEST_FRACTION, CLASSIFIER_SPLIT_SEED = 0.2, 0


# ---------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of times t [B] on a 0..1000 scale (as DDPM's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class DenoiserMLP(nn.Module):
    """Time-conditioned residual MLP [B, dim] x [B] -> [B, dim]: the time embedding is added to the hidden
    state before every block. ``time_scale`` maps the model's time argument to the 0..1000 embedding scale
    (1 for DDPM timesteps, 1000 for rectified-flow t in [0, 1])."""

    def __init__(self, dim=64, hidden=256, blocks=3, time_dim=64, time_scale=1.0):
        super().__init__()
        self.time_dim, self.time_scale = time_dim, time_scale
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_mlp(time_embedding(t * self.time_scale, self.time_dim))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h + emb)
        return self.out(h)


class DigitsClassifier(nn.Module):
    """MLP [B, 64] -> logits [B, 10]; :meth:`features` are the penultimate activations [B, feature_dim]."""

    def __init__(self, dim: int = 64, hidden: int = 256, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_ARCHITECTURES = {"DenoiserMLP": DenoiserMLP, "DigitsClassifier": DigitsClassifier}


def n_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def _cosine_lr(optimizer, base_lr: float, i: int, iters: int, warmup: int = 100) -> None:
    lr = base_lr * min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / iters))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _denoising_batch(net_kind: str, x0: torch.Tensor, gen: torch.Generator, abar: torch.Tensor):
    """(x_t, time, target) of one training batch: eps-prediction on the VP path of the paper's schedule, or
    velocity v = eps - x0 on the rectified-flow path x_t = (1 - t) x0 + t eps with t ~ U(0, 1)."""
    eps = torch.randn(x0.shape, generator=gen)
    if net_kind == "eps":
        t = torch.randint(0, len(abar), (x0.shape[0],), generator=gen)
        a = abar[t][:, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps
    t = torch.rand(x0.shape[0], generator=gen)
    return (1 - t[:, None]) * x0 + t[:, None] * eps, t, eps - x0


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    """FloatingPointError naming the optimiser step at which the training loss went non-finite (a diverging
    learning rate, for example), instead of writing NaN weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss went non-finite ({float(loss.detach())}) at optimiser step {step}")


def train_denoiser(net_kind: str, iters: int, batch: int, lr: float, seed: int, progress: bool = True):
    """Train a :class:`DenoiserMLP` on all 1797 digits with the MSE of eq. 4 (eps) or eq. 16 (flow), Adam with
    warm-up and cosine decay, and an exponential moving average (decay 0.999) of the weights, which is what is
    returned. Returns (EMA net, metrics dict with the final loss of the EMA net on a fixed evaluation draw)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_scaled(torch.float32)
    abar = training_alphas_cumprod().float()
    net = DenoiserMLP(time_scale=1.0 if net_kind == "eps" else 1000.0)
    ema = DenoiserMLP(time_scale=net.time_scale)
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    running = None
    bar = tqdm(range(iters), desc=f"train {net_kind}", disable=not progress, mininterval=2.0)
    for i in bar:
        x0 = data[torch.randint(0, len(data), (batch,), generator=gen)]
        x_t, times, target = _denoising_batch(net_kind, x0, gen, abar)
        loss = nn.functional.mse_loss(net(x_t, times), target)
        check_finite_loss(loss, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _cosine_lr(optimizer, lr, i, iters)
        optimizer.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=False):
                pe.lerp_(p, 1 - 0.999)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if i % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    return ema, {"final_loss": _eval_loss(ema, net_kind, data, abar), "final_train_loss_ema": running}


def _eval_loss(net: nn.Module, net_kind: str, data: torch.Tensor, abar: torch.Tensor, draws: int = 8) -> float:
    """Mean training loss of ``net`` over ``draws`` fixed noise / time draws of the whole data set."""
    gen = torch.Generator().manual_seed(12345)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            x_t, times, target = _denoising_batch(net_kind, data, gen, abar)
            total += float(nn.functional.mse_loss(net(x_t, times), target))
    return total / draws


def classifier_split(seed: int = CLASSIFIER_SPLIT_SEED):
    """(x_train, y_train, x_test, y_test): a stratified 80/20 split of the digits, x [n, 64] float32 in
    [-1, 1], y [n] int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits_scaled(torch.float32), torch.as_tensor(load_digits().target, dtype=torch.int64)
    i_train, i_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=CLASSIFIER_TEST_FRACTION, stratify=y.numpy(), random_state=seed
    )
    return x[i_train], y[i_train], x[i_test], y[i_test]


def train_classifier(iters: int, batch: int, lr: float, seed: int, progress: bool = True):
    """Train :class:`DigitsClassifier` on the training split with cross-entropy, Adam (cosine decay, weight
    decay 1e-4) and Gaussian input noise of std 0.1 (so that features of slightly noisy samples stay
    meaningful). Returns (net, metrics dict with held-out accuracy and final test loss)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = classifier_split()
    net = DigitsClassifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    for i in tqdm(range(iters), desc="train classifier", disable=not progress, mininterval=2.0):
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        x = x_train[idx] + 0.1 * torch.randn(batch, x_train.shape[1], generator=gen)
        loss = nn.functional.cross_entropy(net(x), y_train[idx])
        check_finite_loss(loss, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _cosine_lr(optimizer, lr, i, iters)
        optimizer.step()
    net.eval()
    with torch.no_grad():
        logits = net(x_test)
    return net, {
        "heldout_accuracy": float((logits.argmax(-1) == y_test).float().mean()),
        "heldout_size": len(y_test),
        "final_loss": float(nn.functional.cross_entropy(logits, y_test)),
    }


# ---------------------------------------------------------------------------------------------------------
# Shipping: weights + manifest
# ---------------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _architecture(net: nn.Module) -> dict:
    if isinstance(net, DenoiserMLP):
        return {
            "class": "DenoiserMLP",
            "dim": net.inp.in_features,
            "hidden": net.inp.out_features,
            "blocks": len(net.blocks),
            "time_dim": net.time_dim,
            "time_scale": net.time_scale,
        }
    body = cast(nn.Sequential, net.body)
    first, last = cast(nn.Linear, body[0]), cast(nn.Linear, body[2])
    return {
        "class": "DigitsClassifier",
        "dim": first.in_features,
        "hidden": first.out_features,
        "feature_dim": last.out_features,
    }


def train(net_kind: str, out_dir, iters: int, batch: int, lr: float, seed: int, progress: bool = True) -> dict:
    """Train one of :data:`NETS`, write ``digits_<net>.pt`` and ``digits_<net>.json`` to ``out_dir`` and
    return the manifest."""
    if net_kind not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net_kind!r}")
    start = time.perf_counter()
    trainer = train_classifier if net_kind == "classifier" else lambda *a, **k: train_denoiser(net_kind, *a, **k)
    net, metrics = trainer(iters, batch, lr, seed, progress=progress)
    seconds = time.perf_counter() - start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"digits_{net_kind}.pt"
    torch.save({k: v.detach().float().contiguous() for k, v in net.state_dict().items()}, weights)
    manifest = {
        "net": net_kind,
        "file": weights.name,
        "sha256": sha256(weights),
        "bytes": weights.stat().st_size,
        "parameters": n_parameters(net),
        "architecture": _architecture(net),
        "command": shlex.join(
            [
                "ddim-gmm",
                "train-digits",
                "--net",
                net_kind,
                "--iters",
                str(iters),
                "--batch",
                str(batch),
                "--lr",
                str(lr),
                "--seed",
                str(seed),
            ]
        ),
        "seed": seed,
        "iters": iters,
        "batch": batch,
        "lr": lr,
        **metrics,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / f"digits_{net_kind}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def shipped_manifest(data_set: str, nets, net_kind: str, data_dir=DATA_DIR) -> dict:
    """The manifest ``<data_set>_<net_kind>.json`` of a shipped network of ``data_set`` (digits, fashion)."""
    if net_kind not in nets:
        raise ValueError(f"net must be one of {nets}, got {net_kind!r}")
    path = Path(data_dir) / f"{data_set}_{net_kind}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}: train it with `ddim-gmm train-{data_set} --net {net_kind} --out {data_dir}`"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # a damaged manifest (JSONDecodeError, UnicodeDecodeError)
        raise ValueError(f"{path} is not a readable manifest ({error}): reinstall or retrain it") from error


def verified_weights(info: dict, data_dir=DATA_DIR) -> dict:
    """The state dict a manifest names, after checking it against the manifest's sha256 (ValueError on a
    mismatch)."""
    weights = Path(data_dir) / info["file"]
    if sha256(weights) != info["sha256"]:
        raise ValueError(f"{weights} does not match the sha256 in its manifest: reinstall or retrain it")
    return load_torch_file(weights, "weights file")


def load_torch_file(path, what: str):
    """``torch.load(path, weights_only=True)``; ValueError naming ``path`` and ``what`` it should be when it cannot
    be read (a damaged file raises any of UnpicklingError, EOFError, RuntimeError, KeyError ... from the
    unpickler); FileNotFoundError as is."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001  (whatever a damaged file makes the unpickler raise)
        first = str(error).strip().partition("\n")[0].partition(". ")[0]  # its first sentence
        reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
        raise ValueError(f"{path} is not a readable {what} ({reason})") from error


def manifest(net_kind: str, data_dir=DATA_DIR) -> dict:
    """The manifest of a shipped network."""
    return shipped_manifest("digits", NETS, net_kind, data_dir)


def load(net_kind: str, data_dir=DATA_DIR) -> nn.Module:
    """The shipped network ``net_kind`` in eval mode, after checking its weights against the manifest's
    sha256 (ValueError on a mismatch)."""
    info = manifest(net_kind, data_dir)
    state = verified_weights(info, data_dir)
    arch = dict(info["architecture"])
    net = _ARCHITECTURES[arch.pop("class")](**arch)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)
