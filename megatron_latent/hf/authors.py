"""The latent keys of HF configs, in the authors' meaning (LUMIA-Group/PonderLM-2), and ours.

Their loader writes every key below into config.json; their modeling code reads them as:

* `num_latent_thoughts` (int): thoughts per token (N).
* `num_jacobi_iterations` (int): the evaluation J; also the training J when random is off.
* `random_jacobi_iterations` (bool): training draws J per step from the family range
  (GPT-NeoX torch.randint(2, 5), LLaMA torch.randint(2, 4): `default_jacobi_iters(arch)`).
* `scale_embeds` (bool): token embeddings times sqrt(2.5 H) (sqrt(H) with `interpolation`).
* `interpolation` (bool, their loader's default true): thoughts are softmax-weighted embedding
  mixtures (PonderLM-1), not hidden states. We only implement false.
* `recurrent_model` (bool, getattr default false): their LLaMA runs the vanilla forward without it,
  and their docs require it for every pondering method.

Their config does not record `--patch_method`: a Loop or Pause Token baseline trained with their
scripts carries the same keys as PonderLM-2 and cannot be told apart here.

Our exports write their keys with their meaning, plus `jacobi_iters_range` [lo, hi] when our
training range is neither their family range nor the fixed J. The baselines are ours to name:
`interpolation` true with `interpolation_use_topk` / `interpolation_topk` (their keys: thoughts
are the output softmax's mix of the embeddings, in the slot layout), and our `num_pause_tokens`
with `pause_token_id` (the config's vocab_size then counts the pause row: tokenizer + 1),
`num_extra_loops`, and `embedding_scale_factor` (embeddings times sqrt(factor * H) with
`scale_embeds`). Exports before this wrote
`random_jacobi_iterations` as [lo, hi] (or null), which is still read. Our exports carry
`latent_prefill` (a remote-code field), which tells them apart: an absent key there means ours.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from megatron_latent.config.model import default_jacobi_iters

# Keys of other methods of their code base (Pause Token, PonderLM-1 "orin"/"addhidden").
_OTHER_METHOD_KEYS = {"pause_token_id": "Pause Token baseline", "hidden_layer_num": "PonderLM-1 (hidden-layer)",
                      "residual_interpolated_embeds": "PonderLM-1 (interpolated embeddings)"}
OUR_RANGE_KEY = "jacobi_iters_range"


class AuthorsConfigError(ValueError):
    """A latent config.json this project cannot run faithfully; the message names the key."""


def _family_range(arch: str) -> Tuple[int, int]:
    return tuple(default_jacobi_iters(arch))


def _range(value, key: str) -> Optional[Tuple[int, int]]:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    raise AuthorsConfigError(f"config.json {key} {value!r}: expected [min, max] (inclusive J range)")


def _our_method(c) -> Dict:
    """The baseline fields of our own export's config (and the tokenizer's vocabulary size when
    the config counts the pause row)."""
    out = {}
    for key in ("num_pause_tokens", "num_extra_loops", "interpolation_topk", "num_ponder_steps"):
        v = getattr(c, key, 0) or 0
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise AuthorsConfigError(f"config.json {key} {v!r}: expected an integer >= 0")
    if getattr(c, "num_pause_tokens", 0):
        out.update(num_pause_tokens=c.num_pause_tokens, vocab_size=c.vocab_size - 1)
        if getattr(c, "pause_token_id", None) != c.vocab_size - 1:
            raise AuthorsConfigError(f"config.json pause_token_id {getattr(c, 'pause_token_id', None)!r}: expected "
                                     f"{c.vocab_size - 1} (the last row of vocab_size {c.vocab_size})")
    if getattr(c, "num_extra_loops", 0):
        out["num_extra_loops"] = c.num_extra_loops
    if getattr(c, "num_ponder_steps", 0):
        return dict(out, **_ponder(c, c.num_ponder_steps, getattr(c, "ponder_feedback", "interpolated")))
    if getattr(c, "interpolation", False):
        out["thought_input"] = "interpolated"
        if getattr(c, "interpolation_use_topk", False):
            out["interpolation_topk"] = getattr(c, "interpolation_topk", 100)
    return out


def _ponder(c, k, feedback) -> Dict:
    """Pondering fields of K steps with this feedback (their `residual_interpolated_embeds`)."""
    if feedback not in ("interpolated", "hidden"):
        raise AuthorsConfigError(f"config.json ponder_feedback {feedback!r}: expected interpolated or hidden")
    residual = getattr(c, "residual_interpolated_embeds", False)
    if not isinstance(residual, bool) or (residual and feedback == "hidden"):
        raise AuthorsConfigError(f"config.json residual_interpolated_embeds {residual!r}: expected true or false, "
                                 "and false with the hidden feedback")
    return dict(num_ponder_steps=k, ponder_feedback=feedback, ponder_residual=residual)


def latent_from_hf(c, arch: str) -> Dict:
    """LatentSettings field values (for ModelConfig.replace) of an HF config's latent keys."""
    ours = hasattr(c, "latent_prefill")
    # Our baseline exports name their method (the keys the authors' PonderLM-2 files refuse below).
    method = _our_method(c) if ours and (getattr(c, "num_pause_tokens", 0) or getattr(c, "num_extra_loops", 0)
                                         or getattr(c, "interpolation", False)
                                         or getattr(c, "num_ponder_steps", 0)) else {}
    n = getattr(c, "num_latent_thoughts", 0) or 0
    scale = getattr(c, "scale_embeds", False)
    for key in ("scale_embeds", "interpolation", "recurrent_model"):
        v = getattr(c, key, None)
        if v is not None and not isinstance(v, bool):
            raise AuthorsConfigError(f"config.json {key} {v!r}: expected true or false")
    if not isinstance(n, int) or n < 0:
        raise AuthorsConfigError(f"config.json num_latent_thoughts {n!r}: expected an integer >= 0")
    if not (n or scale or method):
        return {}  # vanilla: their other keys do not change the forward
    if not method:
        for key, other in _OTHER_METHOD_KEYS.items():
            if getattr(c, key, None) is not None:
                raise AuthorsConfigError(f"config.json {key}: a {other} model, not PonderLM-2; not supported")
        if not getattr(c, "recurrent_model", ours):
            raise AuthorsConfigError(
                f"config.json recurrent_model false (or absent) with {n} latent thought(s), scale_embeds "
                f"{str(bool(scale)).lower()}: the authors' code runs the vanilla forward; set it true only if the "
                "model was trained with pondering, or drop the latent keys")
        if getattr(c, "interpolation", not ours):
            raise AuthorsConfigError(
                "config.json interpolation true (or absent: their loader's default): PonderLM-1 interpolated "
                "embeddings, not PonderLM-2 hidden-state thoughts; not supported")
    j_eval = getattr(c, "num_jacobi_iterations", 3)
    if not isinstance(j_eval, int) or isinstance(j_eval, bool) or j_eval < 0:
        raise AuthorsConfigError(f"config.json num_jacobi_iterations {j_eval!r}: expected an integer >= 0")
    out = dict(method, num_latent_thoughts=n, jacobi_iters_eval=j_eval, scale_embeddings=bool(scale))
    if n:
        rnd = getattr(c, "random_jacobi_iterations", False)
        if getattr(c, OUR_RANGE_KEY, None) is not None:
            out["jacobi_iters"] = _range(getattr(c, OUR_RANGE_KEY), OUR_RANGE_KEY)
        elif isinstance(rnd, bool) or rnd is None:
            out["jacobi_iters"] = _family_range(arch) if rnd else (j_eval, j_eval)
        else:  # our earlier exports: the range itself
            out["jacobi_iters"] = _range(rnd, "random_jacobi_iterations")
    return out


def latent_to_hf(cfg) -> Dict:
    """config.json latent keys of a latent ModelConfig: theirs with their meaning, ours when needed."""
    lat = cfg.latent
    n, j_eval = lat.num_latent_thoughts, lat.jacobi_iters_eval
    d = dict(num_latent_thoughts=n, num_jacobi_iterations=j_eval, random_jacobi_iterations=False,
             scale_embeds=bool(lat.scale_embeddings), interpolation=lat.thought_input == "interpolated",
             recurrent_model=True, embedding_scale_factor=lat.embedding_scale_factor)
    if lat.thought_input == "interpolated":
        d.update(interpolation_use_topk=bool(lat.interpolation_topk), interpolation_topk=lat.interpolation_topk)
    if lat.num_pause_tokens:
        d.update(num_pause_tokens=lat.num_pause_tokens, pause_token_id=cfg.pause_token_id)
    if lat.num_extra_loops:
        d["num_extra_loops"] = lat.num_extra_loops
    if lat.num_ponder_steps:
        d.update(num_ponder_steps=lat.num_ponder_steps, ponder_feedback=lat.ponder_feedback,
                 residual_interpolated_embeds=lat.ponder_residual)
    if n:
        j = tuple(lat.jacobi_iters)
        if j == _family_range(cfg.arch):
            d["random_jacobi_iterations"] = True
        elif j != (j_eval, j_eval):
            d["random_jacobi_iterations"] = j[0] != j[1]
            d[OUR_RANGE_KEY] = list(j)
    return d
