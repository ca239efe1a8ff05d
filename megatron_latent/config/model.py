"""The model: one dataclass for the network and one for how it thinks, validated once.

`ModelConfig` describes the network (architecture family, sizes, vocabulary) and holds the latent
settings (`LatentSettings`, field `latent`). It knows nothing of files or flags: its errors
(`ConfigError`) name its fields, and the command line translates them into its flags. Five
families are supported, each matching a Hugging Face reference class exactly:

* ``gpt2``     GPT2LMHeadModel: LayerNorm, GELU (tanh approximation), learned absolute
               positions, tied input/output embeddings, biases everywhere.
* ``gpt-neox`` GPTNeoXForCausalLM (Pythia): LayerNorm with bias, parallel attention + MLP
               residual, rotary on `rotary_percent` of each head, exact GELU, untied output layer.
* ``llama``    LlamaForCausalLM: RMSNorm, SwiGLU, rotary on the full head, grouped-query
               attention, no biases, untied (Llama-3.x: tied or not, with the `llama3` rope
               scaling, `rope_scaling`).
* ``qwen2``    Qwen2ForCausalLM (Qwen2.5): LLaMA's layer with biases on q, k and v only.
* ``qwen3``    Qwen3ForCausalLM (Qwen3 dense): LLaMA's layer with an RMSNorm on each head's
               queries and keys before rotary (`qk_layernorm`), head width free (`kv_channels`).

The family sets the defaults of the architecture fields (normalization, activation, positions,
biases, tied embeddings, residual); each may be replaced (Megatron-LM's architecture flags do), as
may `kv_channels`, `qk_layernorm` and `apply_layernorm_1p`. `family_departures` names what the
family's Hugging Face class then cannot hold.

`vocab_size` is the number of meaningful rows (the tokenizer's, or the HF checkpoint's); the
embedding and output layer are built with `padded_vocab_size` rows (a multiple of
`make_vocab_size_divisible_by`), independent of the tensor-parallel size so that checkpoints move
between layouts unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_latent.config.errors import need
from megatron_latent.config.latent import METHOD_SIZE_FIELDS, PAPER_JACOBI_ITERS, LatentSettings

ARCHS = ("gpt2", "gpt-neox", "llama", "qwen2", "qwen3")
# Families whose layer is LLaMA's (the HF classes share its tensor names).
LLAMA_LIKE = ("llama", "qwen2", "qwen3")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "squared_relu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
# How the weights are drawn (see models/init.py).
INIT_STYLES = ("paper", "megatron", "hf")

# What the authors' code (LUMIA-Group/PonderLM-2) does per family, our defaults: the inclusive range
# the training J is drawn from per step (GPT-NeoX: torch.randint(2, 5); LLaMA: torch.randint(2, 4)).
# GPT-2 has no authors' code: it takes the range the paper states, {2, 3}. (Their init per family:
# models/init.py.)
# The PonderLM baseline's feedback per family: LLaMA (modeling_llama_orin.py) mixes the embeddings by
# the output softmax, GPT-NeoX (modeling_gpt_neox_addhidden.py) adds the hidden state; GPT-2 takes
# the PonderLM paper's mix.
_PAPER_DEFAULTS = {
    "gpt2": dict(jacobi_iters=PAPER_JACOBI_ITERS, ponder_feedback="interpolated"),
    "gpt-neox": dict(jacobi_iters=(2, 4), ponder_feedback="hidden"),
    "llama": dict(jacobi_iters=(2, 3), ponder_feedback="interpolated"),
}
# Qwen has no authors' code: it takes their LLaMA code's settings, the closest layer.
_PAPER_DEFAULTS["qwen2"] = _PAPER_DEFAULTS["qwen3"] = _PAPER_DEFAULTS["llama"]

# Per-family defaults for the fields left as None.
_ARCH_DEFAULTS = {
    "gpt2": dict(
        normalization="LayerNorm", activation="gelu_tanh", position_embedding_type="learned_absolute",
        add_bias_linear=True, add_qkv_bias=True, tie_embeddings=True, parallel_residual=False, qk_layernorm=False,
    ),
    "gpt-neox": dict(
        normalization="LayerNorm", activation="gelu", position_embedding_type="rope",
        add_bias_linear=True, add_qkv_bias=True, tie_embeddings=False, parallel_residual=True, qk_layernorm=False,
    ),
    "llama": dict(
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        add_bias_linear=False, add_qkv_bias=False, tie_embeddings=False, parallel_residual=False, qk_layernorm=False,
    ),
}
_ARCH_DEFAULTS["qwen2"] = dict(_ARCH_DEFAULTS["llama"], add_qkv_bias=True)
_ARCH_DEFAULTS["qwen3"] = dict(_ARCH_DEFAULTS["llama"], qk_layernorm=True)
# What each family's HF class may set beyond its defaults (family_departures).
_ARCH_FREE = {
    "gpt2": ("tie_embeddings",), "gpt-neox": ("parallel_residual",),
    "llama": ("add_bias_linear", "add_qkv_bias", "tie_embeddings", "rope_scaling"),  # attention_bias, mlp_bias
    "qwen2": ("tie_embeddings",), "qwen3": ("tie_embeddings", "kv_channels"),  # Qwen3Config.head_dim
}


_LATENT_FIELDS = tuple(f.name for f in dataclasses.fields(LatentSettings))


# ------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelConfig:
    arch: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int = 2048  # context length (max position embeddings); the learned position table of gpt2
    num_query_groups: Optional[int] = None  # None: one group per head (multi-head attention)
    norm_epsilon: float = 1e-5
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Family defaults (see _ARCH_DEFAULTS) when None.
    normalization: Optional[str] = None
    activation: Optional[str] = None
    position_embedding_type: Optional[str] = None
    add_bias_linear: Optional[bool] = None
    add_qkv_bias: Optional[bool] = None
    tie_embeddings: Optional[bool] = None
    parallel_residual: Optional[bool] = None
    kv_channels: Optional[int] = None  # per-head width; None: hidden_size / num_attention_heads
    qk_layernorm: Optional[bool] = None  # a norm (the model's kind) on each head's queries and keys
    apply_layernorm_1p: bool = False  # norms scale by 1 + weight, the weight starting at 0
    # Llama-3.x rope scaling (megatron-core's, HF's rope_type "llama3" with low_freq_factor 1,
    # high_freq_factor 4 and original_max_position_embeddings 8192): the rotary frequencies whose
    # wavelength exceeds 8192 / 1 positions divided by `rope_scaling_factor`, those under 8192 / 4
    # kept, those between interpolated.
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    # Latent thoughts (PonderLM-2): only the forward depends on them, not the weights.
    latent: LatentSettings = field(default_factory=LatentSettings)
    # How the weights are drawn (models/init.py): "paper" (the default), "megatron" (Megatron-LM's
    # normal(0, init_method_std), output projections / sqrt(2 L)) or "hf" (the stock Hugging Face
    # init of the family, which the authors' vanilla baselines had). None: "paper" without
    # init_method_std, "hf" with it (configs saved before init_style existed meant that).
    init_style: Optional[str] = None
    init_method_std: Optional[float] = None
    name: str = "custom"

    def __post_init__(self):
        need(self.arch in ARCHS, f"arch {self.arch!r} is not supported; supported: {', '.join(ARCHS)}")
        for k, v in _ARCH_DEFAULTS[self.arch].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if self.kv_channels is not None and self.kv_channels * self.num_attention_heads == self.hidden_size:
            object.__setattr__(self, "kv_channels", None)  # the default width, said explicitly
        if self.init_style is None:
            object.__setattr__(self, "init_style", "paper" if self.init_method_std is None else "hf")
        if self.init_style != "paper" and self.init_method_std is None:
            object.__setattr__(self, "init_method_std", 0.02)  # Megatron-LM's and Hugging Face's default
        if self.latent.num_latent_thoughts and self.latent.jacobi_iters is None:
            default = default_jacobi_iters(self.arch)
            object.__setattr__(self, "latent", dataclasses.replace(self.latent, jacobi_iters=default))
        if self.latent.num_ponder_steps and self.latent.ponder_feedback is None:
            feedback = _PAPER_DEFAULTS[self.arch]["ponder_feedback"]
            object.__setattr__(self, "latent", dataclasses.replace(self.latent, ponder_feedback=feedback))
        self._validate()

    def _validate(self):
        where = f" (model {self.name!r})"
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                     "seq_length", "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            need(v >= 1, f"{name} must be >= 1, got {v}{where}")
        need(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
              f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
              f"{self.num_attention_heads}{where}")
        need(self.kv_channels is None or self.kv_channels >= 1, f"kv_channels must be >= 1, got {self.kv_channels}")
        g = self.query_groups
        need(1 <= g <= self.num_attention_heads and self.num_attention_heads % g == 0,
              f"num_query_groups {g} must divide num_attention_heads {self.num_attention_heads}{where}")
        need(self.normalization in ("LayerNorm", "RMSNorm"),
              f"normalization {self.normalization!r}: LayerNorm or RMSNorm")
        need(self.activation in ACTIVATIONS, f"activation {self.activation!r}: one of {', '.join(ACTIVATIONS)}")
        need(self.position_embedding_type in POSITION_EMBEDDINGS,
              f"position_embedding_type {self.position_embedding_type!r}: one of {', '.join(POSITION_EMBEDDINGS)}")
        need(self.init_style in INIT_STYLES, f"init_style {self.init_style!r}: one of {', '.join(INIT_STYLES)}")
        for name in ("hidden_dropout", "attention_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(0.0 < self.rotary_percent <= 1.0, f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope":
            rot = self.head_dim * self.rotary_percent
            need(rot == int(rot) and int(rot) % 2 == 0,
                  f"rotary_percent {self.rotary_percent} of head dim {self.head_dim} must be an even whole "
                  f"number of dims, got {rot}{where}")
        need(self.norm_epsilon > 0, f"norm_epsilon must be > 0, got {self.norm_epsilon}")
        need(not self.rope_scaling or self.position_embedding_type == "rope",
             f"rope_scaling needs position_embedding_type rope, got {self.position_embedding_type!r}")
        need(self.rope_scaling_factor >= 1.0, f"rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        need(self.init_style != "paper" or self.init_method_std is None,
             "init_method_std applies to init_style megatron or hf (the paper's init sets its own std)")
        need(self.init_method_std is None or self.init_method_std > 0,
             f"init_method_std must be > 0, got {self.init_method_std}")

    # ------------------------------------------------------------------------------ derived sizes
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def pause_token_id(self) -> Optional[int]:
        """The embedding row of the pause token: the first row after the tokenizer's (a padded row
        of the vocabulary, as the authors' 50288 is of GPT-NeoX's), None without pause tokens."""
        return self.vocab_size if self.latent.num_pause_tokens else None

    @property
    def embedding_rows(self) -> int:
        """Meaningful rows of the embedding: the tokenizer's, plus the pause token's."""
        return self.vocab_size + (1 if self.latent.num_pause_tokens else 0)

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.embedding_rows // m) * m

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters of the model as built (padded vocabulary), counted from the sizes alone."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        norm = 2 * h if self.normalization == "LayerNorm" else h
        qkv_out = (self.num_attention_heads + 2 * self.query_groups) * d
        fc1_out = 2 * f if self.gated else f
        b = self.add_bias_linear
        layer = (
            2 * norm
            + h * qkv_out + (qkv_out if (b or self.add_qkv_bias) else 0)
            + self.num_attention_heads * d * h + (h if b else 0)
            + h * fc1_out + (fc1_out if b else 0)
            + f * h + (h if b else 0)
        )
        if self.qk_layernorm:
            layer += 2 * (2 * d if self.normalization == "LayerNorm" else d)
        total = self.num_layers * layer + norm
        if include_embeddings:
            v = self.padded_vocab_size
            total += v * h * (1 if self.tie_embeddings else 2)
            if self.position_embedding_type == "learned_absolute":
                total += self.seq_length * h
        return total

    # ------------------------------------------------------------------------------ conversions
    def replace(self, **changes) -> "ModelConfig":
        """A copy with fields replaced; LatentSettings' fields (num_latent_thoughts, ...) may be
        given directly and replace those of `latent`. A new N re-derives the default embedding
        scaling (and, from N = 0, the default J range) unless those are given too."""
        if "init_style" not in changes and changes.get("init_method_std") is not None and self.init_style == "paper":
            changes["init_style"] = "hf"  # a std alone means the HF init, as in the constructor
        if changes.get("init_style") == "paper":
            changes.setdefault("init_method_std", None)
        latent = {k: changes.pop(k) for k in _LATENT_FIELDS if k in changes}
        if latent:
            base = changes.get("latent", self.latent)
            switched = METHOD_SIZE_FIELDS + ("thought_input", "ponder_feedback")
            if any(latent.get(k, getattr(base, k)) != getattr(base, k) for k in switched):
                # Another method: its own defaults, unless given.
                latent.setdefault("scale_embeddings", None)
                if latent.get("num_latent_thoughts", base.num_latent_thoughts) == 0:
                    latent.setdefault("thought_input", "hidden")
                    latent.setdefault("interpolation_topk", 0)
                if latent.get("num_ponder_steps", base.num_ponder_steps) == 0:
                    latent.setdefault("ponder_feedback", None)
                    latent.setdefault("ponder_residual", False)
            changes["latent"] = dataclasses.replace(base, **latent)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        j = self.latent.jacobi_iters
        d["latent"]["jacobi_iters"] = list(j) if j is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        """The inverse of to_dict. Also reads the flat latent fields of checkpoints written before
        the latent settings were one object."""
        d = dict(d)
        latent = dict(d.pop("latent", None) or {})
        latent.update({k: d.pop(k) for k in _LATENT_FIELDS if k in d})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known) + sorted(set(latent) - set(_LATENT_FIELDS))
        need(not unknown, f"unknown model config fields: {', '.join(unknown)}")
        return cls(**d, latent=LatentSettings(**latent))

    def check_sequence_fits(self, seq_length: int) -> None:
        """ConfigError when training sequences of `seq_length` tokens do not fit the model's
        positions (whether they split over the sequence-parallel ranks is
        ParallelLayout.check_sequence_split)."""
        need(seq_length >= 1, f"the training sequence length must be >= 1, got {seq_length}")
        need(seq_length <= self.seq_length,
              f"training sequences of {seq_length} tokens exceed the {self.seq_length} positions "
              f"(seq_length) of model {self.name!r}")

    # Fields that decide the shapes (and meaning) of the weights; latent settings only change the forward.
    WEIGHT_FIELDS = (
        "arch", "num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_hidden_size",
        "padded_vocab_size", "normalization", "activation", "position_embedding_type", "add_bias_linear",
        "add_qkv_bias", "tie_embeddings", "parallel_residual", "head_dim", "qk_layernorm", "apply_layernorm_1p",
    )

    def weight_mismatches(self, other: "ModelConfig") -> list:
        """'field: theirs vs ours' for every weight-defining field where `other` differs."""
        fields = self.WEIGHT_FIELDS + (("seq_length",) if self.position_embedding_type == "learned_absolute" else ())
        return [
            f"{f}: {getattr(other, f)} vs {getattr(self, f)}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]

    def family_departures(self) -> List[str]:
        """'field value' for every setting the family's Hugging Face class cannot express (a
        preset changed by architecture flags: such a model trains, but has no HF counterpart)."""
        fixed = dict(_ARCH_DEFAULTS[self.arch], kv_channels=None, apply_layernorm_1p=False, rope_scaling=False)
        for k in _ARCH_FREE[self.arch] + ("activation",):
            fixed.pop(k, None)
        out = [f"{k} {getattr(self, k)}" for k, v in fixed.items() if getattr(self, k) != v]
        acts = ("swiglu",) if self.arch in LLAMA_LIKE else ("gelu", "gelu_tanh")
        if self.activation not in acts:
            out.append(f"activation {self.activation}")
        if self.arch == "llama" and self.add_qkv_bias != self.add_bias_linear:
            out.append(f"add_qkv_bias {self.add_qkv_bias} with add_bias_linear {self.add_bias_linear}")
        if self.arch not in LLAMA_LIKE and self.query_groups != self.num_attention_heads:
            out.append(f"num_query_groups {self.query_groups}")
        return out

    def describe(self) -> str:
        """The method's settings, resolved, in one line (printed at start, with the init's
        models.init.describe_init)."""
        lat = self.latent
        if lat.num_latent_thoughts:
            lo, hi = lat.jacobi_iters
            choices = ", ".join(map(str, range(lo, hi + 1)))
            fed = "" if lat.method == "latent" else (
                f" (interpolated inputs, top-{lat.interpolation_topk})" if lat.interpolation_topk
                else " (interpolated inputs, full softmax)")
            thoughts = (f"N={lat.num_latent_thoughts} latent thoughts{fed}, training J drawn from {{{choices}}} "
                        f"per step, evaluation J={lat.jacobi_iters_eval}")
        elif lat.num_pause_tokens:
            thoughts = f"K={lat.num_pause_tokens} pause tokens per token (pause id {self.pause_token_id})"
        elif lat.num_extra_loops:
            thoughts = f"K={lat.num_extra_loops} extra loops (the layer stack runs {lat.num_extra_loops + 1} times)"
        elif lat.num_ponder_steps:
            fed = ("the current input plus the hidden state" if lat.ponder_feedback == "hidden" else
                   ("the current input" if lat.ponder_residual else "the token embedding")
                   + " plus the softmax-mixed embeddings")
            thoughts = (f"PonderLM, K={lat.num_ponder_steps} pondering steps ({lat.num_ponder_steps + 1} forwards; "
                        f"next input: {fed})")
        else:
            thoughts = "vanilla (N=0)"
        c = lat.embedding_scale_factor
        scale = (f"embeddings x sqrt({c:g} H)" if c != 1 else "embeddings x sqrt(H)") if lat.scale_embeddings \
            else "embeddings unscaled"
        return f"{thoughts}; {scale}"

    def describe_architecture(self) -> str:
        """The resolved network in one line (printed at start): what the flags and preset built."""
        act = {"gelu": "GeLU", "gelu_tanh": "GeLU (tanh)", "swiglu": "SwiGLU", "squared_relu": "squared ReLU"}
        pos = {"rope": f"RoPE (base {self.rotary_base:g}" + (f", {self.rotary_percent:g} of each head"
                                                              if self.rotary_percent != 1 else "")
                       + (f", llama3 scaling x{self.rope_scaling_factor:g})" if self.rope_scaling else ")"),
               "learned_absolute": "learned absolute positions", "none": "no positions"}
        parts = [
            f"{self.num_layers} layers", f"hidden {self.hidden_size}", f"FFN {self.ffn_hidden_size}",
            f"{self.num_attention_heads} heads of {self.head_dim}"
            + (f" in {self.query_groups} query groups" if self.query_groups != self.num_attention_heads else ""),
            f"{self.normalization}" + (" (1p)" if self.apply_layernorm_1p else "") + f" eps {self.norm_epsilon:g}",
            act[self.activation], pos[self.position_embedding_type],
            "biases" if self.add_bias_linear else ("qkv bias only" if self.add_qkv_bias else "no biases"),
            "tied embeddings" if self.tie_embeddings else "untied embeddings",
            f"vocab {self.vocab_size} (padded {self.padded_vocab_size})", f"{self.seq_length} positions",
            f"dropout hidden {self.hidden_dropout:g} attention {self.attention_dropout:g}",
        ]
        if self.qk_layernorm:
            parts.insert(6, "q/k norm")
        if self.parallel_residual:
            parts.insert(6, "parallel residual")
        return ", ".join(parts)


def default_jacobi_iters(arch: str) -> Tuple[int, int]:
    """The training J range of the authors' code for this family (GPT-2: the paper's {2, 3})."""
    return _PAPER_DEFAULTS[arch]["jacobi_iters"]
