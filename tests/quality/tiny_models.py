"""Tiny fixed-weight models for the fashion tests (no data set, no training): ``ddim-gmm sample --model
tests.quality.tiny_models:tiny_unet --dim 784`` and the torchrun test load them by name."""

import torch

from ddim_gmm_ext.quality.fashion import FashionClassifier, FashionUNet


def _tiny_unet() -> FashionUNet:
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        net = FashionUNet(block_out_channels=(8, 16, 16), norm_num_groups=4)
        with torch.no_grad():  # a non-trivial output: the default init makes the last conv zero
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape))
    finally:
        torch.random.set_rng_state(state)
    return net.eval().requires_grad_(False)


#: FashionUNet with 8/16/16 channels and fixed random weights (the shipped architecture, 30x smaller).
tiny_unet = _tiny_unet()


def tiny_conv(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheaper eps model [B, 784] -> [B, 784]: a fixed 3x3 blur of x scaled by the timestep."""
    kernel = torch.full((1, 1, 3, 3), 1 / 9.0)
    y = torch.nn.functional.conv2d(x.reshape(-1, 1, 28, 28), kernel, padding=1).reshape(x.shape)
    return 0.5 * y * (t.float()[:, None] / 1000)


def _seeded(build):
    state = torch.random.get_rng_state()
    torch.manual_seed(1)
    try:
        return build().eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)


#: FashionClassifier with 4 / 8 / 16 channels and 8-d features, fixed random weights (for fashion-FD plumbing).
tiny_classifier = _seeded(lambda: FashionClassifier(width=4, feature_dim=8))


class TinyInception(torch.nn.Module):
    """Stands in for the FID Inception in torchmetrics' FID: uint8 [B, 1, 28, 28] -> 16 features."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 5, stride=3)
        self.conv.weight.requires_grad_(False)
        self.conv.bias.requires_grad_(False)

    def forward(self, images):
        return self.conv(images.float() / 255).relu().mean((2, 3))


tiny_inception = _seeded(TinyInception)


def reference_images(n: int = 24) -> torch.Tensor:
    """Fixed stand-in 'real' images [n, 784] in [-1, 1]."""
    gen = torch.Generator().manual_seed(7)
    return torch.rand(n, 784, generator=gen) * 2 - 1


def metric_samples(n: int = 18) -> torch.Tensor:
    """Fixed stand-in 'generated' images [n, 784] in [-1, 1] (near the reference ones, not equal)."""
    gen = torch.Generator().manual_seed(8)
    return (reference_images(n) + 0.3 * torch.randn(n, 784, generator=gen)).clamp(-1, 1)
