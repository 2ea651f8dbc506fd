"""What a model's config.json says each module's weight looks like, in full and per TP rank.

Logical shapes are the 16-bit ``[out_features, in_features]`` of a linear (``[N, K]``); the
checkpoint formats derive their stored tensors from them. Per-rank shapes follow SGLang's
tensor parallelism: q/k/v, gate/up and the experts' w1/w3 split N; o_proj, down_proj and the
experts' w2 split K; k/v heads are replicated when ``tp > num_key_value_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .naming import ModuleRef, Role

# The names config.json files use for the same quantity, across architectures and versions.
_ALIASES = {
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "shared_intermediate": ("shared_expert_intermediate_size",),
}


def _first(cfg: dict, keys: tuple[str, ...], default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


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
    mlp_only_layers: tuple[int, ...] = field(default=())
    decoder_sparse_step: int = 1

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelGeometry:
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return cls(
            model_type=str(cfg.get("model_type", "")),
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=cfg.get("intermediate_size"),
            moe_intermediate=cfg.get("moe_intermediate_size"),
            shared_intermediate=_first(cfg, _ALIASES["shared_intermediate"]),
            num_experts=_first(cfg, _ALIASES["num_experts"]),
            vocab=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        )

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts) and self.moe_intermediate is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen2/3-MoE place experts in every ``decoder_sparse_step``-th layer outside ``mlp_only_layers``."""
        if not self.is_moe or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    # ---- logical (unsharded) shapes -------------------------------------------------------
    def weight_shape(self, ref: ModuleRef) -> tuple[int, ...] | None:
        """The 16-bit ``weight`` shape config.json implies for a module, None if it says nothing."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        leaf = ref.name.rsplit(".", 1)[-1]
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
        if ref.role is Role.ATTENTION and ref.shard in ("k", "v"):
            return 1.0 / min(tp, self.kv_heads)
        return 1.0 / tp
