"""Constants of the ``.zmoe`` container, versions 2 and 3 (format/SPEC.md §1-§5, §8)."""

MAGIC = b"ZMOE"
#: Version written for a file without low-precision bit-plane tensors (SPEC §8).
VERSION = 2
#: Version written for a file holding an F8_E4M3 bit-plane tensor (SPEC §5.1, §8).
VERSION_LOWPREC = 3
#: Versions this reader understands (1: zstd exponent chunks only; 3: FP8 bit-planes).
READABLE_VERSIONS = (1, 2, 3)
#: Size of the fixed header at offset 0 (SPEC §1).
HEADER_SIZE = 64
#: Default alignment of the data section and of every expert region (O_DIRECT friendly).
ALIGNMENT = 4096
#: Alignment of dense tensors inside the data section.
DENSE_ALIGNMENT = 64

#: Tensor encodings (SPEC §4).
ENC_RAW = "raw"
ENC_BITPLANE = "bitplane"
#: MXFP4 blocks (SPEC §5.4): the source's U8 bytes as they are (two E2M1 codes per byte, low
#: nibble first), scaled by the ``*_scales`` tensor beside them. Files holding one are version 3.
ENC_MXFP4 = "mxfp4"

#: Bit-plane layouts per floating dtype: (exponent bits, mantissa bits, word bytes, SM bytes).
#: SM = sign bit above the mantissa bits, little-endian, in the fewest whole bytes (SPEC §5).
BITPLANE_DTYPES = {
    "BF16": (8, 7, 2, 1),
    "F16": (5, 10, 2, 2),
    "F32": (8, 23, 4, 3),
}

#: Nibble bit-plane layouts (SPEC §5.1): dtype -> (exponent bits, mantissa bits). The exponent
#: plane has one byte per element; the SM plane packs two 4-bit ``sign << 3 | mantissa`` values
#: per byte (element 2i in the low nibble, 2i+1 in the high one). Files holding one are version 3.
NIBBLE_PLANE_DTYPES = {
    "F8_E4M3": (4, 3),
}

#: Exponent-only bit-plane layouts (SPEC §5.1): every byte is an exponent (MXFP4's e8m0
#: scales, U8 in the checkpoint), coded in chunks like an exponent plane; no SM plane. Only when
#: the writer is asked for it (a U8 tensor is raw by default). Files holding one are version 3.
EXPONENT_ONLY_DTYPES = ("U8",)

#: Element size in bytes of every dtype the container stores (safetensors names).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: Metadata value types (SPEC §3).
META_TYPES = ("bool", "int", "float", "str", "int[]", "float[]", "str[]", "json")

#: Exponent-chunk codecs (SPEC §5.2): canonical Huffman in 4 streams (§5.3), or zstd frames.
EXP_HUFFMAN = "huffman"
EXP_ZSTD = "zstd"
EXP_CODECS = (EXP_HUFFMAN, EXP_ZSTD)
DEFAULT_EXP_CODEC = EXP_HUFFMAN

#: Default number of independently compressed exponent chunks per tensor (ZipMoE uses 3-5).
DEFAULT_CHUNKS = 4
#: Chunks are never cut smaller than this many exponents (zstd table overhead stays < 1 %).
MIN_CHUNK = 64 * 1024


class Keys:
    """Metadata keys (SPEC §3), one constant per key, grouped by prefix (gguf-py's ``Keys``).

    Readers must ignore keys they do not know. ``hparams.*`` holds the normalised
    hyper-parameters of the model (the converter's family registry writes them; which ones a
    family has is the registry's business, this list is the union).
    """

    class General:
        ARCHITECTURE = "general.architecture"   # str: HF architectures[0]
        FAMILY = "general.family"               # str: runtime family
        NAME = "general.name"                   # str: model name (source folder name)

    class HParams:
        PREFIX = "hparams."
        ARCHITECTURE = "hparams.architecture"
        FAMILY = "hparams.family"
        VOCAB_SIZE = "hparams.vocab_size"
        HIDDEN_SIZE = "hparams.hidden_size"
        NUM_HIDDEN_LAYERS = "hparams.num_hidden_layers"
        NUM_ATTENTION_HEADS = "hparams.num_attention_heads"
        NUM_KEY_VALUE_HEADS = "hparams.num_key_value_heads"
        HEAD_DIM = "hparams.head_dim"
        RMS_NORM_EPS = "hparams.rms_norm_eps"
        MAX_POSITION_EMBEDDINGS = "hparams.max_position_embeddings"
        TIE_WORD_EMBEDDINGS = "hparams.tie_word_embeddings"
        ROPE = "hparams.rope"
        HIDDEN_ACT = "hparams.hidden_act"
        SLIDING_WINDOW = "hparams.sliding_window"
        LAYER_TYPES = "hparams.layer_types"
        MAX_WINDOW_LAYERS = "hparams.max_window_layers"
        NUM_EXPERTS = "hparams.num_experts"
        NUM_EXPERTS_PER_TOK = "hparams.num_experts_per_tok"
        MOE_INTERMEDIATE_SIZE = "hparams.moe_intermediate_size"
        INTERMEDIATE_SIZE = "hparams.intermediate_size"
        NORM_TOPK_PROB = "hparams.norm_topk_prob"
        ATTENTION_BIAS = "hparams.attention_bias"
        QK_NORM = "hparams.qk_norm"
        SHARED_EXPERT_INTERMEDIATE_SIZE = "hparams.shared_expert_intermediate_size"
        MOE_LAYERS = "hparams.moe_layers"
        CLIP_QKV = "hparams.clip_qkv"
        # Multi-head Latent Attention and the DeepSeek MoE block (DeepSeek-V2/V3, GLM-4-MoE-Lite)
        Q_LORA_RANK = "hparams.q_lora_rank"
        KV_LORA_RANK = "hparams.kv_lora_rank"
        QK_NOPE_HEAD_DIM = "hparams.qk_nope_head_dim"
        QK_ROPE_HEAD_DIM = "hparams.qk_rope_head_dim"
        V_HEAD_DIM = "hparams.v_head_dim"
        ROPE_INTERLEAVE = "hparams.rope_interleave"
        N_SHARED_EXPERTS = "hparams.n_shared_experts"
        FIRST_K_DENSE_REPLACE = "hparams.first_k_dense_replace"
        ROUTED_SCALING_FACTOR = "hparams.routed_scaling_factor"
        TOPK_METHOD = "hparams.topk_method"
        N_GROUP = "hparams.n_group"
        TOPK_GROUP = "hparams.topk_group"
        # PhiMoE
        LM_HEAD_BIAS = "hparams.lm_head_bias"
        ROUTER_JITTER_NOISE = "hparams.router_jitter_noise"
        # Granite-MoE
        EMBEDDING_MULTIPLIER = "hparams.embedding_multiplier"
        RESIDUAL_MULTIPLIER = "hparams.residual_multiplier"
        ATTENTION_MULTIPLIER = "hparams.attention_multiplier"
        LOGITS_SCALING = "hparams.logits_scaling"
        # ERNIE 4.5 MoE
        MOE_NORM_MIN = "hparams.moe_norm_min"
        # Qwen3-Next / Qwen3.5-MoE: Gated DeltaNet (linear-attention) layers
        LINEAR_CONV_KERNEL_DIM = "hparams.linear_conv_kernel_dim"
        LINEAR_KEY_HEAD_DIM = "hparams.linear_key_head_dim"
        LINEAR_VALUE_HEAD_DIM = "hparams.linear_value_head_dim"
        LINEAR_NUM_KEY_HEADS = "hparams.linear_num_key_heads"
        LINEAR_NUM_VALUE_HEADS = "hparams.linear_num_value_heads"
        # Gemma 4
        GLOBAL_HEAD_DIM = "hparams.global_head_dim"
        NUM_GLOBAL_KEY_VALUE_HEADS = "hparams.num_global_key_value_heads"
        ATTENTION_K_EQ_V = "hparams.attention_k_eq_v"
        GLOBAL_ROPE = "hparams.global_rope"
        FINAL_LOGIT_SOFTCAPPING = "hparams.final_logit_softcapping"
        # gpt-oss
        SWIGLU_ALPHA = "hparams.swiglu_alpha"
        SWIGLU_LIMIT = "hparams.swiglu_limit"
        # LFM2-MoE: short-convolution layers, dense leading layers, the router's expert bias
        CONV_BIAS = "hparams.conv_bias"
        CONV_L_CACHE = "hparams.conv_l_cache"
        NUM_DENSE_LAYERS = "hparams.num_dense_layers"
        USE_EXPERT_BIAS = "hparams.use_expert_bias"
        # low-precision sources (FP8 with block scales)
        FP8_BLOCK_SIZE = "hparams.fp8_block_size"

    class HF:
        CONFIG = "hf.config"                    # json: the source config.json verbatim

    class Tokenizer:
        JSON = "tokenizer.json"                 # str: the source tokenizer.json verbatim
        CONFIG = "tokenizer.config"             # json: tokenizer_config.json minus its template
        CHAT_TEMPLATE = "tokenizer.chat_template"  # str: jinja chat template

    class Generation:
        CONFIG = "generation.config"            # json: generation_config.json ({} if absent)
        EOS_TOKEN_IDS = "generation.eos_token_ids"  # int[]: ids that end generation

    class Provenance:
        FILES = "provenance.files"              # json: [{"name", "size", "sha256"}]
        CONVERTER = "provenance.converter"      # str: e.g. "zipmoe-rt 0.1.0"

    class Encoding:
        CHUNKS = "encoding.chunks"              # int: requested exponent chunks per tensor
        EXP_CODEC = "encoding.exp_codec"        # str: "huffman" or "zstd" (§5.2)
        ZSTD = "encoding.zstd"                  # json: zstd parameters (zstd codec only)


def hparam_key(name: str) -> str:
    """The metadata key of hyper-parameter ``name`` (``"hparams." + name``)."""
    return Keys.HParams.PREFIX + name


def metadata_keys() -> tuple[str, ...]:
    """Every metadata key defined in :class:`Keys`, sorted (``Keys.HParams.PREFIX`` excluded)."""
    out = []
    for group in vars(Keys).values():
        if isinstance(group, type):
            out += [v for k, v in vars(group).items()
                    if k.isupper() and k != "PREFIX" and isinstance(v, str)]
    return tuple(sorted(out))
