"""The 2D image encoder G that query images are described with.

Two modes:
- `ssl` (default, Pietrantoni et al.): a small CNN at stride 4 or 8, trained jointly with the
  feature field so that the feature rendered at a pixel and the encoder's feature at that pixel
  embed in one space (contrastive loss in fastnefes.train.losses). Needs no pretrained weights.
- `distill` (NeFeS): a frozen extractor from a user's TorchScript file; the field's features
  are distilled from it.

Both take float images [B,3,H,W] in [0,1] (or uint8 [B,H,W,3], see `as_float_images`) and
return [B,D,H//s,W//s], where output cell (i, j) describes the s x s block whose centre is the
image point ((j + 0.5) s, (i + 0.5) s) — the pixel the field renders at stride s.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnefes.errors import FastnefesError


def as_float_images(images: Tensor) -> Tensor:
    """uint8 [B,H,W,3] (or [H,W,3]) or float [B,3,H,W] in [0,1] -> float32 [B,3,H,W] in [0,1]."""
    if images.dtype == torch.uint8:
        if images.dim() == 3:
            images = images[None]
        return images.permute(0, 3, 1, 2).float() / 255.0
    if images.dim() == 3:
        images = images[None]
    return images.float()


def _down(in_ch: int, out_ch: int) -> nn.Conv2d:
    # kernel 4 / stride 2 / padding 1: output cell j is centred on input cells 2j, 2j+1, so the
    # centres stay at (j + 0.5) * stride through every level (no half-pixel drift).
    return nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1)


class SSLEncoder(nn.Module):
    """Small CNN, images [B,3,H,W] in [0,1] -> L2-normalised features [B,D,H//s,W//s], s in {4, 8}."""

    def __init__(self, feature_dim: int, stride: int = 8, width: int = 32) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise FastnefesError(f"ssl encoder stride {stride}: expected 4 or 8")
        self.stride = stride
        w1, w2, w3 = width, 2 * width, 3 * width
        layers: list[nn.Module] = [_down(3, w1), nn.ReLU(inplace=True), nn.Conv2d(w1, w1, 3, padding=1), nn.ReLU(inplace=True),
                                   _down(w1, w2), nn.ReLU(inplace=True), nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(inplace=True)]
        out = w2
        if stride == 8:
            layers += [_down(w2, w3), nn.ReLU(inplace=True)]
            out = w3
        # Dilated context layer: a wider receptive field makes repeated textures distinguishable.
        layers += [nn.Conv2d(out, out, 3, padding=2, dilation=2), nn.ReLU(inplace=True), nn.Conv2d(out, feature_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        x = as_float_images(images)
        # Per-image, per-channel standardisation: invariance to exposure and white balance.
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return F.normalize(self.net((x - mean) / std), dim=1)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """Load a TorchScript extractor on CPU (TorchScript archives hold code + tensors, no pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise FastnefesError(f"{path}: extractor file not found (expected a TorchScript .pt saved with torch.jit.save)")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError / ValueError variants for bad archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastnefesError(f"{path}: not a loadable TorchScript file ({first})") from None
    return module.eval()


def probe_extractor(module: nn.Module, path: str | Path, size: int = 64) -> tuple[int, int]:
    """Run the extractor on a size x size image -> (output channels, stride)."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, size, size))
    except Exception as exc:
        raise FastnefesError(f"{path}: extractor failed on a [1,3,{size},{size}] float image in [0,1] ({type(exc).__name__})") from None
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != 1:
        raise FastnefesError(f"{path}: extractor must return one tensor [B,C,h,w], got {getattr(out, 'shape', type(out).__name__)}")
    h, w = out.shape[2:]
    stride = round(size / h)
    if stride < 1 or round(size / w) != stride or abs(size / stride - h) > 1:
        raise FastnefesError(f"{path}: extractor output {h}x{w} for a {size}x{size} input has no integer stride")
    return int(out.shape[1]), int(stride)


class DistillEncoder(nn.Module):
    """A frozen TorchScript extractor: images [B,3,H,W] in [0,1] -> [B,C,H//s,W//s] (not normalised)."""

    def __init__(self, extractor: nn.Module, feature_dim: int, stride: int) -> None:
        super().__init__()
        # Kept out of the module tree: its weights live in its own TorchScript file, not in
        # model.safetensors, and it is never trained.
        object.__setattr__(self, "extractor", extractor)
        for p in extractor.parameters():
            p.requires_grad_(False)
        self.stride = stride
        self.feature_dim = feature_dim

    def _apply(self, fn, recurse: bool = True):  # follow .to(device) although not a submodule
        self.extractor._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "DistillEncoder":
        super().train(mode)
        self.extractor.eval()  # always frozen (batch-norm statistics included)
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = as_float_images(images)
        with torch.no_grad():
            out = self.extractor(x)
        h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
        if out.shape[2:] != (h, w):  # padding conventions differ by a cell at odd sizes
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out.float()


def sample_feature_map(feature_map: Tensor, pixels: Tensor, stride: int) -> Tensor:
    """Bilinearly read a [B,D,h,w] map at image coordinates pixels [B,N,2] (x, y) -> [B,N,D].

    Cell (i, j) sits at image point ((j + 0.5) s, (i + 0.5) s); points outside are clamped to the border.
    """
    h, w = feature_map.shape[2:]
    grid = torch.stack([pixels[..., 0] / (w * stride), pixels[..., 1] / (h * stride)], dim=-1) * 2.0 - 1.0
    out = F.grid_sample(feature_map, grid[:, :, None, :].to(feature_map.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # [B,D,N,1]
    return out[..., 0].transpose(1, 2)
