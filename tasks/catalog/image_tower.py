"""A small convolutional image tower for small product photos, and its batch augmentations.

Written by hand (plain torch) because the usual source of small vision backbones, torchvision,
cannot be installed beside this project's torch, and timm's backbones are built for 224 px inputs
and ImageNet weights that this machine does not have. The network is a compact ResNet (basic
blocks, batch norm) sized for 80x60 photos: a full-resolution stem, four stages that halve the
resolution, then average and max pooling (max pooling keeps small details such as a logo or a
strap) and a linear projection into the text tower's embedding space.

Augmentations are batched torch ops on uint8 images: a random horizontal flip, a small random
zoom and shift (one affine warp per image, edges repeated: product photos sit on a plain
background) and a mild brightness/contrast change. No hue or saturation change: a product's
colour is part of what a query asks for.

Imported only inside function bodies elsewhere (it imports torch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from tasks.core.defaults import IMAGE_SIZE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ImageTowerConfig:
    """Shape of the image tower; saved as config.json beside the weights."""

    image_size: tuple[int, int] = IMAGE_SIZE  # (height, width) of the input
    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of the stem and of each stage
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # residual blocks per stage
    stem_stride: int = 2  # 2: the stem halves the resolution and the first stage keeps it (4x cheaper)
    embedding_dim: int = 384
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    architecture: str = field(default="resnet-basic-v1")

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.widths = tuple(self.widths)
        self.blocks = tuple(self.blocks)
        self.mean = tuple(self.mean)
        self.std = tuple(self.std)
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("image tower: one width per stage and one block count per stage")

    def to_dict(self) -> dict:
        return asdict(self)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (He et al., 2016)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ImageTower(nn.Module):
    """uint8 NHWC images -> embeddings (not normalised; callers normalise for cosine)."""

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        self.config = config
        first = config.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, first, 3, config.stem_stride, 1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = first
        for i, (width, count) in enumerate(zip(config.widths, config.blocks, strict=True)):
            stride = 1 if i == 0 and config.stem_stride > 1 else 2
            layers = [BasicBlock(channels, width, stride)] + [
                BasicBlock(width, width, 1) for _ in range(count - 1)
            ]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.projection = nn.Linear(2 * channels, config.embedding_dim)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def normalise_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (or float NCHW in [0, 1]) -> normalised float NCHW."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalise_input(images)))
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.projection(pooled)

    # ----------------------------------------------------------------------------- saving

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> ImageTower:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = ImageTowerConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        tower = cls(config)
        tower.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        tower.eval()
        return tower


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: float = 0.08,
    zoom: tuple[float, float] = (0.9, 1.1),
    light: float = 0.1,
) -> torch.Tensor:
    """Randomly flipped, zoomed, shifted and lit copies of uint8 NHWC images, as float NCHW in [0, 1]."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    scale = 1.0 / uniform(*zoom)  # sampling grid scale: < 1 zooms in
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = uniform(-max_shift, max_shift) * 2
    theta[:, 1, 2] = uniform(-max_shift, max_shift) * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(1 - light, 1 + light).view(n, 1, 1, 1)
    contrast = uniform(1 - light, 1 + light).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    return x.clamp_(0.0, 1.0)
