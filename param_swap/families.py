"""The model families the tool swaps, as data: the tensor inventory every family shares (each tensor under its
HF, MLLM-JAX and sglang-jax names, written once), and one Family row for what differs. Adding a family: one
row here (docs/architecture.md, "Where a new one goes")."""

import dataclasses
import enum
import functools
import re
from collections.abc import Callable


class Op(enum.StrEnum):
    """How an MLLM-JAX array becomes its sglang-jax target."""
    COPY = "copy"  # the same layout
    TRANSPOSE = "transpose"  # a [hidden, vocab] kernel becomes a [vocab, hidden] embedding (an untied lm_head)
    KV_HEADS = "kv_heads"  # each KV head repeated contiguously ([h0, h0, h1, h1]) when tp > KV heads, as sglang-jax


NORM = (1.0, 0.05)  # the demo's (mean, std) of a norm scale


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint under its three names: HF ({i} a layer, {e} an expert), MLLM-JAX ({i}; a
    layer's experts stacked [expert, in, out]) and sglang-jax ({i}; None: every family that has it names it)."""
    hf: str
    shape: tuple[str, ...]  # the HF shape in config terms (checkpoint.tensor_dims)
    when: str | None  # None: always; else the condition checkpoint.tensor_inventory() reads
    mllm: str
    sglang: str | None
    op: Op = Op.COPY
    transposed: bool = False  # HF [out, in] -> MLLM-JAX kernel [in, out]
    init: tuple[float, float] = (0.0, 0.05)  # the demo checkpoint's (mean, std) of its random values


L = "model.layers.{i}."  # HF and sglang-jax layer prefix
M = "model.layers_{i}."  # MLLM-JAX's
TENSORS = [  # in the order a checkpoint lists them (the demo writes them in this order)
    Tensor("model.embed_tokens.weight", ("vocab", "hidden"), None, "model.embed_tokens.embedding",
           "model.embed_tokens.embedding"),
    Tensor("model.norm.weight", ("hidden",), None, "model.norm.scale", "model.norm.scale", init=NORM),
    Tensor("lm_head.weight", ("vocab", "hidden"), "untied", "lm_head.kernel", "lm_head.embedding", Op.TRANSPOSE, True),
    *[Tensor(L + f"{n}.weight", ("hidden",), None, M + f"{n}.scale", L + f"{n}.scale", init=NORM)
      for n in ("input_layernorm", "post_attention_layernorm")],
    *[t for p, out, inp, op in (("q", "q", "hidden", Op.COPY), ("k", "kv", "hidden", Op.KV_HEADS),
                                ("v", "kv", "hidden", Op.KV_HEADS), ("o", "hidden", "q", Op.COPY))
      for t in (Tensor(L + f"self_attn.{p}_proj.weight", (out, inp), None, M + f"self_attn.{p}_proj.kernel",
                       L + f"self_attn.{p}_proj.weight", op, True),
                Tensor(L + f"self_attn.{p}_proj.bias", (out,), f"{p}_bias", M + f"self_attn.{p}_proj.bias",
                       L + f"self_attn.{p}_proj.bias", op))],
    Tensor(L + "mlp.gate.weight", ("experts", "hidden"), "moe", M + "mlp.gate.kernel", L + "moe_gate.kernel",
           transposed=True, init=(0.0, 0.5)),  # the MoE router
    *[Tensor(L + f"mlp.experts.{{e}}.{n}_proj.weight", shape, "moe", M + f"mlp.experts.{n}_proj.kernel", None,
             transposed=True) for n, shape in (("gate", ("moe_intermediate", "hidden")),
                                               ("up", ("moe_intermediate", "hidden")),
                                               ("down", ("hidden", "moe_intermediate")))],
    *[Tensor(L + f"mlp.{n}_proj.weight", shape, "dense", M + f"mlp.{n}_proj.kernel", L + f"mlp.{n}_proj.weight",
             transposed=True) for n, shape in (("gate", ("intermediate", "hidden")),
                                               ("up", ("intermediate", "hidden")),
                                               ("down", ("hidden", "intermediate")))],
    *[Tensor(L + f"self_attn.{n}_norm.weight", ("head_dim",), "qk_norm", M + f"self_attn.{n}_norm.scale",
             L + f"self_attn.{n}_norm.scale", init=NORM) for n in ("q", "k")],
]


@functools.cache
def name_pattern(template: str) -> re.Pattern:
    """A name template ({i} a layer, {e} an expert) as the regex of the names it makes."""
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)"))


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family, one row each (as llama.cpp's converter registers one class per architecture): what differs
    between families. TENSORS' conditions switch the shared tensors on; the targets' shapes, dtypes and shardings
    come from the engine's own Params."""
    architecture: str  # config.json architectures[0]
    arch: str  # --demo --arch
    model_type: str
    biases: str  # "qkv": q/k/v biases always (Qwen2); "attention_bias": q/k/v/o biases when config says so
    qk_norm: bool  # per-head RMSNorm of q and k (Qwen3)
    moe: bool = False  # sparse MLP layers: a router and stacked experts (all but config's mlp_only_layers)
    sglang: dict[str, str] = dataclasses.field(default_factory=dict)  # MLLM-JAX -> sglang-jax names of its own
    moe_backends: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # likewise per MoE backend
    # what of sglang-jax it needs beyond the adapter's NEEDED, per MoE backend: (module, attribute, need, why)
    needs: dict[str, list] = dataclasses.field(default_factory=dict)
    demo_config: Callable[[dict], dict] | None = None  # its demo checkpoint's config.json beyond the shared keys


def experts(w_gate: str, w_up: str, w_down: str) -> dict[str, str]:
    """A MoE backend's names for a layer's stacked experts."""
    return {M + f"mlp.experts.{n}_proj.kernel": L + f"mlp.{w}" for n, w in (("gate", w_gate), ("up", w_up),
                                                                              ("down", w_down))}


FAMILIES = {f.architecture: f for f in [
    Family("Qwen2ForCausalLM", "qwen2", "qwen2", "qkv", qk_norm=False),
    Family("Qwen3ForCausalLM", "qwen3", "qwen3", "attention_bias", qk_norm=True),
    Family("LlamaForCausalLM", "llama", "llama", "attention_bias", qk_norm=False, demo_config=lambda c: {
        "rope_theta": 500000.0, "mlp_bias": False, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}}),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe", "attention_bias", qk_norm=True, moe=True,
           sglang={M + f"self_attn.o_proj.{w}": L + f"self_attn.c_proj.{t}"  # sglang-jax's name for o_proj
                   for w, t in (("kernel", "weight"), ("bias", "bias"))},
           moe_backends={"epmoe": experts("wi_0", "wi_1", "wo"),  # [E, in, out], sharded (expert, ., tensor)
                         "fused": experts("w1", "w3", "w2")},  # the same stacks, experts over every device
           # bd09a87's dummy initialiser cannot start a Qwen3-MoE engine with ep_size 1: "lacks:" makes the probe
           # refuse a loader that still holds this text
           needs={"epmoe": [("sgl_jax.srt.utils.weight_utils", "WeightLoader._load_dummy_weights",
                             "lacks:if ep_size > 1:", "a Qwen3-MoE engine with dummy weights cannot start; fixed "
                             "in 0.0.3rc99")]},
           demo_config=lambda c: {"num_experts": 4, "num_experts_per_tok": 2,  # 4 experts, layer 0 dense
                                  "moe_intermediate_size": c["intermediate_size"] // 2, "mlp_only_layers": [0],
                                  "decoder_sparse_step": 1, "norm_topk_prob": True}),
]}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of_arch(arch: str) -> Family:
    """The family of a --demo --arch name."""
    return next(f for f in FAMILIES.values() if f.arch == arch)
