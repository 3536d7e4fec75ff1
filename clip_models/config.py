"""Typed model configs. Named sizes live in `configs/*.json` (cn_clip's own
`model_configs` format, so a cn_clip user's custom config files drop in)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

# The five released models: name -> "vision@text" struct, as cn_clip's _MODEL_INFO.
OFFICIAL_STRUCTS = {
    "RN50": "RN50@RBT3-chinese",
    "ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14": "ViT-L-14@RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14-336": "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
    "ViT-H-14": "ViT-H-14@RoBERTa-wwm-ext-large-chinese",
}


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224  # square input resolution in pixels
    layers: int | tuple[int, ...] = 12  # ViT depth, or ResNet blocks per stage (4-tuple)
    width: int = 768  # ViT hidden width, or ResNet stem width
    patch_size: int | None = 16  # ViT patch size; None for ResNet
    head_width: int = 64  # channels per attention head (ViT-H uses 80)

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.is_resnet:
            if len(self.layers) != 4:
                raise ValueError(f"ResNet vision needs 4 stages, got layers={self.layers}")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
        else:
            if not self.patch_size or self.image_size % self.patch_size:
                raise ValueError(f"ViT image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.heads * self.head_width != (self.width * 32 if self.is_resnet else self.width):
            raise ValueError(f"vision width {self.width} is not divisible by head_width {self.head_width}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 21128  # WordPiece vocabulary size
    hidden_size: int = 768  # BERT width
    num_layers: int = 12  # BERT depth
    num_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # MLP width
    max_position_embeddings: int = 512  # longest token sequence the model accepts
    type_vocab_size: int = 2  # segment embeddings (only segment 0 is used)
    hidden_act: str = "gelu"  # erf GELU, as Google BERT
    hidden_dropout: float = 0.1  # dropout after embeddings / attention output / MLP
    attention_dropout: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # std of the normal init

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {self.hidden_act!r}")


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512  # joint embedding size
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        return cls(d["embed_dim"], VisionConfig(**d["vision"]), TextConfig(**d["text"]))

    def struct_name(self) -> str:
        """The "vision@text" name of the matching named configs, or "custom"."""
        vision = next((n for n in config_names("vision") if _vision_matches(n, self)), "custom")
        text = next((n for n in config_names("text") if load_text_json(n) == self.text), "custom")
        return f"{vision}@{text}"


def _vision_matches(name: str, cfg: CLIPConfig) -> bool:
    embed_dim, vision = load_vision_json(name)
    return embed_dim == cfg.embed_dim and vision == cfg.vision


def config_names(kind: str) -> list[str]:
    """Named vision or text configs shipped in `configs/`."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return [n for n in names if ("vocab_size" in _read(n)) == (kind == "text")]


def _read(name: str) -> dict:
    path = CONFIG_DIR / f"{name.replace('/', '-')}.json"
    if not path.is_file():
        path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}")
    return json.loads(path.read_text())


def load_vision_json(name: str) -> tuple[int, VisionConfig]:
    d = _read(name)
    layers = d["vision_layers"]
    if isinstance(layers, str):  # cn_clip writes RN50's stages as the string "[3,4,6,3]"
        layers = json.loads(layers)
    vision = VisionConfig(
        image_size=d["image_resolution"],
        layers=tuple(layers) if isinstance(layers, list) else layers,
        width=d["vision_width"],
        patch_size=d.get("vision_patch_size"),
        head_width=d.get("vision_head_width", 64),
    )
    return d["embed_dim"], vision


def load_text_json(name: str) -> TextConfig:
    d = _read(name)
    return TextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["text_hidden_size"],
        num_layers=d["text_num_hidden_layers"],
        num_heads=d["text_num_attention_heads"],
        intermediate_size=d["text_intermediate_size"],
        max_position_embeddings=d["text_max_position_embeddings"],
        type_vocab_size=d["text_type_vocab_size"],
        hidden_act=d.get("text_hidden_act", "gelu"),
        hidden_dropout=d.get("text_hidden_dropout_prob", 0.1),
        attention_dropout=d.get("text_attention_probs_dropout_prob", 0.1),
        initializer_range=d.get("text_initializer_range", 0.02),
    )


def config_from_names(vision_model: str, text_model: str) -> CLIPConfig:
    """Build a config from cn_clip-style names, e.g. ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")."""
    embed_dim, vision = load_vision_json(vision_model)
    return CLIPConfig(embed_dim, vision, load_text_json(text_model))


def config_from_struct(struct: str) -> CLIPConfig:
    """"ViT-B-16@RoBERTa-wwm-ext-base-chinese" or an official model name."""
    struct = OFFICIAL_STRUCTS.get(struct, struct)
    if "@" not in struct:
        raise ValueError(f"expected 'vision@text' or one of {list(OFFICIAL_STRUCTS)}, got {struct!r}")
    vision, text = struct.split("@", 1)
    return config_from_names(vision, text)
