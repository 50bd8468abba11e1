"""ECMNet and its ablation variants (paper Table 1), built from a plain dataclass configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.model.edab import EDABStage
from ecmnet_core.model.ffm import FFM
from ecmnet_core.model.layers import (
    PA,
    BNPReLU,
    ConvBNPReLU,
    DownSamplingBlock,
    LongConnection,
    UpsamplingBlock,
    resize_to,
)
from ecmnet_core.model.msau import MSAU


@dataclass
class ModelConfig:
    """Everything needed to rebuild an ECMNet; stored in checkpoints.

    The three switches reproduce the ablation ladder: baseline -> +long connections -> +MSAU -> +FFM.
    """

    name: str = "ecmnet"
    num_classes: int = 19
    long_connections: bool = True
    msau: bool = True
    ffm: bool = True
    stem_channels: int = 32
    widths: tuple[int, int, int] = (64, 128, 32)
    stage_dilations: tuple[tuple[int, ...], ...] = (
        (2, 2, 2),
        (4, 4, 8, 8, 16, 16),
        (1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32),
    )
    decoder_widths: tuple[int, int, int] = (32, 16, 16)
    decoder_dilations: tuple[int, ...] = (2, 2, 2)
    ffm_width: int = 128
    ffm_ratio: float = 2.5
    d_state: int = 16
    ssm_expand: float = 2.0
    scan_backend: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        data = dict(data)
        for key in ("widths", "decoder_widths", "decoder_dilations"):
            if key in data:
                data[key] = tuple(data[key])
        if "stage_dilations" in data:
            data["stage_dilations"] = tuple(tuple(d) for d in data["stage_dilations"])
        return cls(**data)


#: The paper's network and the ablation variants of its Table 1.
VARIANTS: dict[str, dict[str, bool]] = {
    "baseline": {"long_connections": False, "msau": False, "ffm": False},
    "lines": {"long_connections": True, "msau": False, "ffm": False},
    "lines_msau": {"long_connections": True, "msau": True, "ffm": False},
    "ecmnet": {"long_connections": True, "msau": True, "ffm": True},
}


def model_config(name: str = "ecmnet", num_classes: int = 19, **overrides) -> ModelConfig:
    """The named configuration (``ecmnet``, ``baseline``, ``lines``, ``lines_msau``) with overrides applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    return ModelConfig(name=name, num_classes=num_classes, **{**VARIANTS[name], **overrides})


class ECMNet(nn.Module):
    """U-shaped CNN-Mamba segmenter. (B, 3, H, W) normalised image -> (B, num_classes, H, W) logits.

    Encoder: stem (1/2) -> E1 (64 @ 1/4) -> E2 (128 @ 1/8) -> E3 (32 @ 1/16).
    Skips: M_i = MSAU_i(E_i), projected by LongConnection_i and added in the decoder at the same scale.
    Bottleneck: FFM over [M1, M2, M3, E3]. Decoder: EDABs + transposed convs back to 1/2, PA, head.
    """

    #: The bias-free 1x1 classifier and the bilinear upsampling are both linear, so they commute: applying the
    #: classifier first (at 1/2 resolution, on num_classes instead of 16 channels) is the same function with less
    #: work. Off by default so that the cost tables count the paper's layer order; inference turns it on.
    classify_before_upsample: bool = False
    #: Training only, with ``classify_before_upsample``: return the 1/2-resolution class logits and leave the final
    #: bilinear upsampling to the loss (:class:`ecmnet_core.train.losses.WeightedCrossEntropy`), which fuses it with
    #: the cross-entropy on the CPU. Same loss; the fast training path turns it on.
    upsample_in_loss: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        w1, w2, w3 = c.widths
        d3, d2, d1 = c.decoder_widths
        s = c.stem_channels
        self.stem = nn.Sequential(
            ConvBNPReLU(3, s, 3, stride=2, padding=1),
            ConvBNPReLU(s, s, 3, padding=1),
            ConvBNPReLU(s, s, 3, padding=1),
            BNPReLU(s),
        )
        self.down1 = DownSamplingBlock(s, w1)
        self.stage1 = EDABStage(w1, c.stage_dilations[0])
        self.down2 = DownSamplingBlock(w1, w2)
        self.stage2 = EDABStage(w2, c.stage_dilations[1])
        self.down3 = DownSamplingBlock(w2, w3)
        self.stage3 = EDABStage(w3, c.stage_dilations[2])

        self.msau = nn.ModuleList([MSAU(w) for w in (w1, w2, w3)]) if c.msau else None
        self.ffm = FFM(w1 + w2 + w3 + w3, c.ffm_width, d3, c.ffm_ratio, c.d_state, c.ssm_expand,
                       c.scan_backend) if c.ffm else None
        if c.long_connections:
            self.long = nn.ModuleList([LongConnection(w3, d3), LongConnection(w2, d2), LongConnection(w1, d1)])
        else:
            self.long = None

        # in the decoder the BNPReLU follows the upsampling instead of closing the stage
        self.dec3 = EDABStage(d3, c.decoder_dilations, closing_norm=False)
        self.up3 = UpsamplingBlock(d3, d2)
        self.bn3 = BNPReLU(d2)
        self.dec2 = EDABStage(d2, c.decoder_dilations, closing_norm=False)
        self.up2 = UpsamplingBlock(d2, d1)
        self.bn2 = BNPReLU(d1)
        self.dec1 = EDABStage(d1, c.decoder_dilations, closing_norm=False)
        self.up1 = UpsamplingBlock(d1, d1)
        self.pa = PA(d1)
        self.bn1 = BNPReLU(d1)
        self.classifier = nn.Conv2d(d1, c.num_classes, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LETNet framework init: kaiming-normal conv weights, BN at identity; SS2D keeps its own special inits."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def scan_backend(self, device: torch.device | str | None = None) -> str | None:
        """The selective-scan backend the FFM runs on ``device`` (None for variants without FFM)."""
        if self.ffm is None:
            return None
        device = device or next(self.parameters()).device
        return self.ffm.vss.ss2d.scan.resolved_backend(device)

    def forward(self, x: Tensor, upsample: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, K, H, W) class logits. ``upsample=False`` returns them at the decoder's 1/2
        resolution instead (the classifier applied there), for callers that resample to the size they need in one
        step (:func:`ecmnet_core.inference.pipeline.logits_to_labels`)."""
        stem = self.stem(x)
        e1 = self.stage1(self.down1(stem))
        e2 = self.stage2(self.down2(e1))
        e3 = self.stage3(self.down3(e2))
        skips = [e1, e2, e3]
        if self.msau is not None:
            skips = [m(e) for m, e in zip(self.msau, skips)]
        y = self.ffm([*skips, e3]) if self.ffm is not None else e3

        y = self.dec3(y)
        if self.long is not None:
            y = y + self.long[0](skips[2])
        y = self.bn3(resize_to(self.up3(y), e2))
        y = self.dec2(y)
        if self.long is not None:
            y = y + self.long[1](skips[1])
        y = self.bn2(resize_to(self.up2(y), e1))
        y = self.dec1(y)
        if self.long is not None:
            y = y + self.long[2](skips[0])
        y = self.bn1(self.pa(resize_to(self.up1(y), stem)))
        if self.classify_before_upsample or not upsample:
            logits = self.classifier(y)
            if (self.upsample_in_loss and self.training) or not upsample:
                return logits
            # NCHW for the upsampling: with 11-19 channels the channels-last CPU kernel vectorises poorly (3 vs 2 ms)
            return F.interpolate(logits.contiguous(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(y)


def build_model(name: str | ModelConfig = "ecmnet", num_classes: int = 19, **overrides) -> ECMNet:
    """Build a named variant, or from a :class:`ModelConfig`."""
    config = name if isinstance(name, ModelConfig) else model_config(name, num_classes, **overrides)
    return ECMNet(config)
