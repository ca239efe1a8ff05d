"""Model configuration: one dataclass, one preset registry, conversion to megatron's TransformerConfig.

`ModelConfig` describes the network (architecture family, sizes, vocabulary) plus the latent-thought
knobs of the paper. It knows nothing of files or flags beyond naming them in its errors. Three
families are supported, each matching a Hugging Face reference class exactly:

* ``gpt2``     GPT2LMHeadModel: LayerNorm, GELU (tanh approximation), learned absolute
               positions, tied input/output embeddings, biases everywhere.
* ``gpt-neox`` GPTNeoXForCausalLM (Pythia): LayerNorm with bias, parallel attention + MLP
               residual, rotary on `rotary_percent` of each head, exact GELU, untied output layer.
* ``llama``    LlamaForCausalLM: RMSNorm, SwiGLU, rotary on the full head, grouped-query
               attention, no biases, untied.

`vocab_size` is the number of meaningful rows (the tokenizer's, or the HF checkpoint's); the
embedding and output layer are built with `padded_vocab_size` rows (a multiple of
`make_vocab_size_divisible_by`), independent of the tensor-parallel size so that checkpoints move
between layouts unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

ARCHS = ("gpt2", "gpt-neox", "llama")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")

# Per-family defaults for the fields left as None.
_ARCH_DEFAULTS = {
    "gpt2": dict(
        normalization="LayerNorm", activation="gelu_tanh", position_embedding_type="learned_absolute",
        add_bias_linear=True, add_qkv_bias=True, tie_embeddings=True, parallel_residual=False,
    ),
    "gpt-neox": dict(
        normalization="LayerNorm", activation="gelu", position_embedding_type="rope",
        add_bias_linear=True, add_qkv_bias=True, tie_embeddings=False, parallel_residual=True,
    ),
    "llama": dict(
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        add_bias_linear=False, add_qkv_bias=False, tie_embeddings=False, parallel_residual=False,
    ),
}


class ModelConfigError(ValueError):
    """An impossible model configuration; the message names the field or flag."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new" (tanh approximation). A named function, so configs stay picklable."""
    return torch.nn.functional.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int = 2048  # context length; the size of the learned position table for gpt2
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
    # Latent thoughts (PonderLM-2). N = 0 is a vanilla GPT with the same weights.
    num_latent_thoughts: int = 0
    jacobi_iters: Tuple[int, int] = (2, 3)  # inclusive range J is drawn from in training
    jacobi_iters_eval: int = 3
    scale_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ModelConfigError(f"arch {self.arch!r} is not supported; supported: {', '.join(ARCHS)}")
        for k, v in _ARCH_DEFAULTS[self.arch].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        object.__setattr__(self, "jacobi_iters", tuple(int(j) for j in self.jacobi_iters))
        self._validate()

    def _validate(self):
        def need(cond, msg):
            if not cond:
                raise ModelConfigError(f"model {self.name!r}: {msg}")

        for flag, v in (
            ("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads), ("--ffn-hidden-size", self.ffn_hidden_size),
            ("--vocab-size", self.vocab_size), ("--seq-length", self.seq_length),
            ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by),
        ):
            need(v >= 1, f"{flag} must be >= 1, got {v}")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {self.num_attention_heads}",
        )
        g = self.query_groups
        need(
            1 <= g <= self.num_attention_heads and self.num_attention_heads % g == 0,
            f"--num-query-groups {g} must divide --num-attention-heads {self.num_attention_heads}",
        )
        need(self.normalization in ("LayerNorm", "RMSNorm"), f"normalization {self.normalization!r}: LayerNorm or RMSNorm")
        need(self.activation in ACTIVATIONS, f"activation {self.activation!r}: one of {', '.join(ACTIVATIONS)}")
        need(
            self.position_embedding_type in ("rope", "learned_absolute"),
            f"position_embedding_type {self.position_embedding_type!r}: rope or learned_absolute",
        )
        need(0.0 < self.rotary_percent <= 1.0, f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope":
            rot = self.head_dim * self.rotary_percent
            need(
                rot == int(rot) and int(rot) % 2 == 0,
                f"--rotary-percent {self.rotary_percent} of head dim {self.head_dim} must be an even "
                f"whole number of dims, got {rot}",
            )
        need(self.norm_epsilon > 0, f"norm epsilon must be > 0, got {self.norm_epsilon}")
        need(self.num_latent_thoughts >= 0, f"--num-latent-thoughts must be >= 0, got {self.num_latent_thoughts}")
        lo, hi = self.jacobi_iters if len(self.jacobi_iters) == 2 else (-1, -1)
        need(
            len(self.jacobi_iters) == 2 and 0 <= lo <= hi,
            f"--jacobi-iters {list(self.jacobi_iters)}: need an inclusive range 0 <= min <= max",
        )
        need(self.jacobi_iters_eval >= 0, f"--jacobi-iters-eval must be >= 0, got {self.jacobi_iters_eval}")

    # ------------------------------------------------------------------------------ derived sizes
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

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
        total = self.num_layers * layer + norm
        if include_embeddings:
            v = self.padded_vocab_size
            total += v * h * (1 if self.tie_embeddings else 2)
            if self.position_embedding_type == "learned_absolute":
                total += self.seq_length * h
        return total

    # ------------------------------------------------------------------------------ conversions
    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["jacobi_iters"] = list(self.jacobi_iters)
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**d)

    def check_parallel(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
        """Raise ModelConfigError naming the flag when this model cannot be split this way."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        flag = "--tensor-model-parallel-size"
        for what, n in (("attention heads", self.num_attention_heads), ("query groups", self.query_groups)):
            if tp > n:
                raise ModelConfigError(f"{flag} {tp} is larger than the number of {what} ({n}) of model {self.name!r}")
            if n % tp:
                raise ModelConfigError(f"{flag} {tp} does not divide the number of {what} ({n}) of model {self.name!r}")
        for what, n in (("--ffn-hidden-size", self.ffn_hidden_size), ("padded vocabulary size", self.padded_vocab_size)):
            if n % tp:
                raise ModelConfigError(f"{flag} {tp} does not divide the {what} {n} of model {self.name!r}")
        if pp < 1 or self.num_layers % pp:
            raise ModelConfigError(
                f"--pipeline-model-parallel-size {pp} does not divide --num-layers {self.num_layers} "
                f"of model {self.name!r}"
            )

    def check_seq_length(self, seq_length: int) -> None:
        """Raise ModelConfigError when training sequences are longer than the model's positions."""
        if seq_length < 1:
            raise ModelConfigError(f"--seq-length must be >= 1, got {seq_length}")
        if seq_length > self.seq_length:
            raise ModelConfigError(
                f"--seq-length {seq_length} exceeds --max-position-embeddings {self.seq_length} of "
                f"model {self.name!r}"
            )

    # Fields that decide the shapes (and meaning) of the weights; latent fields only change the forward.
    WEIGHT_FIELDS = (
        "arch", "num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_hidden_size",
        "padded_vocab_size", "normalization", "activation", "position_embedding_type", "add_bias_linear",
        "add_qkv_bias", "tie_embeddings", "parallel_residual",
    )

    def weight_mismatches(self, other: "ModelConfig") -> list:
        """'field: ours vs theirs' for every weight-defining field where `other` differs."""
        fields = self.WEIGHT_FIELDS + (("seq_length",) if self.position_embedding_type == "learned_absolute" else ())
        return [
            f"{f}: {getattr(other, f)} vs {getattr(self, f)}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]

    def latent_settings(self):
        """The latent model's settings (megatron_latent.models.latent.LatentSettings)."""
        from megatron_latent.models.latent import LatentSettings

        n = self.num_latent_thoughts
        return LatentSettings(
            num_latent_thoughts=n,
            jacobi_iters=self.jacobi_iters if n else None,
            jacobi_iters_eval=self.jacobi_iters_eval,
            scale_embeddings=self.scale_embeddings,
        )

    def init_methods(self) -> Dict:
        """The paper's init (TransformerConfig fields), for every family: truncated normal with std
        sqrt(2/(5H)); attention-out and MLP-out further divided by sqrt(2 * layers * (N+1))."""
        from megatron_latent.models.latent import paper_init_methods

        return paper_init_methods(self.hidden_size, self.num_layers, self.num_latent_thoughts)

    def to_transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: Optional[int] = None,
        params_dtype: torch.dtype = torch.float32,
        **overrides,
    ):
        """megatron-core TransformerConfig of this model; `overrides` are TransformerConfig fields
        (sequence_parallel, recompute_granularity, bf16, ...)."""
        from megatron.core.transformer import TransformerConfig

        self.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
        act = {"gelu": torch.nn.functional.gelu, "gelu_tanh": gelu_tanh, "swiglu": torch.nn.functional.silu}
        cuda = torch.cuda.is_available()
        kw = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            activation_func=act[self.activation],
            gated_linear_unit=self.gated,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            # Full weights drawn on CPU, then split: the same model at every TP size.
            use_cpu_initialization=not cuda,
            # Unbatched p2p pairs exactly on gloo (DESIGN.md section 3).
            batch_p2p_comm=cuda,
            **self.init_methods(),
        )
        if params_dtype == torch.bfloat16:
            kw["bf16"] = True
        elif params_dtype == torch.float16:
            kw["fp16"] = True
        kw.update(overrides)
        if (
            kw.get("recompute_granularity") == "selective"
            and "mlp" in (kw.get("recompute_modules") or ())
            and self.add_bias_linear
            and not self.parallel_residual
        ):
            # megatron-core 0.16.1's TransformerLayer returns the fc2 bias Parameter through its
            # CheckpointFunction, whose backward then recurses without end.
            raise ModelConfigError(
                f"--recompute-modules mlp does not work with the biased MLP of model {self.name!r} "
                "(megatron-core 0.16.1); use --recompute-granularity full"
            )
        return TransformerConfig(**kw)


# ------------------------------------------------------------------------------------ presets
def _pythia(name, h, layers, heads):
    return ModelConfig(
        name=name, arch="gpt-neox", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=4 * h, vocab_size=50304, seq_length=2048, rotary_percent=0.25,
    )


def _llama(name, h, layers, heads, ffn):
    return ModelConfig(
        name=name, arch="llama", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=ffn, vocab_size=50304, seq_length=2048,
    )


def _gpt2(name, h, layers, heads):
    return ModelConfig(
        name=name, arch="gpt2", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=4 * h, vocab_size=50257, seq_length=1024,
    )


PRESETS: Dict[str, ModelConfig] = {
    c.name: c
    for c in (
        # Pythia (EleutherAI/pythia-*): GPT-NeoX, vocab 50304 (GPT-NeoX-20B tokenizer, padded).
        _pythia("pythia-70m", 512, 6, 8),
        _pythia("pythia-160m", 768, 12, 12),
        _pythia("pythia-410m", 1024, 24, 16),
        _pythia("pythia-1b", 2048, 16, 8),
        _pythia("pythia-1.4b", 2048, 24, 16),
        _pythia("pythia-2.8b", 2560, 32, 32),
        # The paper's LLaMA configurations (d / layers / heads / ffn).
        _llama("llama-125m", 768, 12, 12, 2064),
        _llama("llama-410m", 1024, 24, 16, 2752),
        _llama("llama-834m", 1536, 24, 24, 4128),
        _llama("llama-1.4b", 2048, 24, 32, 5504),
        _llama("llama-2.8b", 2048, 48, 32, 5504),
        # GPT-2 (openai-community/gpt2, -medium, -large).
        _gpt2("gpt2-small", 768, 12, 12),
        _gpt2("gpt2-medium", 1024, 24, 16),
        _gpt2("gpt2-large", 1280, 36, 20),
        # Tiny models for tests and the quickstart (TP up to 4, PP up to 4).
        ModelConfig(name="tiny-gpt2", arch="gpt2", num_layers=4, hidden_size=64, num_attention_heads=4,
                    ffn_hidden_size=256, vocab_size=256, seq_length=64),
        ModelConfig(name="tiny-pythia", arch="gpt-neox", num_layers=4, hidden_size=64, num_attention_heads=4,
                    ffn_hidden_size=256, vocab_size=256, seq_length=64, rotary_percent=0.25),
        ModelConfig(name="tiny-llama", arch="llama", num_layers=4, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=176, vocab_size=256, seq_length=64),
    )
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name (`--model-preset`), with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ModelConfigError(f"--model-preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def describe_presets() -> str:
    """One line per preset: name, family, sizes and parameter count."""
    lines = []
    for c in PRESETS.values():
        lines.append(
            f"{c.name:13s} {c.arch:8s} layers={c.num_layers:<3d} hidden={c.hidden_size:<5d} "
            f"heads={c.num_attention_heads:<3d} groups={c.query_groups:<3d} ffn={c.ffn_hidden_size:<6d} "
            f"vocab={c.padded_vocab_size:<6d} params={c.num_parameters():,} "
            f"(non-embedding {c.num_parameters(include_embeddings=False):,})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_presets())
