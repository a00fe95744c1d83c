"""Small architectures that reproduce the structures real models have around their norm layers.

Each model is built by a plain factory with keyword arguments and defaults, so that it can be named on the
command line (``--arch samples/models.py:resnet_tiny --arch-kwargs '{"num_classes": 10}'``). Module names
follow the originals (torchvision ResNet / MobileNetV2 / DenseNet) where there is one, so that checkpoints
look like the real thing. Pure torch, except that small_cnn(norm="frn"|"mabn") imports normcli.layers when called.

``MODELS`` maps each name to ``(factory, example input shape with batch 2)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------
# ResNet (torchvision layout: conv1/bn1/relu/maxpool/layer1..N/avgpool/fc)
# --------------------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` module is called after bn1 and again after the add."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (1x1, 3x3, 1x1, expansion 4); ``self.relu`` is called three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int = 8,
    ):
        super().__init__()
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for index, (blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
            stride = 1 if index == 1 else 2
            setattr(self, f"layer{index}", self._make_layer(block, width, blocks, stride))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        modules = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        modules += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_tiny(
    num_classes: int = 10,
    in_channels: int = 3,
    widths: tuple[int, ...] = (8, 16, 32),
    layers: tuple[int, ...] = (2, 1, 1),
) -> ResNet:
    """ResNet with BasicBlocks; stages 2 and 3 downsample through a conv1x1 + BN branch."""
    return ResNet(BasicBlock, tuple(layers), tuple(widths), num_classes, in_channels, stem_width=widths[0])


def resnet_bottleneck_tiny(
    num_classes: int = 10,
    in_channels: int = 3,
    widths: tuple[int, ...] = (4, 8),
    layers: tuple[int, ...] = (1, 1),
) -> ResNet:
    """ResNet with Bottleneck blocks (expansion 4); every stage has a downsample branch."""
    return ResNet(Bottleneck, tuple(layers), tuple(widths), num_classes, in_channels, stem_width=8)


# --------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout: features.N / InvertedResidual.conv / classifier)
# --------------------------------------------------------------------------------------------------------


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with ReLU6: ``0`` conv, ``1`` BN, ``2`` ReLU6."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1 (BN, no activation); residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden_dim = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int = 8,
        # (expand ratio t, output channels c, repeats n, first stride s), as in the paper's table 2
        settings: tuple[tuple[int, int, int, int], ...] = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)),
        last_channel: int = 64,
        dropout: float = 0.2,
    ):
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(in_channels, stem_width, stride=2)]
        inp = stem_width
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, expand_ratio=t))
                inp = c
        features.append(ConvBNReLU6(inp, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenetv2_tiny(num_classes: int = 10, in_channels: int = 3, last_channel: int = 64) -> MobileNetV2:
    """MobileNetV2 with inverted residuals: ReLU6, depthwise convs, linear bottlenecks."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, last_channel=last_channel)


# --------------------------------------------------------------------------------------------------------
# DenseNet (torchvision layout: features.conv0/norm0/relu0/pool0, denseblockN.denselayerM, transitionN,
# norm5, then a functional ReLU)
# --------------------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """Pre-activation bottleneck: BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(
        self,
        growth_rate: int = 4,
        block_config: tuple[int, ...] = (2, 2),
        num_init_features: int = 8,
        bn_size: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, growth_rate, bn_size)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))  # torchvision's name
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)  # the final BN -> ReLU, functional as in torchvision
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet_tiny(num_classes: int = 10, in_channels: int = 3, growth_rate: int = 4) -> DenseNet:
    """DenseNet with pre-activation layers, concatenation, one transition and a final BN -> ReLU."""
    return DenseNet(growth_rate=growth_rate, num_classes=num_classes, in_channels=in_channels)


# --------------------------------------------------------------------------------------------------------
# Transposed-convolution decoders (output channels are dim 1 of a ConvTranspose weight)
# --------------------------------------------------------------------------------------------------------


class ConvTransposeDecoder(nn.Module):
    def __init__(self, dims: int = 2, in_channels: int = 16, out_channels: int = 3, width: int = 8):
        super().__init__()
        deconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        # upsample x2, no bias (the BN supplies it)
        self.deconv1 = deconv(in_channels, 2 * width, kernel_size=4, stride=2, padding=1, bias=False)
        self.bn1 = norm(2 * width)
        self.relu1 = nn.ReLU(inplace=True)
        # grouped: each group of output channels sees only its own input group
        self.deconv2 = deconv(2 * width, width, kernel_size=3, stride=1, padding=1, groups=2, bias=True)
        self.bn2 = norm(width)
        self.relu2 = nn.ReLU(inplace=True)
        # stride 2 with output_padding, the usual way to get an exact x2 from a 3x3 kernel
        self.deconv3 = deconv(width, width, kernel_size=3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn3 = norm(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.head = conv(width, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.deconv1(x)))
        x = self.relu2(self.bn2(self.deconv2(x)))
        x = self.relu3(self.bn3(self.deconv3(x)))
        return torch.tanh(self.head(x))


def convtranspose_decoder(in_channels: int = 16, out_channels: int = 3, width: int = 8) -> ConvTransposeDecoder:
    """ConvTranspose2d + BN + ReLU decoder, with a grouped and a stride-2/output_padding transpose conv."""
    return ConvTransposeDecoder(2, in_channels, out_channels, width)


def convtranspose1d_decoder(in_channels: int = 8, out_channels: int = 1, width: int = 4) -> ConvTransposeDecoder:
    """The same decoder on sequences: ConvTranspose1d + BatchNorm1d."""
    return ConvTransposeDecoder(1, in_channels, out_channels, width)


def convtranspose3d_decoder(in_channels: int = 4, out_channels: int = 1, width: int = 4) -> ConvTransposeDecoder:
    """The same decoder on volumes: ConvTranspose3d + BatchNorm3d."""
    return ConvTransposeDecoder(3, in_channels, out_channels, width)


# --------------------------------------------------------------------------------------------------------
# Heads and 1d/3d nets
# --------------------------------------------------------------------------------------------------------


class MLPHead(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear on (N, F) features, as in SimCLR/BYOL projection heads."""

    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.bn(self.fc1(x))))


def mlp_head(in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> MLPHead:
    """Linear -> BatchNorm1d -> ReLU -> Linear."""
    return MLPHead(in_features, hidden, num_classes)


class ConvNet1d(nn.Module):
    def __init__(self, in_channels: int = 4, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, 8, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()
        # strided and dilated, with a bias that the BN makes redundant (common in converted models)
        self.conv2 = nn.Conv1d(8, 16, kernel_size=3, stride=2, padding=2, dilation=2, bias=True)
        self.bn2 = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=2))


def conv1d_net(in_channels: int = 4, num_classes: int = 5) -> ConvNet1d:
    """Conv1d + BatchNorm1d on (N, C, L): one conv without bias, one strided, dilated, with bias."""
    return ConvNet1d(in_channels, num_classes)


class ConvNet3d(nn.Module):
    def __init__(self, in_channels: int = 2, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 8, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv3d(8, 8, kernel_size=3, stride=2, padding=2, dilation=2, bias=True)
        self.bn2 = nn.BatchNorm3d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3, 4)))


def conv3d_net(in_channels: int = 2, num_classes: int = 5) -> ConvNet3d:
    """Conv3d + BatchNorm3d on (N, C, D, H, W): one conv without bias, one strided, dilated, with bias."""
    return ConvNet3d(in_channels, num_classes)


# --------------------------------------------------------------------------------------------------------
# Dataflow traps: structures where pairing convs and norms by module order or by name goes wrong
# --------------------------------------------------------------------------------------------------------


class TwoConsumers(nn.Module):
    """``self.conv``'s output feeds ``self.bn`` and is also added to the BN's output (a skip around it)."""

    def __init__(self, in_channels: int = 3, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        y = self.conv(x)
        x = self.relu(self.bn(y) + y)
        return self.fc(x.mean(dim=(2, 3)))


def two_consumers(in_channels: int = 3, channels: int = 8, num_classes: int = 10) -> TwoConsumers:
    """A conv whose output has two consumers: the BN after it and a residual add around that BN."""
    return TwoConsumers(in_channels, channels, num_classes)


class SpecialFirstBN(nn.Module):
    """conv -> BN(**bn1_options) -> ReLU -> conv -> BN -> ReLU -> head: the first BN is the unusual one."""

    def __init__(self, in_channels: int = 3, channels: int = 8, num_classes: int = 10, **bn1_options):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=bn1_options.get("affine", True) is False)
        self.bn1 = nn.BatchNorm2d(channels, **bn1_options)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def affine_false(in_channels: int = 3, channels: int = 8, num_classes: int = 10) -> SpecialFirstBN:
    """``bn1`` has ``affine=False`` (running statistics, no weight or bias); ``bn2`` is ordinary."""
    return SpecialFirstBN(in_channels, channels, num_classes, affine=False)


def no_track_stats(in_channels: int = 3, channels: int = 8, num_classes: int = 10) -> SpecialFirstBN:
    """``bn1`` has ``track_running_stats=False``: it normalises with batch statistics even in eval."""
    return SpecialFirstBN(in_channels, channels, num_classes, track_running_stats=False)


class OutOfOrder(nn.Module):
    """Definition order conv_b, bn_a, conv_a, bn_b; call order conv_a -> bn_a -> conv_b -> bn_b.

    Every (conv, next BN) pair in module order is wrong, and all have the same channel count, so a wrong
    pairing raises no shape error: it silently computes something else.
    """

    def __init__(self, in_channels: int = 8, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(channels)
        self.conv_a = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_a(self.conv_a(x)))
        x = self.relu(self.bn_b(self.conv_b(x)))
        return self.fc(x.mean(dim=(2, 3)))


def out_of_order(in_channels: int = 8, channels: int = 8, num_classes: int = 10) -> OutOfOrder:
    """Modules defined in one order and called in another, so that pairing by module order is wrong."""
    return OutOfOrder(in_channels, channels, num_classes)


class SharedConv(nn.Module):
    """``self.conv`` is called twice; each call is followed by its own BN (``bn1``, ``bn2``)."""

    def __init__(self, in_channels: int = 3, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        x = self.relu(self.bn1(self.conv(x)))
        x = self.relu(self.bn2(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def shared_conv(in_channels: int = 3, channels: int = 8, num_classes: int = 10) -> SharedConv:
    """One conv module called at two places, each call followed by a different BN."""
    return SharedConv(in_channels, channels, num_classes)


class BNBeforeConv(nn.Module):
    """A BN feeding a conv directly: ``bn_in -> conv_valid`` (padding 0), ``bn_mid -> conv_same`` (padding 1).

    With padding 0 the BN's affine map folds exactly into the conv after it; with zero padding the padded
    border sees 0 rather than the BN's shift, so that fold would not be exact.
    """

    def __init__(self, in_channels: int = 4, channels: int = 8, num_classes: int = 10):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(in_channels)
        self.conv_valid = nn.Conv2d(in_channels, channels, 3, padding=0, bias=True)
        self.relu = nn.ReLU()
        self.bn_mid = nn.BatchNorm2d(channels)
        self.conv_same = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv_valid(self.bn_in(x)))
        x = self.relu(self.conv_same(self.bn_mid(x)))
        return self.fc(x.mean(dim=(2, 3)))


def bn_before_conv(in_channels: int = 4, channels: int = 8, num_classes: int = 10) -> BNBeforeConv:
    """BN -> conv with padding 0 (exact to fold forward) and BN -> conv with padding 1 (not exact)."""
    return BNBeforeConv(in_channels, channels, num_classes)


# --------------------------------------------------------------------------------------------------------
# Small CNN for the small-batch training demo (1x8x8 digit images, 10 classes)
# --------------------------------------------------------------------------------------------------------



def _frn_tlu(num_features: int) -> tuple[nn.Module, nn.Module]:
    # The TLU inside FRN is the activation: FRN + TLU replaces BatchNorm + ReLU together, so no ReLU follows.
    from normcli.layers import FilterResponseNorm2d

    return FilterResponseNorm2d(num_features), nn.Identity()


def _mabn(num_features: int, B: int = 2, real_B: int = 32) -> nn.Module:
    # B: the batch one training step sees; real_B: the batch whose statistics MABN emulates.
    from normcli.layers import MABN2d

    return MABN2d(num_features, B=B, real_B=real_B)


# norm name -> factory(num_features, **norm_kwargs) returning the norm (a ReLU follows it) or a
# (norm, activation) pair; other normalisations are added here, not by new if-branches
SMALL_CNN_NORMS: dict[str, Callable[..., nn.Module | tuple[nn.Module, nn.Module]]] = {
    "bn": nn.BatchNorm2d,
    "frn": _frn_tlu,
    "mabn": _mabn,
}


def _norm_and_activation(
    make_norm: Callable, num_features: int, norm_kwargs: dict
) -> tuple[nn.Module, nn.Module]:
    made = make_norm(num_features, **norm_kwargs)
    return made if isinstance(made, tuple) else (made, nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(
        self,
        norm: str = "bn",
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        norm_kwargs: dict | None = None,
    ):
        super().__init__()
        if norm not in SMALL_CNN_NORMS:
            raise ValueError(f"unknown norm {norm!r} for small_cnn; choose one of {sorted(SMALL_CNN_NORMS)}")
        make_norm, kwargs = SMALL_CNN_NORMS[norm], norm_kwargs or {}
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1, self.relu1 = _norm_and_activation(make_norm, width, kwargs)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2, self.relu2 = _norm_and_activation(make_norm, 2 * width, kwargs)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3, self.relu3 = _norm_and_activation(make_norm, 2 * width, kwargs)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def small_cnn(
    norm: str = "bn",
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    norm_kwargs: dict | None = None,
) -> SmallCNN:
    """Three conv + norm + activation stages for 1x8x8 digit images.

    ``norm`` picks from ``SMALL_CNN_NORMS`` ("frn" is FRN + TLU with no ReLU); ``norm_kwargs`` go to its
    factory, e.g. ``{"B": 2, "real_B": 32}`` for "mabn".
    """
    return SmallCNN(norm, num_classes, in_channels, width, norm_kwargs)


# --------------------------------------------------------------------------------------------------------
# A net whose layer names say what make_samples.py breaks in them (the unhealthy.pt sample)
# --------------------------------------------------------------------------------------------------------

UNHEALTHY_LAYERS = (
    "healthy",
    "stale",
    "nan",
    "negative_var",
    "tiny_var",
    "dead",
    "fp16_overflow",
    "mixed_tracking",
)


class UnhealthyNet(nn.Module):
    """A chain of conv -> BN -> ReLU stages named ``conv_<problem>`` / ``bn_<problem>``.

    The architecture itself is ordinary; make_samples.py trains it and then writes one problem into each
    ``bn_<problem>`` (``bn_healthy`` stays healthy).
    """

    def __init__(self, in_channels: int = 3, channels: int = 8, num_classes: int = 10):
        super().__init__()
        for index, problem in enumerate(UNHEALTHY_LAYERS):
            conv_in = in_channels if index == 0 else channels
            setattr(self, f"conv_{problem}", nn.Conv2d(conv_in, channels, 3, padding=1, bias=False))
            setattr(self, f"bn_{problem}", nn.BatchNorm2d(channels))
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for problem in UNHEALTHY_LAYERS:
            x = self.relu(getattr(self, f"bn_{problem}")(getattr(self, f"conv_{problem}")(x)))
        return self.fc(x.mean(dim=(2, 3)))


def unhealthy_net(in_channels: int = 3, channels: int = 8, num_classes: int = 10) -> UnhealthyNet:
    """The architecture of unhealthy.pt: ``bn_healthy``, ``bn_stale``, ``bn_nan``, ... (see samples/README.md)."""
    return UnhealthyNet(in_channels, channels, num_classes)


# --------------------------------------------------------------------------------------------------------
# Several positional inputs (an image and a feature vector), as in models that join a picture with metadata
# --------------------------------------------------------------------------------------------------------


class ImageAndFeatures(nn.Module):
    """``forward(image, features)``: conv -> BN2d -> ReLU on the image, Linear -> BN1d -> ReLU on the (N, F)
    features, then a linear head on both. The BN1d sees (N, C) inputs: only a probe with the second input
    tells a swap so."""

    def __init__(self, in_channels: int = 3, num_features: int = 6, width: int = 8, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn_image = nn.BatchNorm2d(width)
        self.proj = nn.Linear(num_features, width, bias=False)
        self.bn_features = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn_image(self.conv(image))).mean(dim=(2, 3))
        b = self.relu(self.bn_features(self.proj(features)))
        return self.head(torch.cat([a, b], dim=1))


def image_and_features(in_channels: int = 3, num_features: int = 6, width: int = 8,
                       num_classes: int = 4) -> ImageAndFeatures:
    """Two positional inputs, ``image`` (N, C, H, W) and ``features`` (N, F); not in ``MODELS``, whose entries
    take one input."""
    return ImageAndFeatures(in_channels, num_features, width, num_classes)


# example input shapes (batch 2), one per positional input
MULTI_INPUT_MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[tuple[int, ...], ...]]] = {
    "image_and_features": (image_and_features, ((2, 3, 16, 16), (2, 6))),
}

# --------------------------------------------------------------------------------------------------------

MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "resnet_tiny": (resnet_tiny, (2, 3, 32, 32)),
    "resnet_bottleneck_tiny": (resnet_bottleneck_tiny, (2, 3, 32, 32)),
    "mobilenetv2_tiny": (mobilenetv2_tiny, (2, 3, 32, 32)),
    "densenet_tiny": (densenet_tiny, (2, 3, 32, 32)),
    "convtranspose_decoder": (convtranspose_decoder, (2, 16, 4, 4)),
    "convtranspose1d_decoder": (convtranspose1d_decoder, (2, 8, 16)),
    "convtranspose3d_decoder": (convtranspose3d_decoder, (2, 4, 2, 4, 4)),
    "mlp_head": (mlp_head, (2, 32)),
    "two_consumers": (two_consumers, (2, 3, 16, 16)),
    "affine_false": (affine_false, (2, 3, 16, 16)),
    "no_track_stats": (no_track_stats, (2, 3, 16, 16)),
    "conv1d_net": (conv1d_net, (2, 4, 32)),
    "conv3d_net": (conv3d_net, (2, 2, 8, 8, 8)),
    "out_of_order": (out_of_order, (2, 8, 16, 16)),
    "shared_conv": (shared_conv, (2, 3, 16, 16)),
    "bn_before_conv": (bn_before_conv, (2, 4, 16, 16)),
    "small_cnn": (small_cnn, (2, 1, 8, 8)),
    "unhealthy_net": (unhealthy_net, (2, 3, 16, 16)),
}
