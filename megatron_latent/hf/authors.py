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
training range is neither their family range nor the fixed J. Exports before this wrote
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


def latent_from_hf(c, arch: str) -> Dict:
    """LatentSettings field values (for ModelConfig.replace) of an HF config's latent keys."""
    ours = hasattr(c, "latent_prefill")
    n = getattr(c, "num_latent_thoughts", 0) or 0
    scale = getattr(c, "scale_embeds", False)
    for key in ("scale_embeds", "interpolation", "recurrent_model"):
        v = getattr(c, key, None)
        if v is not None and not isinstance(v, bool):
            raise AuthorsConfigError(f"config.json {key} {v!r}: expected true or false")
    if not isinstance(n, int) or n < 0:
        raise AuthorsConfigError(f"config.json num_latent_thoughts {n!r}: expected an integer >= 0")
    if not (n or scale):
        return {}  # vanilla: their other keys do not change the forward
    for key, method in _OTHER_METHOD_KEYS.items():
        if getattr(c, key, None) is not None:
            raise AuthorsConfigError(f"config.json {key}: a {method} model, not PonderLM-2; not supported")
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
    out = dict(num_latent_thoughts=n, jacobi_iters_eval=j_eval, scale_embeddings=bool(scale))
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
             scale_embeds=bool(lat.scale_embeddings), interpolation=False, recurrent_model=True)
    if n:
        j = tuple(lat.jacobi_iters)
        if j == _family_range(cfg.arch):
            d["random_jacobi_iterations"] = True
        elif j != (j_eval, j_eval):
            d["random_jacobi_iterations"] = j[0] != j[1]
            d[OUR_RANGE_KEY] = list(j)
    return d
