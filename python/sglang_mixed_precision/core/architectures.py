"""Per model family: the modules a checkpoint of a given config.json must hold, by role.

The one place for what differs between the families the plan checks for completeness. Each
:class:`Architecture` says how a decoder layer is named (attention, dense MLP or MoE block, norms),
which projections carry a bias, which layers SGLang builds as MoE and which config.json keys the
family needs. Checked against SGLang 0.5.17 (``sglang/srt/models/<model_type>.py``):

============ ===================================== =========================================== ==================
model_type   attention                             MLP                                         biases
============ ===================================== =========================================== ==================
llama        self_attn.{q,k,v,o}_proj              mlp.{gate,up,down}_proj                     q/k/v/o if
mistral                                                                                        attention_bias
qwen2        self_attn.{q,k,v,o}_proj              mlp.{gate,up,down}_proj                     q/k/v (always)
qwen3        + self_attn.{q,k}_norm                mlp.{gate,up,down}_proj                     q/k/v/o if
                                                                                               attention_bias
qwen2_moe    as qwen2                              every layer MoE: mlp.gate, mlp.experts.E.*, q/k/v (qkv_bias,
                                                   mlp.shared_expert.*, mlp.shared_expert_gate default true)
qwen3_moe    as qwen3                              every layer MoE: mlp.gate, mlp.experts.E.*  as qwen3
mixtral      self_attn.{q,k,v,o}_proj              every layer MoE: block_sparse_moe.gate,     none
                                                   block_sparse_moe.experts.E.{w1,w2,w3}
deepseek_v3  MLA: self_attn.{q_a_proj,              dense below first_k_dense_replace, others:  none
             q_a_layernorm, q_b_proj,              mlp.gate (+ e_score_correction_bias),
             kv_a_proj_with_mqa, kv_a_layernorm,   mlp.experts.E.*, mlp.shared_experts.*
             kv_b_proj, o_proj}
============ ===================================== =========================================== ==================

Every layer also has ``input_layernorm`` and ``post_attention_layernorm``; the model has
``model.embed_tokens``, ``model.norm`` and ``lm_head`` (not when ``tie_word_embeddings``: SGLang
then uses the embedding). Qwen2-MoE and Qwen3-MoE make *every* layer a MoE layer in SGLang
0.5.17, whatever ``mlp_only_layers`` and ``decoder_sparse_step`` say.

What each family's SGLang 0.5.17 model class accepts (``load_weights`` of
``sglang/srt/models/<file>.py``), checked on CPU against the real classes by
``test/test_serving_families.py``:

============ ======================== ================================ ======================== ===========
model_type   class                    fused layers (checkpoint names)  what load_weights drops  ties lm_head
============ ======================== ================================ ======================== ===========
llama        LlamaForCausalLM         qkv_proj (q/k/v), gate_up_proj   ``*.weight_scale_inv``:  yes
mistral      (llama.py)               (gate/up)                        renamed ``weight_scale``
                                                                       before the lookup
qwen2        Qwen2ForCausalLM         qkv_proj, gate_up_proj           nothing                  yes
qwen3        Qwen3ForCausalLM         qkv_proj, gate_up_proj           nothing                  yes
qwen2_moe    Qwen2MoeForCausalLM      qkv_proj, gate_up_proj (shared   nothing                  no
                                      expert), experts -> w13_/w2_*
qwen3_moe    Qwen3MoeForCausalLM      qkv_proj, experts -> w13_/w2_*   nothing                  no
mixtral      MixtralForCausalLM       qkv_proj, experts w1/w3 ->       nothing                  no
                                      w13_*, w2 -> w2_*
deepseek_v3  DeepseekV3ForCausalLM    fused_qkv_a_proj_with_mqa,       nothing                  yes
             (deepseek_v2.py)         gate_up_proj, experts -> w13_/w2_*
============ ======================== ================================ ======================== ===========

* Scale names: FP8-block layers hold ``weight_scale_inv`` (per-block), FP8 per-channel / per-tensor
  ``weight_scale``; GPTQ ``qweight``/``qzeros``/``scales``/``g_idx``; each stored under the
  checkpoint module's name and routed by the class onto its fused parameter (shard q/k/v, 0/1,
  or expert e's w1/w3/w2). Llama's class renames ``weight_scale_inv`` to ``weight_scale`` and so
  never finds the block-FP8 parameter: the mixed loader hands those tensors to the parameter's
  own ``weight_loader`` with the shard id the class would have used (``fed_directly``).
* Biases: kept 16-bit in every source (FP8 and GPTQ checkpoints store them beside the quantized
  weight); the bias of a module comes from the source its module is assigned to.
* Tied embeddings: a class that does not tie (``ties_embeddings`` false) builds an ``lm_head`` of
  its own and fills it only from an ``lm_head.weight`` tensor, so a tied checkpoint of that family
  would serve an uninitialised head: the plan refuses it (``model_class_cannot_load``).
* Mixtral: SGLang 0.5.17 hands a Mixtral with any quantization outside its list (fp8, gptq_marlin,
  ...) to ``QuantMixtralForCausalLM``, a class of per-expert linears without FusedMoE; the plugin
  keeps ``MixtralForCausalLM`` for mixed plans (``serving/hooks.py``).

A new family subclasses :class:`Architecture` and registers it in :data:`ARCHITECTURES`;
``naming.classify`` must give each new name its role (a test checks every family). What a family's
SGLang model cannot load or run in some precision is refused here, before launch, with the reason
(:meth:`Architecture.serving_refusal`, :meth:`Architecture.plan_refusals`): DeepSeek-V3's MLA
attention and shared experts in int4, for one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .errors import more
from .naming import ModuleRef, Role, layer_index

if TYPE_CHECKING:
    from .geometry import ModelGeometry, RankShape


class ExpectedModule(NamedTuple):
    name: str
    role: Role
    # what a 16-bit checkpoint stores; a quantized source stores its format's tensors in place of "weight"
    tensors: tuple[str, ...] = ("weight",)


class Architecture:
    """A decoder-only family whose checkpoint names follow HF's ``model.layers.N.<block>.<proj>``."""

    model_types: tuple[str, ...] = ()
    attention = "self_attn"
    attention_projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_norms = ("input_layernorm", "post_attention_layernorm")
    mlp = "mlp"
    mlp_projections = ("gate_proj", "up_proj", "down_proj")
    moe_family = False  # SGLang builds MoE blocks (in every layer unless dense_mlp_layers says otherwise)
    moe = "mlp"
    router = "gate"
    expert_projections = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    moe_intermediate_key = "moe_intermediate_size"
    # the expert count's names, first found wins (transformers 5 writes Qwen-MoE's as num_local_experts)
    num_experts_keys = ("num_experts", "num_local_experts")
    # config.json keys the family needs besides hidden_size, num_hidden_layers, num_attention_heads,
    # vocab_size (and, for MoE families, one of num_experts_keys)
    required_keys: tuple[str, ...] = ("intermediate_size",)
    # ---- what SGLang 0.5.17's model class accepts (see the module docstring)
    sglang_class = ""
    # tensor suffixes the class's load_weights never delivers to the parameter of that name: the
    # mixed loader calls the fused parameter's weight_loader itself with the member's shard id
    fed_directly: frozenset[str] = frozenset()
    # whether the class builds lm_head as the embedding when config.json says tie_word_embeddings
    ties_embeddings = True
    # whether the class names its decoder layers "layers.N" (not "model.layers.N") in the prefixes
    # it passes to the quantization config: the plan's names are the checkpoint's
    unrooted_layer_prefixes = False
    # checkpoint name part -> the name transformers 5 gives that module in memory (the reference and
    # GPTQ calibration run transformers' own layers; save_pretrained writes the checkpoint's names)
    transformers_renames: tuple[tuple[str, str], ...] = ()

    def checkpoint_prefix(self, prefix: str) -> str:
        """The checkpoint name of the layer the class builds at ``prefix``."""
        if self.unrooted_layer_prefixes and prefix.startswith("layers."):
            return "model." + prefix
        return prefix

    def attention_biases(self, cfg: dict) -> tuple[str, ...]:
        """Attention projections SGLang builds with a bias (the checkpoint must hold it)."""
        return ()

    def attention_norms(self, cfg: dict) -> tuple[str, ...]:
        return ()

    def dense_mlp_layers(self, cfg: dict, layers: int) -> frozenset[int]:
        """Layers SGLang builds with a dense MLP (the others get a MoE block)."""
        return frozenset() if self.moe_family else frozenset(range(layers))

    def has_shared_expert(self, cfg: dict) -> bool:
        return self.shared_expert is not None and (cfg.get("shared_expert_intermediate_size") or 0) > 0

    def extra_layers(self, cfg: dict) -> int:
        """Decoder layers a checkpoint may hold beyond num_hidden_layers (MTP heads SGLang skips)."""
        return 0

    def geometry_overrides(self, cfg: dict, dimension) -> dict:
        """ModelGeometry fields the family names its own way (DeepSeek's MLA)."""
        return {}

    def regroup(self, ref: ModuleRef, cfg: dict) -> ModuleRef:
        """The SGLang layer of a module when it depends on config.json (naming.classify's otherwise)."""
        return ref

    def serving_refusal(self, group: str, role: Role, precision: str) -> str | None:
        """Why this family's SGLang model cannot serve layer ``group`` in ``precision`` (None: it can)."""
        return None

    def server_flags(self) -> tuple[tuple[str, str], ...]:
        """(SGLang server flag, why) the launcher adds when serving a mix of this family."""
        return ()

    def plan_refusals(self, groups: dict) -> list[tuple[list[str], str, str]]:
        """(layers, why, fix) for mixes the model cannot serve because of a setting it reads once for
        all its layers; ``groups``: the plan's {prefix: GroupAssignment}."""
        return []

    # ---- module names -----------------------------------------------------------------------------
    def attention_modules(self, prefix: str, cfg: dict) -> Iterator[ExpectedModule]:
        biased = set(self.attention_biases(cfg))
        for proj in self.attention_projections:
            yield ExpectedModule(
                f"{prefix}.{proj}", Role.ATTENTION, ("weight", "bias") if proj in biased else ("weight",)
            )
        for norm in self.attention_norms(cfg):
            yield ExpectedModule(f"{prefix}.{norm}", Role.NORM)

    def moe_modules(self, prefix: str, cfg: dict, geometry: ModelGeometry) -> Iterator[ExpectedModule]:
        yield ExpectedModule(f"{prefix}.{self.router}", Role.ROUTER)
        for e in range(geometry.num_experts or 0):
            for proj in self.expert_projections:
                yield ExpectedModule(f"{prefix}.experts.{e}.{proj}", Role.ROUTED_EXPERT)
        if self.has_shared_expert(cfg):
            for proj in self.mlp_projections:
                yield ExpectedModule(f"{prefix}.{self.shared_expert}.{proj}", Role.SHARED_EXPERT)
            if self.shared_expert_gate:
                yield ExpectedModule(f"{prefix}.{self.shared_expert_gate}", Role.ROUTER)

    def modules(self, cfg: dict, geometry: ModelGeometry) -> Iterator[ExpectedModule]:
        """Every module a checkpoint of ``cfg`` holds, in Hugging Face's order."""
        input_norm, *other_norms = self.layer_norms
        yield ExpectedModule("model.embed_tokens", Role.EMBEDDING)
        for i in range(geometry.layers):
            p = f"model.layers.{i}"
            yield ExpectedModule(f"{p}.{input_norm}", Role.NORM)
            yield from self.attention_modules(f"{p}.{self.attention}", cfg)
            if geometry.is_moe_layer(i):
                yield from self.moe_modules(f"{p}.{self.moe}", cfg, geometry)
            else:
                for proj in self.mlp_projections:
                    yield ExpectedModule(f"{p}.{self.mlp}.{proj}", Role.DENSE_MLP)
            for norm in other_norms:
                yield ExpectedModule(f"{p}.{norm}", Role.NORM)
        yield ExpectedModule("model.norm", Role.NORM)
        if not geometry.tie_word_embeddings:
            yield ExpectedModule("lm_head", Role.LM_HEAD)


class Llama(Architecture):
    model_types = ("llama", "mistral")
    sglang_class = "LlamaForCausalLM"
    # llama.py's _legacy_load_weights: name.replace(".weight_scale_inv", ".weight_scale"), then
    # "Parameter ... not found in params_dict": every block-FP8 scale would be dropped
    fed_directly = frozenset({"weight_scale_inv"})

    def attention_biases(self, cfg: dict) -> tuple[str, ...]:
        # llama.py: bias = attention_bias or bias (llamafied Qwen2.5, InternLM)
        return self.attention_projections if cfg.get("attention_bias") or cfg.get("bias") else ()


class Qwen2(Architecture):
    model_types = ("qwen2",)
    sglang_class = "Qwen2ForCausalLM"

    def attention_biases(self, cfg: dict) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj")  # qwen2.py: QKVParallelLinear(bias=True), o_proj without


class Qwen3(Architecture):
    model_types = ("qwen3",)
    sglang_class = "Qwen3ForCausalLM"

    def attention_biases(self, cfg: dict) -> tuple[str, ...]:
        return self.attention_projections if cfg.get("attention_bias") else ()

    def attention_norms(self, cfg: dict) -> tuple[str, ...]:
        return ("q_norm", "k_norm")


class Qwen2Moe(Qwen2):
    model_types = ("qwen2_moe",)
    sglang_class = "Qwen2MoeForCausalLM"
    ties_embeddings = False  # qwen2_moe.py: lm_head is always a ParallelLMHead of its own
    moe_family = True
    shared_expert = "shared_expert"
    shared_expert_gate = "shared_expert_gate"
    required_keys = ("moe_intermediate_size",)

    def attention_biases(self, cfg: dict) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj") if cfg.get("qkv_bias", True) else ()


class Qwen3Moe(Qwen3):
    model_types = ("qwen3_moe",)
    sglang_class = "Qwen3MoeForCausalLM"
    ties_embeddings = False
    moe_family = True
    required_keys = ("moe_intermediate_size",)


class Mixtral(Architecture):
    model_types = ("mixtral",)
    sglang_class = "MixtralForCausalLM"
    ties_embeddings = False
    unrooted_layer_prefixes = True  # mixtral.py: make_layers(..., prefix="layers")
    transformers_renames = ((".block_sparse_moe.", ".mlp."),)  # MixtralDecoderLayer.mlp in transformers 5
    moe_family = True
    moe = "block_sparse_moe"
    expert_projections = ("w1", "w2", "w3")
    moe_intermediate_key = "intermediate_size"  # Mixtral's intermediate_size is each expert's
    num_experts_keys = ("num_local_experts", "num_experts")


@dataclass(frozen=True)
class MlaDims:
    """Multi-head latent attention's dimensions (DeepSeek-V3's config.json)."""

    heads: int
    hidden: int
    q_lora_rank: int | None  # None: one q_proj instead of q_a_proj / q_a_layernorm / q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def q_out(self) -> int:
        return self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)

    def weight_shape(self, leaf: str) -> tuple[int, ...] | None:
        """The 16-bit shape of an MLA module (linears [N, K], norms [N])."""
        kv_a = self.kv_lora_rank + self.qk_rope_head_dim
        return {
            "q_proj": (self.q_out, self.hidden),
            "q_a_proj": (self.q_lora_rank, self.hidden),
            "q_a_layernorm": (self.q_lora_rank,),
            "q_b_proj": (self.q_out, self.q_lora_rank),
            "kv_a_proj_with_mqa": (kv_a, self.hidden),
            "kv_a_layernorm": (self.kv_lora_rank,),
            "kv_b_proj": (self.heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
            "o_proj": (self.hidden, self.heads * self.v_head_dim),
        }.get(leaf)

    def rank_shape(self, leaf: str, tp: int) -> RankShape | None:
        """Per-rank weight of an SGLang MLA layer (deepseek_v2.py ``DeepseekV2AttentionMLA``): the fused
        q_a/kv_a and kv_a_proj_with_mqa are replicated, q_b / q_proj / kv_b split N, o_proj splits K."""
        from .geometry import RankShape

        kv_a = self.kv_lora_rank + self.qk_rope_head_dim
        if leaf == FUSED_QKV_A:  # load_weights concatenates q_a_proj and kv_a_proj_with_mqa, scales too
            return RankShape(
                (self.q_lora_rank + kv_a,), self.hidden, self.hidden, False, False, tp, stacked=(self.q_lora_rank, kv_a)
            )
        if leaf == "kv_a_proj_with_mqa":
            return RankShape((kv_a,), self.hidden, self.hidden, False, False, tp)
        column = {"q_proj": self.hidden, "q_b_proj": self.q_lora_rank, "kv_b_proj": self.kv_lora_rank}
        if leaf in column:
            n = self.weight_shape(leaf)[0]
            return RankShape((n // tp,), column[leaf], column[leaf], True, False, tp)
        if leaf == "o_proj":
            k = self.heads * self.v_head_dim
            return RankShape((self.hidden,), k // tp, k, False, True, tp)
        return None


# SGLang's layer for q_a_proj + kv_a_proj_with_mqa when q_lora_rank is set
FUSED_QKV_A = "fused_qkv_a_proj_with_mqa"


class DeepseekV3(Architecture):
    """DeepSeek-V3 / R1 (SGLang 0.5.17 ``deepseek_v2.py``, ``DeepseekV3ForCausalLM``).

    MLA attention: ``q_a_proj`` + ``kv_a_proj_with_mqa`` (SGLang's load_weights concatenates them into
    one replicated ``fused_qkv_a_proj_with_mqa``), ``q_a_layernorm``, ``q_b_proj``, ``kv_a_layernorm``,
    ``kv_b_proj`` (split into ``w_kc`` / ``w_vc`` after loading), ``o_proj``; with ``q_lora_rank: null``
    a single ``q_proj`` and a ``kv_a_proj_with_mqa`` of its own. Layers below ``first_k_dense_replace``
    and those not on ``moe_layer_freq`` have a dense MLP (``intermediate_size``); the others a router
    ``mlp.gate`` (``weight`` and ``e_score_correction_bias`` for ``topk_method: noaux_tc``), routed
    experts and ``n_shared_experts`` fused into one ``mlp.shared_experts`` MLP of
    ``moe_intermediate_size * n_shared_experts``. The release's MTP layers
    (``num_nextn_predict_layers``) follow the decoder layers; SGLang skips them when serving.
    """

    model_types = ("deepseek_v3",)
    sglang_class = "DeepseekV3ForCausalLM"
    moe_family = True
    shared_expert = "shared_experts"
    attention_projections = ()  # attention_modules lists MLA's
    num_experts_keys = ("n_routed_experts",)
    required_keys = ("intermediate_size", "moe_intermediate_size", "kv_lora_rank", "qk_rope_head_dim")

    def attention_modules(self, prefix: str, cfg: dict) -> Iterator[ExpectedModule]:
        if cfg.get("q_lora_rank") is None:
            yield ExpectedModule(f"{prefix}.q_proj", Role.ATTENTION)
        else:
            yield ExpectedModule(f"{prefix}.q_a_proj", Role.ATTENTION)
            yield ExpectedModule(f"{prefix}.q_a_layernorm", Role.NORM)
            yield ExpectedModule(f"{prefix}.q_b_proj", Role.ATTENTION)
        yield ExpectedModule(f"{prefix}.kv_a_proj_with_mqa", Role.ATTENTION)
        yield ExpectedModule(f"{prefix}.kv_a_layernorm", Role.NORM)
        yield ExpectedModule(f"{prefix}.kv_b_proj", Role.ATTENTION)
        yield ExpectedModule(f"{prefix}.o_proj", Role.ATTENTION)

    def moe_modules(self, prefix: str, cfg: dict, geometry: ModelGeometry) -> Iterator[ExpectedModule]:
        for module in super().moe_modules(prefix, cfg, geometry):
            if module.role is Role.ROUTER and cfg.get("topk_method") == "noaux_tc":
                yield module._replace(tensors=("weight", "e_score_correction_bias"))
            else:
                yield module

    def dense_mlp_layers(self, cfg: dict, layers: int) -> frozenset[int]:
        # deepseek_v2.py: is_moe_layer = layer_id >= first_k_dense_replace and layer_id % moe_layer_freq == 0
        first = cfg.get("first_k_dense_replace") or 0
        freq = cfg.get("moe_layer_freq") or 1
        return frozenset(i for i in range(layers) if i < first or i % freq)

    def has_shared_expert(self, cfg: dict) -> bool:
        return (cfg.get("n_shared_experts") or 0) > 0

    def extra_layers(self, cfg: dict) -> int:
        return cfg.get("num_nextn_predict_layers") or 0

    def geometry_overrides(self, cfg: dict, dimension) -> dict:
        """ModelGeometry fields config.json gives under DeepSeek's own names (``dimension(key, ...)``
        reads and checks one)."""
        moe = dimension("moe_intermediate_size")
        heads = dimension("num_attention_heads")
        return {
            "shared_intermediate": moe * (dimension("n_shared_experts", required=False, minimum=0) or 0),
            "head_dim": dimension("qk_nope_head_dim") + dimension("qk_rope_head_dim"),
            "kv_heads": heads,  # MLA: every head reads the one latent KV
            "mla": MlaDims(
                heads=heads,
                hidden=dimension("hidden_size"),
                q_lora_rank=dimension("q_lora_rank", required=False),
                kv_lora_rank=dimension("kv_lora_rank"),
                qk_nope_head_dim=dimension("qk_nope_head_dim"),
                qk_rope_head_dim=dimension("qk_rope_head_dim"),
                v_head_dim=dimension("v_head_dim"),
            ),
        }

    def regroup(self, ref: ModuleRef, cfg: dict) -> ModuleRef:
        """Without q_lora_rank SGLang builds q_proj and kv_a_proj_with_mqa as layers of their own."""
        leaf = ref.name.rsplit(".", 1)[-1]
        if ref.role is Role.ATTENTION and cfg.get("q_lora_rank") is None and leaf in ("q_proj", "kv_a_proj_with_mqa"):
            return ModuleRef(ref.name, ref.role, ref.layer, ref.name, leaf)
        return ref

    def serving_refusal(self, group: str, role: Role, precision: str) -> str | None:
        """Why SGLang 0.5.17's DeepseekV3ForCausalLM cannot load or run a layer of this precision
        (``precision``: the format's word, "fp8" / "int4" / "int8"), None if it can."""
        leaf = group.rsplit(".", 1)[-1]
        if precision not in ("int4", "int8"):  # GPTQ: packed qweight, no weight
            return None
        if role is Role.ATTENTION:
            return _DEEPSEEK_INT4_ATTENTION.get(leaf, _DEEPSEEK_INT4_ATTENTION["o_proj"])
        if role is Role.SHARED_EXPERT:
            return (
                "DeepseekV2MoE reads shared_experts.gate_up_proj.weight.dtype when it is built; a GPTQ layer "
                "has qweight, no weight"
            )
        return None

    def server_flags(self) -> tuple[tuple[str, str], ...]:
        return (
            (
                "--disable-shared-experts-fusion",
                "SGLang would load the shared expert as routed expert n_routed_experts of the FusedMoE (DeepSeek-V3's "
                "256 experts on CUDA), one layer of one scheme, while the plan gives mlp.shared_experts a layer and "
                "a source of its own",
            ),
        )

    def plan_refusals(self, groups: dict) -> list[tuple[list[str], str, str]]:
        # post_load_weights dequantizes every FP8 kv_b_proj with one weight_block_size, the one of the
        # model's quant_config.linear_fp8_config (the mixed config's FP8 linears, when they agree)
        fp8 = {
            p: g.scheme
            for p, g in groups.items()
            if g.scheme.quantized
            and g.scheme.format.precision_name(g.scheme) == "fp8"
            and g.role is not Role.ROUTED_EXPERT
        }
        if len(set(fp8.values())) <= 1:
            return []
        labels = sorted({s.label() for s in fp8.values()})
        return [
            (
                sorted(fp8),
                f"its FP8 linears are of {len(labels)} FP8 schemes ({', '.join(labels)}), but post_load_weights "
                "dequantizes every FP8 kv_b_proj with one weight_block_size",
                "take every FP8 linear (attention, dense MLP, shared experts) from FP8 sources of one block size",
            )
        ]


_DEEPSEEK_INT4_ATTENTION = {
    FUSED_QKV_A: "load_weights concatenates q_a_proj and kv_a_proj_with_mqa along dim 0, which for GPTQ's "
    "qweight [K/8, N] joins the wrong axis",
    "q_b_proj": "DeepseekV2AttentionMLA reads q_b_proj.weight.shape when it is built; a GPTQ layer has no weight",
    "kv_b_proj": "post_load_weights splits kv_b_proj into w_kc / w_vc from its weight (it reads a qweight as "
    "AWQ, not GPTQ)",
    "o_proj": "the MLA forward reads o_proj.weight.dtype; a GPTQ layer has no weight",
}


ARCHITECTURES: dict[str, Architecture] = {
    t: arch() for arch in (Llama, Qwen2, Qwen3, Qwen2Moe, Qwen3Moe, Mixtral, DeepseekV3) for t in arch.model_types
}


def architecture_for(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def expected_modules(cfg: dict, geometry: ModelGeometry) -> dict[str, ExpectedModule] | None:
    """{name: ExpectedModule} a checkpoint of ``cfg`` must hold; None for a family not in the table."""
    arch = architecture_for(geometry.model_type)
    if arch is None:
        return None
    return {m.name: m for m in arch.modules(_text_config(cfg), geometry)}


def checkpoint_prefix(model_type: str, prefix: str) -> str:
    """The checkpoint name of the layer a family's SGLang class builds at ``prefix``."""
    arch = architecture_for(model_type)
    return arch.checkpoint_prefix(prefix) if arch is not None else prefix


def transformers_name(model_type: str, name: str) -> str:
    """The name transformers 5 gives checkpoint module / tensor ``name`` in memory."""
    arch = architecture_for(model_type)
    for old, new in arch.transformers_renames if arch is not None else ():
        name = f".{name}.".replace(old, new)[1:-1]  # relative names ("block_sparse_moe.gate") match too
    return name


def fed_directly(model_type: str) -> frozenset[str]:
    """Tensor suffixes the mixed loader must feed to the parameters itself for this family."""
    arch = architecture_for(model_type)
    return arch.fed_directly if arch is not None else frozenset()


def class_problems(geometry: ModelGeometry) -> list[str]:
    """Why the family's SGLang model class cannot load a checkpoint of this config.json (empty if it can)."""
    arch = architecture_for(geometry.model_type)
    if arch is None:
        return []
    problems = []
    if geometry.tie_word_embeddings and not arch.ties_embeddings:
        problems.append(
            f"config.json says tie_word_embeddings: true, but SGLang 0.5.17's {arch.sglang_class} does not tie: "
            "it builds an lm_head of its own and fills it only from an lm_head.weight tensor, which a tied "
            "checkpoint does not hold (the head would serve uninitialised memory)"
        )
    return problems


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg


def missing_16bit_tensors(expected: dict[str, ExpectedModule], tensor_names: Container[str]) -> list[str]:
    """The tensors a 16-bit checkpoint holding ``tensor_names`` lacks (weights, required biases)."""
    return [f"{m.name}.{t}" for m in expected.values() for t in m.tensors if f"{m.name}.{t}" not in tensor_names]


def describe_missing_tensors(missing: list[str], expected: dict[str, ExpectedModule]) -> str:
    """Like :func:`describe_missing`, for tensor names: modules missing whole, then single tensors."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in missing:
        by_module[name.rpartition(".")[0]].append(name)
    whole = [m for m, names in by_module.items() if len(names) == len(expected[m].tensors)]
    partial = [n for m, names in by_module.items() if m not in set(whole) for n in names]
    return "; ".join(
        filter(None, [describe_missing(whole, expected) if whole else "", more(partial) if partial else ""])
    )


def describe_missing(missing: Iterable[str], expected: dict[str, ExpectedModule]) -> str:
    """``layers 24-31 (every module), model.layers.3.self_attn.q_proj and 2 more``: whole layers
    collapsed into ranges, other names listed."""
    per_layer: dict[int | None, int] = defaultdict(int)
    for name in expected:
        per_layer[layer_index(name)] += 1
    absent: dict[int | None, list[str]] = defaultdict(list)
    for name in missing:
        absent[layer_index(name)].append(name)
    whole = sorted(layer for layer, names in absent.items() if layer is not None and len(names) == per_layer[layer])
    named = [n for layer, names in absent.items() if layer not in whole for n in names]
    parts = [f"{layer_ranges(whole)} (every module)"] if whole else []
    if named:
        parts.append(more(named, len(named)))
    return "; ".join(parts)


def layer_ranges(layers: list[int]) -> str:
    """``layers 3, 24-31``"""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return ("layer " if len(layers) == 1 else "layers ") + text
