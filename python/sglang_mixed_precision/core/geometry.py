"""What a model's config.json says each module's weight looks like, in full and per TP rank.

Logical shapes are the 16-bit ``[out_features, in_features]`` of a linear (``[N, K]``); the
checkpoint formats derive their stored tensors from them. Per-rank shapes follow SGLang's
tensor parallelism: q/k/v, gate/up and the experts' w1/w3 split N; o_proj, down_proj and the
experts' w2 split K; k/v heads are replicated when ``tp > num_key_value_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .architectures import MlaDims, architecture_for
from .errors import ErrorCode, MixedPrecisionError
from .naming import ModuleRef, Role

# The names config.json files of families the architecture table does not know use for the expert count.
_NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _corrupt(where: str, why: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.CORRUPT_CONFIG,
        f"{where}: {why}",
        where=where,
        fix="restore the model's original config.json (every dimension a positive integer)",
    )


def _dimension(cfg: dict, key: str, where: str, *, required: bool = True, minimum: int = 1) -> int | None:
    value = cfg.get(key)
    if value is None:
        if required:
            raise _corrupt(where, f"lacks a model dimension ('{key}')")
        return None
    if type(value) is not int or value < minimum:
        raise _corrupt(where, f"{key} is {value!r}: it must be an integer of at least {minimum}")
    return value


def _hf_dense_layers(cfg: dict, layers: int, where: str) -> frozenset[int]:
    """Transformers' rule for a family the architecture table does not know: experts in every
    ``decoder_sparse_step``-th layer outside ``mlp_only_layers``."""
    step = _dimension(cfg, "decoder_sparse_step", where, required=False) or 1
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(type(i) is int for i in only):
        raise _corrupt(where, f"mlp_only_layers is {only!r}, not a list of layer numbers")
    return frozenset(i for i in range(layers) if i in only or (i + 1) % step)


@dataclass(frozen=True)
class RankShape:
    """One SGLang layer's weight as each TP rank holds it (what the kernels see)."""

    parts: tuple[int, ...]  # output sizes per rank of the fused members, in fusion order
    k: int  # input size per rank
    k_full: int  # input size before splitting
    column_split: bool  # N is split across ranks (column-parallel)
    row_split: bool  # K is split across ranks (row-parallel)
    tp: int = 1
    moe: bool = False
    moe_intermediate: int | None = None  # per-rank intermediate of a FusedMoE
    # output sizes the model's load_weights concatenates, weights and scales as stored, into one
    # parameter (DeepSeek's q_a_proj + kv_a_proj_with_mqa); empty when the layer loads shard by shard
    stacked: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return sum(self.parts)


@dataclass(frozen=True)
class ModelGeometry:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None
    moe_intermediate: int | None
    shared_intermediate: int | None
    num_experts: int | None
    vocab: int
    tie_word_embeddings: bool
    dense_layers: frozenset[int] = field(default=frozenset())  # layers with a dense MLP in a MoE model
    mla: MlaDims | None = None  # multi-head latent attention (DeepSeek-V3)

    @classmethod
    def from_hf_config(cls, cfg: dict, *, where: str = "config.json") -> ModelGeometry:
        """The dimensions of ``cfg``; raises ``corrupt_config`` (naming ``where``) for a missing,
        zero, negative or non-integer dimension, or one SGLang cannot build."""
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        if not isinstance(cfg, dict):
            raise _corrupt(where, "text_config is not an object")
        model_type = str(cfg.get("model_type", ""))
        arch = architecture_for(model_type)
        for key in arch.required_keys if arch else ():
            _dimension(cfg, key, where)
        hidden = _dimension(cfg, "hidden_size", where)
        heads = _dimension(cfg, "num_attention_heads", where)
        kv_heads = _dimension(cfg, "num_key_value_heads", where, required=False) or heads
        if heads % kv_heads:
            raise _corrupt(where, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = _dimension(cfg, "head_dim", where, required=False)
        if head_dim is None:
            if hidden % heads:
                raise _corrupt(where, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        layers = _dimension(cfg, "num_hidden_layers", where)
        tie = cfg.get("tie_word_embeddings", False)
        if not isinstance(tie, bool) and tie is not None:
            raise _corrupt(where, f"tie_word_embeddings is {tie!r}, not true or false")
        keys = arch.num_experts_keys if arch else _NUM_EXPERTS_KEYS
        experts_key = next((k for k in keys if cfg.get(k) is not None), keys[0])
        if arch and arch.moe_family:
            _dimension(cfg, experts_key, where)
        moe_key = arch.moe_intermediate_key if arch else "moe_intermediate_size"
        fields = dict(
            model_type=model_type,
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=_dimension(cfg, "intermediate_size", where, required=False),
            moe_intermediate=_dimension(cfg, moe_key, where, required=False),
            shared_intermediate=_dimension(cfg, "shared_expert_intermediate_size", where, required=False, minimum=0),
            num_experts=_dimension(cfg, experts_key, where, required=False, minimum=0),
            vocab=_dimension(cfg, "vocab_size", where),
            tie_word_embeddings=bool(tie),
            dense_layers=arch.dense_mlp_layers(cfg, layers) if arch else _hf_dense_layers(cfg, layers, where),
        )
        if arch:
            fields.update(arch.geometry_overrides(cfg, lambda key, **kw: _dimension(cfg, key, where, **kw)))
        return cls(**fields)

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts) and self.moe_intermediate is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether SGLang builds ``layer`` with experts (``architectures`` says which layers are dense)."""
        return self.is_moe and layer not in self.dense_layers

    # ---- logical (unsharded) shapes -------------------------------------------------------
    def weight_shape(self, ref: ModuleRef) -> tuple[int, ...] | None:
        """The 16-bit ``weight`` shape config.json implies for a module, None if it says nothing."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        leaf = ref.name.rsplit(".", 1)[-1]
        if self.mla is not None and ref.role in (Role.ATTENTION, Role.NORM) and ref.layer is not None:
            shape = self.mla.weight_shape(leaf)
            if shape is not None or ref.role is Role.ATTENTION:
                return shape
        if ref.role is Role.ATTENTION:
            return {
                "q": (q_out, self.hidden),
                "k": (kv_out, self.hidden),
                "v": (kv_out, self.hidden),
                "o_proj": (self.hidden, q_out),
            }.get(ref.shard or "")
        if ref.role in (Role.DENSE_MLP, Role.SHARED_EXPERT, Role.ROUTED_EXPERT):
            inter = self._intermediate(ref.role)
            if inter is None:
                return None
            if ref.shard in ("gate", "up", "w1", "w3"):
                return (inter, self.hidden)
            if ref.shard in ("down_proj", "w2"):
                return (self.hidden, inter)
            return None
        if ref.role is Role.ROUTER:
            return (1, self.hidden) if leaf == "shared_expert_gate" else (self.num_experts or 0, self.hidden)
        if ref.role in (Role.EMBEDDING, Role.LM_HEAD):
            return (self.vocab, self.hidden)
        if ref.role is Role.NORM:
            return (self.head_dim,) if leaf in ("q_norm", "k_norm") else (self.hidden,)
        return None

    def _intermediate(self, role: Role) -> int | None:
        if role is Role.ROUTED_EXPERT:
            return self.moe_intermediate
        if role is Role.SHARED_EXPERT:
            return self.shared_intermediate
        return self.intermediate

    # ---- tensor parallelism ---------------------------------------------------------------
    def kv_heads_per_rank(self, tp: int) -> int:
        return max(1, self.kv_heads // tp)

    def tp_problems(self, tp: int) -> list[str]:
        """Head / intermediate counts SGLang cannot split over ``tp`` ranks at all, whatever the precision."""
        problems = []
        if self.heads % tp:
            problems.append(f"num_attention_heads={self.heads} is not divisible by tp_size={tp}")
        if tp >= self.kv_heads and tp % self.kv_heads:
            problems.append(f"tp_size={tp} is not a multiple of num_key_value_heads={self.kv_heads}")
        if tp < self.kv_heads and self.kv_heads % tp:
            problems.append(f"num_key_value_heads={self.kv_heads} is not divisible by tp_size={tp}")
        for name, value in (
            ("intermediate_size", self.intermediate),
            ("moe_intermediate_size", self.moe_intermediate),
            ("shared_expert_intermediate_size", self.shared_intermediate),
        ):
            if value and value % tp:
                problems.append(f"{name}={value} is not divisible by tp_size={tp}")
        return problems

    def rank_shape(self, role: Role, fused_leaf: str, tp: int) -> RankShape | None:
        """Per-rank weight of one SGLang layer (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
        ``down_proj``, ``experts``); None for layers that are not TP-split linears."""
        hd, hidden = self.head_dim, self.hidden
        if role is Role.ATTENTION and self.mla is not None:
            return self.mla.rank_shape(fused_leaf, tp)
        if role is Role.ATTENTION and fused_leaf == "qkv_proj":
            kv = self.kv_heads_per_rank(tp) * hd
            return RankShape((self.heads * hd // tp, kv, kv), hidden, hidden, True, False, tp)
        if role is Role.ATTENTION and fused_leaf == "o_proj":
            q_out = self.heads * hd
            return RankShape((hidden,), q_out // tp, q_out, False, True, tp)
        if role is Role.ROUTED_EXPERT:
            inter = (self.moe_intermediate or 0) // tp
            return RankShape((inter, inter), hidden, hidden, True, False, tp, moe=True, moe_intermediate=inter)
        inter = self._intermediate(role)
        if inter is None:
            return None
        if fused_leaf == "gate_up_proj":
            return RankShape((inter // tp, inter // tp), hidden, hidden, True, False, tp)
        if fused_leaf == "down_proj":
            return RankShape((hidden,), inter // tp, inter, False, True, tp)
        return None

    def rank_fraction(self, ref: ModuleRef, tp: int) -> float:
        """Share of a module's bytes each TP rank holds (1.0 for replicated modules)."""
        if tp == 1:
            return 1.0
        if ref.role in (Role.NORM, Role.ROUTER, Role.OTHER):
            return 1.0
        if self.mla is not None and ref.role is Role.ATTENTION:
            rank_shape = self.mla.rank_shape(ref.group.rsplit(".", 1)[-1], tp)
            return 1.0 / tp if rank_shape is None or rank_shape.column_split or rank_shape.row_split else 1.0
        if ref.role is Role.ATTENTION and ref.shard in ("k", "v"):
            return 1.0 / min(tp, self.kv_heads)
        return 1.0 / tp
