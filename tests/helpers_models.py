"""Factories for the `python:` model references exercised in test_models.py."""
from __future__ import annotations

import torch
from torch import nn


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A two-layer CNN that honours num_classes and in_channels."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def no_kwargs() -> nn.Module:
    """A factory that takes no arguments at all."""
    return nn.Linear(3, 2)


def not_a_module() -> int:
    """A factory that returns something other than an nn.Module."""
    return 42


class ScaledNet(nn.Module):
    """A CNN with a bare nn.Parameter (a per-channel scale) that torch-pruning cannot attribute to a layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        import torch

        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.conv(x) * self.scale)


def with_custom_scale(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ScaledNet(num_classes, in_channels)


# -- tiny members of three architecture families, for the end-to-end coverage test
def tiny_resnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet (BasicBlock, residual adds and downsampling shortcuts), one block per stage."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, width_per_group=64)


def tiny_mobilenet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's MobileNetV2 at width 0.25: depthwise convolutions and inverted residuals."""
    from torchvision.models import MobileNetV2

    return MobileNetV2(num_classes=num_classes, width_mult=0.25)


def tiny_resnext(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNeXt-style Bottleneck (grouped 3x3 convolutions, groups=4), one block per stage."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, groups=4, width_per_group=8)


def tiny_vit(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's VisionTransformer (nn.MultiheadAttention, class token, position embedding) on 32x32."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=256,
                              num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises it: parity would prove nothing
    return model


def tiny_vit4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """tiny_vit with 4 heads of 8 per layer (head pruning)."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def tiny_timm_vit(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """timm's VisionTransformer (packed qkv Attention with attn_dim) on 32x32, 4 heads of 8."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, in_chans=in_channels, embed_dim=32, depth=2, num_heads=4,
                             mlp_ratio=2.0, num_classes=num_classes)


def tiny_hf_vit(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Hugging Face's ViTForImageClassification (ViTAttention: separate query/key/value, output.dense), 4 heads."""
    from transformers import ViTConfig, ViTForImageClassification

    from compressor.models.hf import HFLogits

    config = ViTConfig(image_size=32, patch_size=8, num_channels=in_channels, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=num_classes)
    return HFLogits(ViTForImageClassification(config), "pixel_values")


def tiny_hf_deit(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Hugging Face's DeiTForImageClassification (the same attention layout as ViT), 4 heads."""
    from transformers import DeiTConfig, DeiTForImageClassification

    from compressor.models.hf import HFLogits

    config = DeiTConfig(image_size=32, patch_size=8, num_channels=in_channels, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=num_classes)
    return HFLogits(DeiTForImageClassification(config), "pixel_values")


def tiny_hf_bert(num_classes: int = 3) -> nn.Module:
    """Hugging Face's BertForSequenceClassification on token ids (vocabulary 100), 4 heads of 8."""
    from transformers import BertConfig, BertForSequenceClassification

    from compressor.models.hf import HFLogits

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=num_classes, max_position_embeddings=64)
    return HFLogits(BertForSequenceClassification(config), "input_ids")


def tiny_hf_roberta(num_classes: int = 3) -> nn.Module:
    """Hugging Face's RobertaForSequenceClassification (pad id 1, positions counted from it), 4 heads of 8."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from compressor.models.hf import HFText

    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, num_labels=num_classes, max_position_embeddings=66, pad_token_id=1)
    return HFText(RobertaForSequenceClassification(config), pad_token_id=1)


def tiny_hf_distilbert(num_classes: int = 3) -> nn.Module:
    """Hugging Face's DistilBertForSequenceClassification (q_lin/k_lin/v_lin/out_lin), 4 heads of 8."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from compressor.models.hf import HFLogits

    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=num_classes,
                              max_position_embeddings=64)
    return HFLogits(DistilBertForSequenceClassification(config), "input_ids")


def tiny_maxvit(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's MaxViT: torch-pruning's grouping does not terminate through its partitions."""
    from torchvision.models import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                  head_dim=8, stochastic_depth_prob=0.0, num_classes=num_classes)


def tiny_swin_shifted(num_classes: int = 10, in_channels: int = 3, v2: bool = False) -> nn.Module:
    """torchvision's Swin (v1, or v2 with cosine attention and a position-bias MLP) on 32x32 with window 2, so that
    both stages have shifted windows: stages of 2 and 4 heads of 8, two blocks each."""
    from torchvision.models import SwinTransformer
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[2, 2],
                           num_classes=num_classes, **extra)


def tiny_swin_v2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return tiny_swin_shifted(num_classes, in_channels, v2=True)


def tiny_timm_swin(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """timm's Swin Transformer (v1 WindowAttention with a relative position bias table) on 32x32: 2 and 4 heads of 8."""
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=num_classes,
                             in_chans=in_channels)


def tiny_swin(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's Swin Transformer (shifted-window attention, patch merging) on 32x32."""
    from torchvision.models import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=num_classes)


class _Ghost(nn.Module):
    """GhostNet's ghost module: a primary conv, a cheap depthwise conv of its output, both concatenated and sliced."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        init = (cout + 1) // 2
        self.out = cout
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False), nn.BatchNorm2d(init))

    def forward(self, x):
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)[:, :self.out]


class _GhostBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.ghost1, self.ghost2 = _Ghost(cin, mid), _Ghost(mid, cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.ghost2(self.ghost1(x)) + self.shortcut(x)


def tiny_ghostnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """GhostNet-like: concatenations, cheap depthwise ops and residual adds (torch-pruning couples channel i of a
    ghost module with channel i + width/2)."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _GhostBlock(16, 48, 32), _GhostBlock(32, 96, 64), _GhostBlock(64, 128, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def tiny_groupnorm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Convolutions followed by GroupNorm with 3 groups (24 channels in groups of 8), as in timm's EfficientNet-GN."""
    return nn.Sequential(nn.Conv2d(in_channels, 24, 3, padding=1), nn.GroupNorm(3, 24), nn.ReLU(),
                         nn.Conv2d(24, 48, 3, padding=1), nn.GroupNorm(3, 48), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, num_classes))


class GainConv2d(nn.Conv2d):
    """A weight-standardised conv with a per-output-channel gain (timm's ScaledStdConv2d, NFNets)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w * self.gain, self.bias, self.stride, self.padding)


def tiny_ws_conv(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), GainConv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))


class _CrossStage(nn.Module):
    """CSPNet's cross-stage split: half the channels go through a block, the other half around it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.merge = nn.Conv2d(2 * width, width, 1)

    def forward(self, x):
        a, b = self.expand(x).chunk(2, dim=1)
        return self.merge(torch.cat([self.block(a), b], 1))


def tiny_csp(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), _CrossStage(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))


class _FixedScale(nn.Module):
    """Scales channels by a buffer of the layer's original width: a custom block pruning silently breaks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width).view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.scale


def tiny_fixed_scale(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), _FixedScale(16),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


class _SharedPositional(nn.Module):
    """Two stages that call the same depthwise conv (timm's CoaT shares its conditional position encoding)."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.cpe = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.blocks = nn.ModuleList([nn.Sequential(self.cpe, nn.ReLU()), nn.Sequential(self.cpe, nn.ReLU())])
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def tiny_shared(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _SharedPositional(num_classes, in_channels)


class _TokenLSTM(nn.Module):
    """A conv stem, a bidirectional batch-first LSTM over the 8x8 tokens (timm's Sequencer), an MLP, a head."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 4, stride=4)
        self.rnn = nn.LSTM(16, 8, batch_first=True, bidirectional=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.rnn(tokens)[0]
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens.mean(1))


def tiny_lstm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _TokenLSTM(num_classes, in_channels)
