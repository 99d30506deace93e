"""probe's own CNNs: LeNet-5 exactly as in the lecture, and small VGG- and ResNet-style nets.

Every ReLU is its own module and not in place, so hooks, guided backprop and DeepLift see
each activation once.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from probe.models.registry import register_model


class LeNet5(nn.Module):
    """LeNet-5 as in the lecture's table: 61,706 parameters on 1x32x32 inputs, log-probabilities out."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        x = torch.flatten(x, 1)
        return self.log_softmax(self.fc2(self.relu4(self.fc1(x))))


class VGGSmall(nn.Module):
    """Three VGG blocks of two 3x3 convs, then two fully connected layers."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A 3x3 stem and three stages of residual blocks (widths 16, 32, 64), global pooling, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(c if b == 0 else w, w, stride if b == 0 else 1) for b in range(blocks)]))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyCNN(nn.Module):
    """Two small convs and a linear layer: the cheap model that tests use."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))


@register_model(channels=1, image_size=32, fixed_size=True)
def lenet5(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return LeNet5(in_channels, num_classes)


@register_model(channels=1, image_size=32)
def vgg_small(in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), hidden: int = 128) -> nn.Module:
    return VGGSmall(in_channels, num_classes, widths, hidden)


@register_model(channels=1, image_size=32)
def resnet_small(in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1) -> nn.Module:
    return ResNetSmall(in_channels, num_classes, widths, blocks)


@register_model(channels=1, image_size=16)
def tiny_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 4) -> nn.Module:
    return TinyCNN(in_channels, num_classes, width)
