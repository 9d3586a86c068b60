"""Model definitions of the zoo.

Four small models are trained by the project itself on Fashion-MNIST (``flexiq-tvm train``) and
cover the layer kinds FlexiQ must handle: plain/strided/1x1 convolutions with BatchNorm and
residual adds (ResNet-20), depthwise convolutions with ReLU6 and inverted residuals
(MobileNetV2), multi-head attention with LayerNorm/GELU MLPs (ViT) and shifted-window attention
with patch merging (Swin).  The fifth, EfficientNet-Lite0, is the pretrained ImageNet model
shipped by the ``efficientnet-lite-pytorch`` package (see :mod:`flexiq_tvm.zoo.registry`).

All attention is written with explicit ``nn.Linear`` projections and ``matmul`` so that every
projection is a linear layer the quantizer sees, and the graph exports cleanly through both
``torch.export`` and ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# ResNet-20 (He et al. 2016, CIFAR variant) for 1x28x28 inputs
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # projection shortcut (option B): a strided 1x1 conv + BN
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20: a 3x3 stem, three stages of three basic blocks (16/32/64 channels), GAP, FC."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), scaled for 28x28 inputs
# --------------------------------------------------------------------------------------------


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with inverted residuals, depthwise 3x3 convs and ReLU6.

    Settings ``(expand t, channels c, repeats n, stride s)`` follow the paper's table, with
    fewer/narrower stages because the input is 28x28 (strides 1, 2, 2, 1, 2 -> 4x4 at the end).
    """

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1), (4, 96, 2, 2))

    def __init__(self, num_classes: int = 10, in_chans: int = 1, last: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(in_chans, 16, 3, 1)]
        cin = 16
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.classifier(self.dropout(x))


# --------------------------------------------------------------------------------------------
# Vision Transformer (Dosovitskiy et al. 2021)
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (all ``nn.Linear``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1))
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT with a convolutional patch embedding, a class token and learned positions."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img: int = 28,
        patch: int = 4,
        dim: int = 96,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------------
# Swin Transformer (Liu et al. 2021)
# --------------------------------------------------------------------------------------------


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _window_reverse(x: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    x = x.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _relative_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(h, w)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    win = _window_partition(img[None, :, :, None], ws).squeeze(-1)  # (nW, ws*ws)
    mask = win[:, None, :] - win[:, :, None]
    return mask.ne(0).float() * -100.0  # (nW, N, N)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block; ``shift > 0`` rolls the map by ``-shift`` first."""

    def __init__(self, dim: int, heads: int, res: int, ws: int, shift: int, mlp_ratio: float):
        super().__init__()
        if res <= ws:
            ws, shift = res, 0
        self.res, self.ws, self.shift, self.heads = res, ws, shift, heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.rel_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.02)
        self.register_buffer("rel_index", _relative_index(ws), persistent=False)
        mask = _shift_mask(res, res, ws, shift) if shift else torch.zeros(1, ws * ws, ws * ws)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = w = self.res
        ws, nw = self.ws, (self.res // self.ws) ** 2
        shortcut = x
        x = self.norm1(x).reshape(b, h, w, c)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = _window_partition(x, ws)  # (b*nW, ws*ws, c)
        rel = self.rel_table[self.rel_index.reshape(-1)].reshape(ws * ws, ws * ws, -1)
        rel = rel.permute(2, 0, 1)  # (heads, N, N)
        # bias per window: (b*nW, heads, N, N) = relative position bias + shift mask
        bias = (rel[None, None] + self.attn_mask[None, :, None]).expand(b, nw, -1, -1, -1)
        bias = bias.reshape(b * nw, self.heads, ws * ws, ws * ws)
        win = self.attn(win, bias)
        x = _window_reverse(win, ws, b, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (strided slices) and project 4C -> 2C."""

    def __init__(self, dim: int, res: int) -> None:
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.res, self.res, c)
        x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
        x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
        x = torch.cat([x0, x1, x2, x3], dim=-1).reshape(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    """Two-stage Swin: patch 2 (14x14 tokens, windows 7, shifted by 3), merge, 7x7 stage."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img: int = 28,
        patch: int = 2,
        dim: int = 32,
        depths: tuple[int, ...] = (2, 2),
        heads: tuple[int, ...] = (2, 4),
        ws: int = 7,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.embed_norm = nn.LayerNorm(dim)
        res = img // patch
        stages: list[nn.Module] = []
        for i, (d, h) in enumerate(zip(depths, heads)):
            if i > 0:
                stages.append(PatchMerging(dim, res))
                dim, res = dim * 2, res // 2
            for j in range(d):
                stages.append(SwinBlock(dim, h, res, ws, (ws // 2) if j % 2 else 0, mlp_ratio))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = self.norm(self.stages(x))
        return self.head(x.mean(dim=1))
