"""Factories for ``model=module`` in the tests (``model._target_=module_nets.NAME``; tests/ is on sys.path
under pytest, and on PYTHONPATH for the subprocesses the tests start)."""

import math

import torch
from torch import nn


def mlp(input_shape, num_outputs, width=8, depth=1):
    """Flatten → (Linear → tanh) × depth → Linear."""
    layers, f = [nn.Flatten()], math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(f, width), nn.Tanh()]
        f = width
    return nn.Sequential(*layers, nn.Linear(f, num_outputs))


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


def resnet(input_shape, num_outputs, channels=3):
    """conv 3×3 → ReLU → a residual block x + relu(conv(x)) → max-pool 2 → Linear."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        Residual(channels),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * (h // 2) * (w // 2), num_outputs),
    )


class Scaled(nn.Module):
    """z = W (x ⊙ s) + b with a fixed random buffer s (drawn from torch's generator) and a step counter
    buffer (int64) that is not used."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        f = math.prod(input_shape)
        self.register_buffer("s", 0.5 + torch.rand(f))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.fc = nn.Linear(f, num_outputs)

    def forward(self, x):
        return self.fc(x.flatten(1) * self.s)


def linear_zero(input_shape, num_outputs):
    """nn.Linear on the flattened input, zero-initialised: ``model=softmax`` (bias) at θ⁰ = 0."""
    lin = nn.Linear(math.prod(input_shape), num_outputs)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(nn.Flatten(), lin)


def batchnorm(input_shape, num_outputs, eval=False):
    """Linear → BatchNorm1d → Linear, in training mode unless ``eval``."""
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 6), nn.BatchNorm1d(6), nn.Linear(6, num_outputs)
    )
    return net.eval() if eval else net


def fixed(width=4):
    """No input_shape / num_outputs arguments: a fixed 4-feature, 3-output net (iris)."""
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def not_a_module(input_shape, num_outputs):
    return 42


def raises(input_shape, num_outputs):
    raise RuntimeError("no network today")


def required(input_shape, num_outputs, width):
    """``width`` has no default: the config must give it (+model.width=...)."""
    return mlp(input_shape, num_outputs, width)


def wrong_outputs(input_shape, num_outputs):
    return mlp(input_shape, num_outputs + 1)


class Running(nn.Module):
    """Keeps a running mean of its inputs in a buffer, updated in place (torch.func cannot vmap that)."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.fc = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x):
        self.mean.mul_(0.9).add_(0.1 * x.mean())
        return self.fc(x.flatten(1))
