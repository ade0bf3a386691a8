"""A toy GAN-style generator for the ``teacher.kind=generator`` tests, importable as ``tests.toy_generator:build``
(the factory form of ``teacher.generator``) and scriptable for the TorchScript form (:func:`build_scripted`).

z [B, 8] -> stem (a 4x4 map) -> three upsampling blocks -> 32x32 RGB in [-1, 1]. ``tap_names`` gives one module per
resnet18 level, fine to coarse (strides 4, 8, 16, 32 on 32x32 images).
"""

from __future__ import annotations

import torch
from torch import nn

LATENT_DIM = 8


class ToyGenerator(nn.Module):
    tap_names = ["block3", "block2", "block1", "stem"]

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 16) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.stem = nn.Sequential(nn.Linear(latent_dim, width * 16), nn.Unflatten(1, (width, 4, 4)))
        self.block1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, 8, 3, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.to_rgb = nn.Conv2d(8, 3, 1)

    def features(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h0 = self.stem(z)
        h1 = self.block1(h0)
        h2 = self.block2(h1)
        h3 = self.block3(h2)
        return torch.tanh(self.to_rgb(h3)), {"stem": h0, "block1": h1, "block2": h2, "block3": h3}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(z)[0]


class _DictOutput(nn.Module):
    """The TorchScript contract: forward returns (images, Dict[str, Tensor])."""

    def __init__(self, gen: ToyGenerator) -> None:
        super().__init__()
        self.gen = gen
        self.latent_dim = gen.latent_dim
        self.tap_names = list(gen.tap_names)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.gen.features(z)


def build() -> ToyGenerator:
    """The factory ``teacher.generator=tests.toy_generator:build`` calls (weights from torch's global RNG: the
    pretraining run seeds it before building the teacher)."""
    return ToyGenerator()


def build_without_taps() -> nn.Module:
    gen = ToyGenerator()
    gen.tap_names = None
    return gen


def not_a_module() -> int:
    return 3


def needs_arguments(width: int) -> ToyGenerator:
    return ToyGenerator(width=width)


def build_scripted(seed: int = 0) -> torch.jit.ScriptModule:
    import warnings

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(_DictOutput(ToyGenerator()))
