"""The CLIP model: a vision tower, a BERT text tower, two projections and a logit scale.
State-dict keys are cn_clip's, so its checkpoints load and ours load in cn_clip."""
from __future__ import annotations

import math

import torch
from torch import nn

from .bert import BertModel
from .config import CLIPConfig
from .initializers import init_normal_
from .resnet import ModifiedResNet
from .transforms import normalize_pixels
from .vit import VisionTransformer

PAD_ID = 0  # "[PAD]" in the Chinese BERT vocabulary


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        tower = ModifiedResNet if cfg.vision.is_resnet else VisionTransformer
        self.visual = tower(cfg.vision, cfg.embed_dim)
        self.bert = BertModel(cfg.text)
        self.text_projection = nn.Parameter(torch.empty(cfg.text.hidden_size, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.vision_frozen = False
        self._init_parameters()

    def _init_parameters(self) -> None:
        init_normal_(self.text_projection, self.config.text.hidden_size**-0.5)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                init_normal_(proj.weight, std)
            for name, param in self.visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(param)  # each residual block starts as identity

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.bert.set_grad_checkpointing(enable)

    def freeze_vision(self, unfrozen_layers: int = 0) -> None:
        """Stop training the vision tower, except (unfrozen_layers > 0) its last that many
        blocks (ViT residual blocks, ResNet stages) and its head (final norm and projection, or
        the attention pool), as open_clip's --lock-image-unlocked-groups. A wholly frozen tower
        stays in eval mode: ResNet BatchNorm statistics stay fixed too."""
        self.visual.requires_grad_(False)
        if isinstance(self.visual, ModifiedResNet):
            blocks, head = [self.visual.layer1, self.visual.layer2, self.visual.layer3,
                            self.visual.layer4], [self.visual.attnpool]
        else:
            blocks, head = list(self.visual.transformer.resblocks), [self.visual.ln_post, self.visual.proj]
        _unfreeze(blocks, head, unfrozen_layers, "vision")
        self.vision_frozen = unfrozen_layers == 0
        self.train(self.training)

    def freeze_text(self, unfrozen_layers: int = 0) -> None:
        """Stop training the text tower (BERT and the text projection), except (unfrozen_layers
        > 0) its last that many encoder layers and the projection, as open_clip's
        --lock-text-unlocked-layers."""
        self.bert.requires_grad_(False)
        self.text_projection.requires_grad_(False)
        _unfreeze(list(self.bert.encoder.layer), [self.text_projection], unfrozen_layers, "text")

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if self.vision_frozen:
            self.visual.eval()
        return self

    def encode_image(self, image: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """Unnormalised image features [N, embed_dim] of preprocessed images: normalised floats
        (cn_clip's preprocess) or uint8 pixels (a `pixels=True` transform), normalised here."""
        if image.dtype == torch.uint8:
            image = normalize_pixels(image)
        return self.visual(image.to(self.dtype), mask_ratio)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features [N, embed_dim] from [CLS]; padding (id 0) is masked."""
        hidden = self.bert(text, attention_mask=text.ne(PAD_ID))
        return hidden[:, 0, :].to(self.dtype) @ self.text_projection

    def forward(self, image: torch.Tensor | None, text: torch.Tensor | None, mask_ratio: float = 0.0):
        """Both given: (normalised image features, normalised text features, logit_scale.exp()).
        One given: that modality's unnormalised features, as cn_clip."""
        if image is None and text is None:
            raise ValueError("text and image cannot both be None")
        if image is None:
            return self.encode_text(text)
        if text is None:
            return self.encode_image(image, mask_ratio)
        image_features = normalize_features(self.encode_image(image, mask_ratio))
        text_features = normalize_features(self.encode_text(text))
        return image_features, text_features, self.logit_scale.exp()

    def get_similarity(self, image: torch.Tensor, text: torch.Tensor):
        """(logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img])."""
        image_features = normalize_features(self.encode_image(image))
        text_features = normalize_features(self.encode_text(text))
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    """Unit-length rows (cn_clip's `x / x.norm(dim=-1, keepdim=True)`): the one feature
    normaliser of the model, the batch jobs and the Serve app."""
    return features / features.norm(dim=-1, keepdim=True)


def _unfreeze(blocks: list, head: list, count: int, tower: str) -> None:
    """Train again the last `count` of `blocks` and the `head` (modules or parameters)."""
    if not 0 <= count <= len(blocks):
        raise ValueError(f"{count} unfrozen {tower} layers: the {tower} tower has {len(blocks)}")
    if count:
        for part in blocks[len(blocks) - count:] + head:
            part.requires_grad_(True)
