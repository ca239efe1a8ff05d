"""The latent keys of HF configs, in the authors' meaning (LUMIA-Group/PonderLM-2), and ours.

Their loader writes every key below into config.json; their modeling code reads them as:

* `num_latent_thoughts` (int): thoughts per token (N).
* `num_jacobi_iterations` (int): the evaluation J; also the training J when random is off.
* `random_jacobi_iterations` (bool): training draws J per step from the family range
  (GPT-NeoX torch.randint(2, 5), LLaMA torch.randint(2, 4): `default_jacobi_iters(arch)`).
* `scale_embeds` (bool): token embeddings times sqrt(2.5 H) (sqrt(H) with `interpolation`).
* `interpolation` (bool, their loader's default true): in their PonderLM-2 files, thoughts are
  softmax-weighted embedding mixtures instead of hidden states (our interpolated thoughts).
* `recurrent_model` (bool, getattr default false): their LLaMA runs the vanilla forward without it,
  and their docs require it for every pondering method.

Their config does not record `--patch_method` (src/llamafactory/model/loader.py writes only the
keys above), and their scripts write the same keys for different methods: PonderLM
(train_ponderlm_llama_1_4b.sh: interpolation true, num_latent_thoughts 3) looks like PonderLM-2
with 3 interpolated thoughts and a fixed J of 3, and Loop and Pause (interpolation false,
num_latent_thoughts 3, random J) look like PonderLM-2 with 3 thoughts. So the method is read from
a `patch_method` key (their flag's values; `convert_from_hf.py --patch-method` sets it), and
without one: interpolation false is PonderLM-2 (their `ours`), interpolation true is refused as
ambiguous. `ponderlm` converts num_latent_thoughts K into K pondering steps with the family's
feedback of their files (LLaMA modeling_llama_orin.py: the softmax mix, `scale_embeds` sqrt(H),
`residual_interpolated_embeds`; GPT-NeoX modeling_gpt_neox_addhidden.py: the hidden state, no
scale); `loop` into K extra loops; `pause` is refused (its embedding row is not converted).

Our exports write their keys with their meaning, plus `jacobi_iters_range` [lo, hi] when our
training range is neither their family range nor the fixed J. The baselines are ours to name:
`interpolation` true with `interpolation_use_topk` / `interpolation_topk` (their keys: thoughts
are the output softmax's mix of the embeddings, in the slot layout), and our `num_pause_tokens`
with `pause_token_id` (the config's vocab_size then counts the pause row: tokenizer + 1),
`num_extra_loops`, `num_ponder_steps` with `ponder_feedback` and their `residual_interpolated_embeds`
(num_latent_thoughts is then 0), and `embedding_scale_factor` (embeddings times sqrt(factor * H) with
`scale_embeds`). Exports before this wrote
`random_jacobi_iterations` as [lo, hi] (or null), which is still read. Our exports carry
`latent_prefill` (a remote-code field), which tells them apart: an absent key there means ours.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from megatron_latent.config.model import default_jacobi_iters

# Keys of other methods of their code base (Pause Token, PonderLM "orin"/"addhidden").
_OTHER_METHOD_KEYS = {
    "pause_token_id": "a Pause Token baseline model, not PonderLM-2; not supported",
    "hidden_layer_num": "their PonderLM's multi-layer feedback, not PonderLM-2; not supported",
    "residual_interpolated_embeds": "a key of their PonderLM baseline (modeling_llama_orin.py), not PonderLM-2; "
                                    "convert it with patch_method ponderlm",
}
OUR_RANGE_KEY = "jacobi_iters_range"
PATCH_METHODS = ("ours", "ponderlm", "loop", "pause")  # their --patch_method values (vanilla: no latent keys)


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
    patch = None if ours else getattr(c, "patch_method", None)
    if patch is not None and patch not in PATCH_METHODS:
        raise AuthorsConfigError(f"patch_method {patch!r}: one of {', '.join(PATCH_METHODS)} (the authors' flag)")
    for key in ("scale_embeds", "interpolation", "recurrent_model"):
        v = getattr(c, key, None)
        if v is not None and not isinstance(v, bool):
            raise AuthorsConfigError(f"config.json {key} {v!r}: expected true or false")
    if not isinstance(n, int) or n < 0:
        raise AuthorsConfigError(f"config.json num_latent_thoughts {n!r}: expected an integer >= 0")
    if not (n or scale or method):
        return {}  # vanilla: their other keys do not change the forward
    if patch in ("ponderlm", "loop", "pause"):
        return _their_baseline(c, patch, n, arch, scale)
    if not method:
        for key, other in _OTHER_METHOD_KEYS.items():
            if getattr(c, key, None) is not None:
                raise AuthorsConfigError(f"config.json {key}: {other}")
        if not getattr(c, "recurrent_model", ours):
            raise AuthorsConfigError(
                f"config.json recurrent_model false (or absent) with {n} latent thought(s), scale_embeds "
                f"{str(bool(scale)).lower()}: the authors' code runs the vanilla forward; set it true only if the "
                "model was trained with pondering, or drop the latent keys")
        if getattr(c, "interpolation", not ours):
            if patch != "ours":
                raise AuthorsConfigError(
                    f"config.json interpolation true (or absent: their loader's default) and {n} thought(s): "
                    f"their PonderLM baseline (--patch_method ponderlm: {n} pondering steps) and PonderLM-2 "
                    f"with {n} interpolated thought(s) (--patch_method ours) write the same keys; say which with "
                    "patch_method ponderlm or ours")
            method = dict(thought_input="interpolated")
            if getattr(c, "interpolation_use_topk", False):
                method["interpolation_topk"] = getattr(c, "interpolation_topk", 100)
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


def _their_baseline(c, patch: str, k, arch: str, scale) -> Dict:
    """LatentSettings fields of a checkpoint trained with their --patch_method `patch` (K =
    their num_latent_thoughts), as their modeling file for it computes."""
    if not getattr(c, "recurrent_model", False):
        raise AuthorsConfigError(f"config.json recurrent_model false (or absent) with patch_method {patch}: the "
                                 "authors' code runs the vanilla forward")
    if not k:
        raise AuthorsConfigError(f"config.json num_latent_thoughts 0 with patch_method {patch}: no steps to convert")
    if getattr(c, "hidden_layer_num", None) is not None:
        raise AuthorsConfigError("config.json hidden_layer_num: their multi-layer feedback is not supported")
    if patch == "pause":
        raise AuthorsConfigError("patch_method pause: the authors' pause embedding row is not converted; "
                                 "not supported")
    if patch == "loop":
        return dict(num_extra_loops=k, scale_embeddings=bool(scale))
    if arch == "gpt-neox":  # modeling_gpt_neox_addhidden.py reads neither scale_embeds nor the residual key
        return dict(num_ponder_steps=k, ponder_feedback="hidden", ponder_residual=False, scale_embeddings=False)
    residual = getattr(c, "residual_interpolated_embeds", False)
    if not isinstance(residual, bool):
        raise AuthorsConfigError(f"config.json residual_interpolated_embeds {residual!r}: expected true or false")
    return dict(num_ponder_steps=k, ponder_feedback="interpolated", ponder_residual=residual,
                scale_embeddings=bool(scale))


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
