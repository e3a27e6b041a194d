"""The ``model`` section: image encoders, projectors and the language model.

Key names are the Cerebras Model Zoo 2.3 multimodal (``mm_simple``) names, so a params file
written for the Model Zoo loads unchanged. Keys that only change behaviour on Cerebras
hardware are accepted and documented in docs/params.md.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from mmgraph.core.config.base import Section

PositiveInt = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
Eps = Annotated[float, Field(gt=0.0)]

# Activations the model library implements; GLU variants double the first FFN layer.
Activation = Literal["gelu", "quick_gelu", "relu", "silu", "swish", "tanh", "sigmoid",
                     "swiglu", "geglu", "reglu"]
GLU_ACTIVATIONS = ("swiglu", "geglu", "reglu")


def _pair(value):
    """``336`` or ``[336, 336]`` -> ``(336, 336)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    return value


INITIALIZERS = ("normal", "truncated_normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "zeros",
                "constant")


class Initializer(Section):
    """Model Zoo initializer: ``{name: normal, mean: 0, std: 0.02}``, ``{name: constant, value}``..."""

    name: Literal["normal", "truncated_normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "zeros",
                  "constant"]
    mean: float = 0.0
    std: Annotated[float, Field(gt=0.0)] = 0.02
    a: Optional[float] = None
    b: Optional[float] = None
    gain: Annotated[float, Field(gt=0.0)] = 1.0
    value: float = 0.0


class FeedForwardNetworkConfig(Section):
    """Model Zoo ``FeedForwardNetwork``: a stack of linear layers, each with its activation.

    LLaVA's ``linear`` projector is ``layers_units: [H_text]``; ``mlp2x_gelu`` is
    ``layers_units: [H_text, H_text], layers_activation: [gelu, null]``.
    """

    name: Literal["FeedForwardNetwork"] = "FeedForwardNetwork"
    input_unit: PositiveInt
    layers_units: list[PositiveInt] = Field(min_length=1)
    layers_activation: Optional[list[Optional[Activation]]] = None
    layers_dropout_rates: Optional[list[Optional[Rate]]] = None
    use_bias: bool = False                  # the Model Zoo's default
    kernel_initializer: Optional[Union[str, "Initializer"]] = None
    bias_initializer: Optional[Union[str, "Initializer"]] = None

    @field_validator("kernel_initializer", "bias_initializer", mode="before")
    @classmethod
    def _known(cls, value):
        name = value if isinstance(value, str) else (value or {}).get("name") if isinstance(value, dict) else None
        if value is not None and name not in INITIALIZERS:
            raise ValueError(f"unknown initializer {name!r}; supported: {', '.join(INITIALIZERS)}")
        return value


class ViTModelConfig(Section):
    """Model Zoo ``ViTModel`` as an image encoder (CLIP-compatible when configured like CLIP)."""

    name: Literal["ViTModel"] = "ViTModel"
    # Embedding
    position_embedding_type: Literal["learned"] = "learned"
    embedding_dropout_rate: Rate = 0.0
    hidden_size: PositiveInt = 768
    use_post_embed_layer_norm: bool = False
    use_embed_proj_bias: bool = True
    use_conv_patchified_embedding: bool = False   # the Model Zoo's default: a Linear on flattened patches
    prepend_cls_token: bool = True
    # Encoder
    num_hidden_layers: PositiveInt = 12
    layer_norm_epsilon: Eps = 1.0e-5
    num_heads: PositiveInt = 12
    attention_type: Literal["scaled_dot_product", "dot_product"] = "scaled_dot_product"
    attention_softmax_fp32: bool = True
    dropout_rate: Rate = 0.0
    attention_dropout_rate: Rate = 0.0
    nonlinearity: Activation = "gelu"
    pooler_nonlinearity: Optional[str] = None
    use_projection_bias_in_attention: bool = True
    use_ffn_bias_in_attention: bool = True
    filter_size: PositiveInt = 3072
    use_ffn_bias: bool = True
    initializer_range: Annotated[float, Field(ge=0.0)] = 0.02
    norm_first: Literal[True] = True
    use_encoder_pooler_layer: bool = False
    use_final_layer_norm: bool = True
    # Vision
    image_size: tuple[PositiveInt, PositiveInt] = (224, 224)
    num_channels: PositiveInt = 3
    patch_size: tuple[PositiveInt, PositiveInt] = (16, 16)
    # Features after block image_layer_idx (negative counts from the end, as Model Zoo 2.10 does;
    # 2.3.1 ran range(idx + 1) on the raw negative value, i.e. no block). Unset: every block and
    # then the final norm (use_final_layer_norm), the Model Zoo's default.
    image_layer_idx: Optional[int] = None
    # Accepted at the values that change nothing (LayerScale and stochastic depth are not implemented)
    layerscale_value: Optional[Literal[None]] = None
    stochastic_depth_drop_prob: Literal[0.0] = 0.0
    use_masked_patches: Literal[False] = False

    _pairs = field_validator("image_size", "patch_size", mode="before")(_pair)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along height and width."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_positions(self) -> int:
        """Tokens out of the encoder: patches, plus the CLS token when prepended."""
        return self.grid[0] * self.grid[1] + int(self.prepend_cls_token)

    @property
    def num_layers_used(self) -> int:
        """Encoder blocks run to produce the features (``image_layer_idx`` may count from the end)."""
        idx = self.image_layer_idx
        if idx is None:
            return self.num_hidden_layers
        return idx + 1 if idx >= 0 else self.num_hidden_layers + idx + 1

    @property
    def uses_final_norm(self) -> bool:
        """The final norm runs only with ``image_layer_idx`` unset (and ``use_final_layer_norm``)."""
        return self.image_layer_idx is None and self.use_final_layer_norm


FeedForwardNetworkConfig.model_rebuild()

ImageModelPart = Annotated[
    Union[ViTModelConfig, FeedForwardNetworkConfig], Field(discriminator="name")
]


class ImageModelEntry(Section):
    """One entry of ``image_models``: ``image_model: [ViTModel, optional FeedForwardNetwork]``."""

    image_model: list[ImageModelPart] = Field(min_length=1, max_length=2)

    @property
    def encoder(self) -> ViTModelConfig:
        return self.image_model[0]  # type: ignore[return-value]

    @property
    def projection(self) -> Optional[FeedForwardNetworkConfig]:
        return self.image_model[1] if len(self.image_model) > 1 else None  # type: ignore[return-value]


class ConnectorConfig(Section):
    """MM1-style vision-language connector between the encoders and the global projection:
    reduces each image's features to ``num_tokens`` tokens.

    - ``avg_pool``: average pooling of the patch grid to a sqrt(num_tokens)^2 grid;
    - ``attention_pool``: ``num_tokens`` learned queries attending over the features;
    - ``c_abstractor``: ResNet blocks on the patch grid, adaptive average pooling to the
      sqrt(num_tokens)^2 grid, ResNet blocks again (Honeybee / MM1's C-Abstractor).
    """

    name: Literal["avg_pool", "attention_pool", "c_abstractor"]
    num_tokens: PositiveInt
    num_heads: PositiveInt = 1          # attention_pool
    num_blocks: PositiveInt = 1         # c_abstractor: ResNet blocks before and after pooling


class ImageModelListConfig(Section):
    image_feature_select_mode: Literal["patch", "cls_patch"] = "patch"
    image_models: list[ImageModelEntry] = Field(min_length=1)
    connector: Optional[ConnectorConfig] = None
    global_image_projection: Optional[FeedForwardNetworkConfig] = None


class ExtraFFNParams(Section):
    # CogVLM-style visual expert in the FFN (the Model Zoo's form): image positions
    # (token_modality_idx == 1) use their own gate/up/down weights.
    static_dual_expert: bool = False


class ExtraAttentionParams(Section):
    num_kv_groups: Optional[PositiveInt] = None
    # The attention form beside it: image positions use their own QKV and output projections;
    # attention itself stays shared over the whole sequence.
    static_dual_expert: bool = False


class LlamaModelConfig(Section):
    """Model Zoo ``LlamaModel`` (also ``MistralModel``): a LLaMA-family decoder."""

    name: Literal["LlamaModel", "MistralModel"] = "LlamaModel"
    vocab_size: PositiveInt = 32000
    hidden_size: PositiveInt = 4096
    position_embedding_type: Literal["rotary"] = "rotary"
    rotary_dim: Optional[PositiveInt] = None
    rope_theta: Annotated[float, Field(gt=0.0)] = 10000.0
    pos_scaling_factor: Literal[1.0] = 1.0
    # CogVLM: every image token takes one rotary position (its image's first), text continues +1.
    constant_image_position: bool = False
    share_embedding_weights: bool = False
    embedding_layer_norm: Literal[False] = False
    max_position_embeddings: PositiveInt = 2048
    # Dropout: the Model Zoo's defaults (2.3.1 and 2.10 alike): dropout_rate 0.1; the
    # attention's and the embeddings' rates default to dropout_rate (resolved below).
    embd_pdrop: Optional[Rate] = None
    embedding_dropout_rate: Optional[Rate] = None
    # Decoder
    num_hidden_layers: PositiveInt = 32
    dropout_rate: Rate = 0.1
    layer_norm_epsilon: Eps = 1.0e-5
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    # Attention
    num_heads: PositiveInt = 32
    attention_module: Literal["aiayn_attention", "multiquery_attention"] = "aiayn_attention"
    extra_attention_params: ExtraAttentionParams = ExtraAttentionParams()
    attention_type: Literal["scaled_dot_product", "dot_product"] = "scaled_dot_product"
    attention_dropout_rate: Optional[Rate] = None
    attention_softmax_fp32: bool = True
    use_projection_bias_in_attention: bool = False
    use_ffn_bias_in_attention: bool = False
    # FFN
    filter_size: PositiveInt = 11008
    nonlinearity: Activation = "swiglu"
    use_ffn_bias: bool = False
    extra_ffn_params: ExtraFFNParams = ExtraFFNParams()
    # Head
    use_bias_in_output: bool = False
    initializer_range: Annotated[float, Field(ge=0.0)] = 0.02

    @model_validator(mode="after")
    def _dropout_defaults(self):
        """The Model Zoo's rule (gpt2_model.py post_init): an unset attention or embedding
        dropout rate is ``dropout_rate``; ``embd_pdrop`` and ``embedding_dropout_rate`` are one key."""
        if self.attention_dropout_rate is None:
            self.attention_dropout_rate = self.dropout_rate
        embedding = self.embd_pdrop if self.embd_pdrop is not None else self.embedding_dropout_rate
        if embedding is None:
            embedding = self.dropout_rate
        self.embd_pdrop = self.embedding_dropout_rate = embedding
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def visual_experts(self) -> bool:
        return self.extra_ffn_params.static_dual_expert or self.extra_attention_params.static_dual_expert

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: ``num_kv_groups`` under multiquery attention, else one per head."""
        groups = self.extra_attention_params.num_kv_groups
        if self.attention_module == "multiquery_attention" and groups:
            return groups
        return self.num_heads


class ModelConfig(Section):
    # llava: the older llava model; its freeze patterns name its modules (image_model,
    # projector_image_model, text_model). Set by the loader for llava files.
    name: Literal["multimodal_simple", "llava"] = "multimodal_simple"
    image_model_list: ImageModelListConfig
    text_model: LlamaModelConfig
    freeze: list[str] = []
    loss_scaling: Literal["num_tokens", "batch_size"] = "num_tokens"
    # The Model Zoo's default is 0.0: used only with loss_scaling batch_size (loss = sum / B *
    # loss_weight); with num_tokens it must be 1.0 if given (the Model Zoo asserts it).
    loss_weight: Annotated[float, Field(ge=0.0)] = 0.0
    label_smoothing: Literal[0.0] = 0.0
    z_loss_eps: Literal[0.0] = 0.0
    mixed_precision: bool = True            # the Model Zoo's default
    fp16_type: Literal["bfloat16", "float16", "cbfloat16"] = "bfloat16"
    boundary_casting: bool = False
    # Activation recomputation (mmgraph's; the Model Zoo has no params key for it): none |
    # selective | full | auto (the least recompute that fits the target's memory).
    activation_checkpointing: Literal["none", "selective", "full", "auto"] = "auto"

    @field_validator("freeze", mode="before")
    @classmethod
    def _one_pattern(cls, value):
        return [value] if isinstance(value, str) else value
