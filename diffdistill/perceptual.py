"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"): the
perceptual distance DMD's regression loss uses (DMD eq. 9; DMD2's SDXL ODE pre-training, ``train_sd_ode.py``, which
computes it with piq's LPIPS on images decoded by the tiny VAE ``madebyollin/taesdxl``).

The network is the maintained ``lpips`` package's (VGG16 features, the v0.1 linear layers; images in ``[-1, 1]``),
built without weights; its weights are read from a safetensors file only. The package ships its linear layers as
pickles and takes VGG16 from torchvision's download, neither of which diffdistill loads: convert them once, on a
machine with network access, with the command :data:`CONVERT` prints. Deviations from DMD2: the ``lpips``
package's network (max pooling) instead of piq's (``replace_pooling=True``: average pooling), and images decoded by
the teacher's own VAE instead of a tiny one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

CONVERT = ('python -c "import lpips, safetensors.torch as st; '
           "st.save_model(lpips.LPIPS(net='vgg'), 'lpips_vgg.safetensors')\"")


class LPIPSWeightsError(FileNotFoundError):
    """The LPIPS weights file is missing or does not fit the network."""


def build_lpips() -> torch.nn.Module:
    """``lpips.LPIPS(net="vgg")``'s architecture with random weights (nothing downloaded or unpickled)."""
    try:
        import lpips
    except ImportError as err:
        raise ImportError("LPIPS needs the lpips package: pip install 'diffdistill[lpips]'") from err
    with warnings.catch_warnings():  # torchvision's deprecation notices for lpips' pretrained= calls
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)


def load_lpips(weights: str | Path | None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The frozen LPIPS-VGG network with the weights of the safetensors file ``weights`` (``lpips.LPIPS(net="vgg")``
    saved by ``safetensors.torch.save_model``)."""
    from safetensors.torch import load_model

    if torch.device(device).type == "meta":  # planning (diffdistill plan): the architecture only
        return build_lpips().to("meta").eval().requires_grad_(False)
    if weights is None:
        raise LPIPSWeightsError(f"LPIPS needs its weights (objective.lpips_weights): a safetensors file of "
                                f"lpips.LPIPS(net='vgg') (safetensors.torch.save_model); convert them once where lpips can download: "
                                f"{CONVERT}")
    path = Path(weights)
    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS weights {str(path)!r} do not exist: give a safetensors file of "
                                f"lpips.LPIPS(net='vgg') (VGG16 features + the v0.1 linear layers); "
                                f"lpips ships them as pickles, which diffdistill does not load -- convert them once "
                                f"where lpips can download: {CONVERT}")
    model = build_lpips()
    missing, unexpected = map(sorted, load_model(model, str(path), strict=False))  # lins[i] is lin<i>: shared
    if missing or unexpected:
        raise LPIPSWeightsError(f"{path} is not an LPIPS-VGG state dict: {len(missing)} tensors missing (e.g. "
                                f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); make it with {CONVERT}")
    return model.eval().requires_grad_(False).to(device)
