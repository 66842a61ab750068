"""Fashion-MNIST (60,000 train / 10,000 test images, 28x28, 10 classes) from Debian's ``dataset-fashion-mnist``
package, a small epsilon-prediction U-Net on it (diffusers' ``UNet2DModel``) and a small CNN classifier whose
penultimate features give a cheap Frechet distance ("fashion-FD") for sweeps.

Data: the four IDX files under ``/usr/share/datasets/fashion-mnist`` (``apt-get install -y
dataset-fashion-mnist``; another folder with ``DDIM_GMM_FASHION_DIR``), scaled to [-1, 1].

Model conventions (as the digits models', with D = 784): ``eps_model(x [B, 784] or [B, 1, 28, 28], t [B]
int64) -> eps`` of the same shape, t a training timestep in [0, 1000) of the paper's schedule
(:data:`ddim_gmm_ext.quality.sampling.BETAS`: linear betas 0.0015 to 0.0195, as the digits models).

Training (``ddim-gmm train-fashion``) writes a resumable checkpoint ``fashion_<net>.ckpt`` (weights, EMA,
optimiser, the batch generator's state, the loss log) every ``ckpt_every`` steps; ``--resume`` continues it
and gives the same weights as an uninterrupted run. At the end it writes ``fashion_<net>.pt`` (eps: float16
EMA weights; classifier: float32) and the manifest ``fashion_<net>.json`` (architecture, command, seed, loss
curve summary, sha256), which :func:`load` checks, as :func:`ddim_gmm_ext.quality.digits.load` does.
"""

from __future__ import annotations

import datetime
import gzip
import json
import math
import os
import shlex
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .digits import (
    DATA_DIR,
    check_finite_loss,
    load_torch_file,
    n_parameters,
    sha256,
    shipped_manifest,
    verified_weights,
)
from .sampling import training_alphas_cumprod

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"train": 60_000, "test": 10_000}
SIDE, DIM, N_CLASSES = 28, 28 * 28, 10
NETS = ("eps", "classifier")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: The eps U-Net (diffusers UNet2DModel on 28x28 directly: 28 -> 14 -> 7, self-attention at 7x7).
UNET_CONFIG = dict(
    sample_size=SIDE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)


class FashionDataMissing(FileNotFoundError):
    """Fashion-MNIST is not installed (the message names the Debian package and the apt command)."""


class FashionDataCorrupt(ValueError):
    """A Fashion-MNIST file that is not the IDX file it should be (the message names it and how to reinstall)."""

    def __init__(self, path: Path, shape: tuple, reason: str):
        super().__init__(
            f"{path} is not a Fashion-MNIST IDX file of shape {shape} ({reason}): reinstall Debian's "
            f"dataset-fashion-mnist package (`{APT_COMMAND} --reinstall`), or set DDIM_GMM_FASHION_DIR to a folder "
            "holding intact copies"
        )


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    return Path(os.environ.get("DDIM_GMM_FASHION_DIR", DEFAULT_DIR))


def available() -> bool:
    folder = data_dir()
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def _read_idx(path: Path, magic: int, shape: tuple) -> np.ndarray:
    """The uint8 array of shape ``shape`` an IDX .gz file holds; FashionDataCorrupt naming ``path`` when it is not
    one (not gzip, truncated, another header or size)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut-off stream an EOFError
        raise FashionDataCorrupt(path, shape, f"{type(error).__name__}: {error}") from error
    header = 4 * (1 + len(shape))
    values = np.frombuffer(raw[: min(header, len(raw) // 4 * 4)], dtype=">u4")
    if len(values) * 4 < header or values[0] != magic or tuple(int(v) for v in values[1:]) != shape:
        raise FashionDataCorrupt(path, shape, f"header {values.tolist()}")
    if len(raw) - header != math.prod(shape):
        raise FashionDataCorrupt(path, shape, f"{len(raw) - header} data bytes, expected {math.prod(shape)}")
    return np.frombuffer(raw[header:], dtype=np.uint8).reshape(shape)


def load_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` ("train": 60,000, "test": 10,000).
    FashionDataMissing naming the Debian package when the files are absent, FashionDataCorrupt naming the file
    when one is damaged."""
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    folder = data_dir()
    paths = [folder / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FashionDataMissing(
            f"Fashion-MNIST not found ({', '.join(missing)}): install Debian's dataset-fashion-mnist package "
            f"(`{APT_COMMAND}`), or set DDIM_GMM_FASHION_DIR to a folder holding the four IDX .gz files"
        )
    n = SIZES[split]
    images = _read_idx(paths[0], 0x803, (n, SIDE, SIDE))
    labels = _read_idx(paths[1], 0x801, (n,))
    if labels.max() >= N_CLASSES:  # a class index the classifier's loss cannot take
        raise FashionDataCorrupt(paths[1], (n,), f"label {int(labels.max())}, expected < {N_CLASSES}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1]."""
    return (images.float() / 127.5 - 1.0)[:, None]


def load_images(split: str = "train") -> torch.Tensor:
    """Images of ``split`` as float32 [N, 1, 28, 28] in [-1, 1]."""
    return to_model_scale(load_split(split)[0])


# ---------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------


class FashionUNet(nn.Module):
    """diffusers ``UNet2DModel`` behind the package's model contract: ``forward(x [B, 784] or [B, 1, 28, 28],
    t [B] int64 or a number) -> eps`` of x's shape and dtype (the network runs in float32)."""

    def __init__(self, **config):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in {**UNET_CONFIG, **config}.items()}
        self.unet = UNet2DModel(**self.config)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        shape = x.shape
        image = x.reshape(-1, 1, SIDE, SIDE).float()
        t = torch.as_tensor(t, device=x.device).expand(image.shape[0])
        # diffusers' ModelMixin is a torch.nn.Module, which its stubs do not show to mypy
        return self.unet(image, t).sample.reshape(shape).to(x.dtype)  # type: ignore[operator]


class FashionClassifier(nn.Module):
    """CNN [B, 1, 28, 28] (or [B, 784]) -> logits [B, 10]: three conv / SiLU stages (32, 64, 128 channels at
    28, 14, 7 pixels), global average pooling and a 128-d layer; :meth:`features` are those 128-d penultimate
    activations."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 14
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 7
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, N_CLASSES)
        self.width, self.feature_dim = width, feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, 1, SIDE, SIDE).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _architecture(net: nn.Module) -> dict:
    if isinstance(net, FashionUNet):
        return {"class": "FashionUNet", **net.config}
    assert isinstance(net, FashionClassifier)
    return {"class": "FashionClassifier", "width": net.width, "feature_dim": net.feature_dim}


def build(net_kind: str, architecture: dict | None = None) -> nn.Module:
    """A fresh network of ``net_kind`` (or of a manifest's ``architecture``)."""
    if architecture is not None:
        arch = dict(architecture)
        cls = {"FashionUNet": FashionUNet, "FashionClassifier": FashionClassifier}[arch.pop("class")]
        return cls(**arch)
    return FashionUNet() if net_kind == "eps" else FashionClassifier()


# ---------------------------------------------------------------------------------------------------------
# Training (resumable)
# ---------------------------------------------------------------------------------------------------------


def _lr_at(base_lr: float, i: int, warmup: int = 200) -> float:
    """Linear warm-up, then constant (the EMA does the averaging; a constant rate lets ``--resume`` extend a
    run with a larger ``--iters``)."""
    return base_lr * min(1.0, (i + 1) / warmup)


def _ema_decay(i: int, decay: float = 0.999) -> float:
    """EMA decay with a warm-up (as diffusers' EMAModel): min(decay, (1 + i) / (10 + i))."""
    return min(decay, (1 + i) / (10 + i))


def _loss(net_kind, net, x0, y, gen, abar):
    if net_kind == "eps":
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(abar), (x0.shape[0],), generator=gen)
        a = abar[t][:, None, None, None]
        return nn.functional.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
    # the classifier: Gaussian input noise of std 0.1 and random horizontal flips
    x = x0 + 0.1 * torch.randn(x0.shape, generator=gen)
    flip = torch.rand(x0.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return nn.functional.cross_entropy(net(x), y)


def checkpoint_path(out_dir, net_kind: str) -> Path:
    return Path(out_dir) / f"fashion_{net_kind}.ckpt"


#: What a training checkpoint holds (:func:`train` writes them all).
CHECKPOINT_KEYS = (
    *("net", "seed", "batch", "lr", "step", "seconds"),
    *("model", "ema", "optimizer", "generator", "curve", "running"),
)


def read_checkpoint(path) -> dict:
    """The state of a training checkpoint (weights only: nothing in it is executed); ValueError naming ``path``
    when it is not one (damaged, another file, keys missing), FileNotFoundError when it is absent."""
    state = load_torch_file(path, "train-fashion checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing or state["net"] not in NETS:
        raise ValueError(f"{path} is not a train-fashion checkpoint (missing {', '.join(missing) or 'a known net'})")
    return state


def resume_state(ckpt: Path, net_kind: str, iters: int, batch: int, lr: float, seed: int) -> dict:
    """The checkpoint ``--resume`` continues, after checking it was trained with these options and is not past
    ``iters`` (FileNotFoundError / ValueError naming --resume). The command line calls it before any work."""
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt}")
    try:
        state = read_checkpoint(ckpt)
    except ValueError as error:
        raise ValueError(f"--resume: {error}") from error
    for key, value in (("seed", seed), ("batch", batch), ("lr", lr), ("net", net_kind)):
        if state[key] != value:
            raise ValueError(f"--resume: the checkpoint was trained with {key} = {state[key]!r}, not {value!r}")
    if state["step"] > iters:
        raise ValueError(f"--resume: the checkpoint is at step {state['step']}, beyond --iters {iters}")
    return state


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def train(
    net_kind: str,
    out_dir,
    iters: int,
    batch: int,
    lr: float,
    seed: int,
    resume: bool = False,
    ckpt_every: int = 200,
    progress: bool = True,
    preview_every: int = 0,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    log=None,
) -> dict:
    """Train ``net_kind`` ("eps" or "classifier") for ``iters`` optimiser steps in total, checkpointing to
    ``fashion_<net>.ckpt`` every ``ckpt_every`` steps; ``resume`` continues that checkpoint (its seed, batch
    and lr must match). Writes ``fashion_<net>.pt`` / ``.json`` at the end and returns the manifest.
    ``preview_every`` (eps): every that many steps, a 20-step DDIM grid of the EMA model to
    ``fashion_eps_preview.png``. ``data``: (x [N, 1, 28, 28] in [-1, 1], y [N]) instead of the training split
    (tests)."""
    from tqdm import tqdm

    if net_kind not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net_kind!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_path(out_dir, net_kind)
    x_train, y_train = data if data is not None else (load_images("train"), load_split("train")[1])
    abar = training_alphas_cumprod().float()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build(net_kind)
    ema = build(net_kind)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4 if net_kind == "classifier" else 0.0)
    start_step, curve, running, seconds = 0, [], None, 0.0
    if resume:
        state = resume_state(ckpt, net_kind, iters, batch, lr, seed)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_step, curve, running, seconds = state["step"], state["curve"], state["running"], state["seconds"]
    began = time.perf_counter()

    def save(step: int) -> None:
        state = {
            "net": net_kind,
            "seed": seed,
            "batch": batch,
            "lr": lr,
            "step": step,
            "model": net.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(),
            "curve": curve,
            "running": running,
            "seconds": seconds + time.perf_counter() - began,
        }
        _save_checkpoint(ckpt, state)

    net.train()
    bar = tqdm(range(start_step, iters), desc=f"train fashion {net_kind}", disable=not progress, mininterval=5.0)
    for i in bar:
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        loss = _loss(net_kind, net, x_train[idx], y_train[idx], gen, abar)
        check_finite_loss(loss, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(lr, i)
        optimizer.step()
        with torch.no_grad():
            decay = _ema_decay(i)
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        value = loss.item()
        running = value if running is None else 0.99 * running + 0.01 * value
        if (i + 1) % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            curve.append([i + 1, round(running, 5)])
            if log is not None:
                elapsed = seconds + time.perf_counter() - began
                print(f"step {i + 1} loss(ema 0.99) {running:.5f} elapsed {elapsed:.0f} s", file=log, flush=True)
        if (i + 1) % ckpt_every == 0 or i + 1 == iters:
            save(i + 1)
        if net_kind == "eps" and preview_every and (i + 1) % preview_every == 0:
            preview_grid(ema, out_dir / "fashion_eps_preview.png")
    seconds += time.perf_counter() - began
    final = ema if net_kind == "eps" else net
    final.eval()
    metrics = _final_metrics(net_kind, final, abar, data)
    if running is not None and (not curve or curve[-1][0] != iters):
        curve = [*curve, [iters, round(running, 5)]]  # the last step, for the summary (not in the checkpoint)
    return _ship(net_kind, final, out_dir, iters, batch, lr, seed, curve, seconds, metrics)


def _final_metrics(net_kind: str, net: nn.Module, abar: torch.Tensor, data) -> dict:
    """eps: the loss on a fixed draw of 2000 test images (1 noise / time draw each); classifier: the test
    accuracy and loss (all 10,000 test images, or the given data for tests)."""
    if data is not None:
        x, y = data
    else:
        x, y = load_images("test"), load_split("test")[1]
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        if net_kind == "eps":
            n = min(len(x), 2000)
            losses = [float(_loss("eps", net, x[j : j + 250], None, gen, abar)) for j in range(0, n, 250)]
            return {"final_loss": sum(losses) / len(losses), "final_loss_images": n}
        logits = torch.cat([net(x[j : j + 1000]) for j in range(0, len(x), 1000)])
    return {
        "heldout_accuracy": float((logits.argmax(-1) == y).float().mean()),
        "heldout_size": len(y),
        "final_loss": float(nn.functional.cross_entropy(logits, y)),
    }


def _ship(net_kind, net, out_dir: Path, iters, batch, lr, seed, curve, seconds, metrics) -> dict:
    weights = out_dir / f"fashion_{net_kind}.pt"
    dtype = torch.float16 if net_kind == "eps" else torch.float32
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}, weights)
    command = ["ddim-gmm", "train-fashion", "--net", net_kind, "--iters", str(iters), "--batch", str(batch)]
    command += ["--lr", str(lr), "--seed", str(seed)]
    info = {
        "net": net_kind,
        "file": weights.name,
        "sha256": sha256(weights),
        "bytes": weights.stat().st_size,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": n_parameters(net),
        "architecture": _architecture(net),
        "schedule": "the paper's: 1000 steps, linear betas 0.0015 to 0.0195 (as the digits models)"
        if net_kind == "eps"
        else None,
        "data": "Fashion-MNIST train split (60,000), scaled to [-1, 1], from Debian's dataset-fashion-mnist",
        "command": shlex.join(command),
        "seed": seed,
        "iters": iters,
        "batch": batch,
        "lr": lr,
        **metrics,
        "loss_curve": _curve_summary(curve),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / f"fashion_{net_kind}.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _curve_summary(curve: list, points: int = 20) -> list:
    """At most ``points`` [step, running loss] entries of the loss log, evenly spaced, the last one included."""
    if len(curve) <= points:
        return curve
    picks = sorted({round(j * (len(curve) - 1) / (points - 1)) for j in range(points)})
    return [curve[j] for j in picks]


# ---------------------------------------------------------------------------------------------------------
# Loading, sampling previews
# ---------------------------------------------------------------------------------------------------------


def manifest(net_kind: str, data_dir=DATA_DIR) -> dict:
    """The manifest of a shipped network."""
    return shipped_manifest("fashion", NETS, net_kind, data_dir)


def load(net_kind: str, data_dir=DATA_DIR) -> nn.Module:
    """The shipped network ``net_kind`` in float32 eval mode, after checking its weights against the manifest's
    sha256 (ValueError on a mismatch)."""
    info = manifest(net_kind, data_dir)
    state = verified_weights(info, data_dir)
    net = build(net_kind, info["architecture"])
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().requires_grad_(False)


def load_checkpoint_ema(path) -> nn.Module:
    """The EMA network of a training checkpoint (to look at a run in progress); ValueError naming ``path`` when it
    is not one."""
    state = read_checkpoint(path)
    net = build(state["net"])
    net.load_state_dict(state["ema"] if state["net"] == "eps" else state["model"])
    return net.eval().requires_grad_(False)


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Images [N, 784] or [N, 1, 28, 28] in [-1, 1] as a PNG grid (1-pixel gaps)."""
    from PIL import Image

    x = images.reshape(-1, SIDE, SIDE).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    rows = (len(x) + nrow - 1) // nrow
    canvas = torch.full((rows * (SIDE + 1) + 1, nrow * (SIDE + 1) + 1), 255, dtype=torch.uint8)
    for j, img in enumerate(x):
        r, c = divmod(j, nrow)
        canvas[1 + r * (SIDE + 1) : 1 + r * (SIDE + 1) + SIDE, 1 + c * (SIDE + 1) : 1 + c * (SIDE + 1) + SIDE] = img
    Image.fromarray(canvas.numpy(), mode="L").resize((canvas.shape[1] * 3, canvas.shape[0] * 3)).save(path)


def preview_grid(model, path, n: int = 64, steps: int = 20, eta: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``n`` DDIM samples of ``model`` at ``steps`` steps (x_T of the Philox stream, seed ``seed``) saved as a
    PNG grid; returns them [n, 784]."""
    from .sampling import initial_noise, sample_ddim

    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = sample_ddim(model, initial_noise(n, DIM, seed), steps, eta, [None], seed)[0]
    model.train(was_training)
    save_grid(x, path)
    return x
