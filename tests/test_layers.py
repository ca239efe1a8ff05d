"""The package is layered: a module imports only from its own unit or from lower layers.

Every import counts, also those inside functions (which is where cycles hide). Read from the
source with `ast`, nothing is imported.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_latent")

# Lowest first. A unit is a subpackage or a top-level module of megatron_latent.
LAYERS = [
    {"__init__", "platform", "compat", "cli"},  # the device and megatron-core adaptations; flag names
    {"config"},  # dataclasses: model, latent settings, layout, presets
    {"models", "data", "checkpoint_layout"},  # the network; tokens on disk; what a checkpoint holds
    {"parallel"},  # process groups, the latent pipeline
    {"training"},  # steps, the loop, checkpoints
    {"inference"},  # decoding, and loading a checkpoint into one process
    {"hf"},  # Hugging Face conversion and export
    {"analysis"},  # comparing finished runs, checking exports (for command lines only)
    {"pretrain", "generate", "tools"},  # command lines
]
_LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules():
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                yield rel, path


def _unit(parts):
    return parts[0] if parts else "__init__"


def _imports(parts, path):
    tree = ast.parse(open(path).read(), path)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["megatron_latent"] + package[: len(package) - (node.level - 1)]
                mod = base + (node.module.split(".") if node.module else [])
            else:
                mod = (node.module or "").split(".")
            if len(mod) == 1:  # from megatron_latent import platform, ...
                for a in node.names:
                    yield node.lineno, mod + [a.name]
            else:
                yield node.lineno, mod


def test_every_unit_has_a_layer():
    units = {_unit(parts) for parts, _ in _modules()}
    assert units <= set(_LAYER), f"put these in LAYERS: {sorted(units - set(_LAYER))}"


def test_no_module_imports_a_higher_layer_or_a_sibling_unit():
    bad = []
    for parts, path in _modules():
        unit = _unit(parts)
        for line, mod in _imports(parts, path):
            if mod[0] != "megatron_latent" or len(mod) == 1:
                continue  # other packages; `import megatron_latent` itself (the package's __init__)
            target = mod[1]
            if target == unit or target not in _LAYER:
                continue
            if _LAYER[target] >= _LAYER[unit]:
                bad.append(f"megatron_latent/{'/'.join(parts)}.py:{line} ({unit}, layer {_LAYER[unit]}) imports "
                           f"{'.'.join(mod)} ({target}, layer {_LAYER[target]})")
    assert not bad, "\n".join(bad)
