"""What the command lines share: the library's errors name fields and arguments, users know flags.

The library's messages name what they are about by its Python name, the argument or field a
caller passes: `load_dir /x: ...`, `tensor_model_parallel_size 3 does not divide ...`, and a switch
as the setting to pass, `pass finetune=True`. Only a command line turns those names into flags:
`flag_message(error, parser, renames)` rewrites, as whole words,

- each parser destination that contains "_" (`num_layers` -> `--num-layers`);
- `dest=True` of a store_true flag and `dest=False` of a store_false one (`finetune=True` ->
  `--finetune`), and `dest=VALUE` of a flag that takes a value (`iteration=5` -> `--iteration 5`);
- each name of `renames` (the library's names whose flag is spelled differently, e.g.
  `load_dir` -> `--load`), where the parser has every flag the replacement names; one table serves
  every command line that way.

A plain word (`split`, `load`, `iteration`) is never rewritten alone, so the library names such an
argument with its value, `iteration=5`, or by a name that is unambiguous (`load_dir`, `save_dir`,
`DataArgs.split` in `renames`).
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, Optional

_FLAG = re.compile(r"--[A-Za-z][\w-]*")


def flag_message(error: BaseException, parser: argparse.ArgumentParser,
                 renames: Optional[Dict[str, str]] = None) -> str:
    options = {o for a in parser._actions for o in a.option_strings}
    flags = {}
    for a in parser._actions:
        if not a.option_strings:
            continue
        flag = max(a.option_strings, key=len)
        if "_" in a.dest:
            flags[a.dest] = flag
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            flags[f"{a.dest}={isinstance(a, argparse._StoreTrueAction)}"] = flag
        elif a.nargs != 0:
            flags[f"{a.dest}="] = flag + " "  # followed by the value
    flags.update({name: flag for name, flag in (renames or {}).items()
                  if all(f in options for f in _FLAG.findall(flag))})
    if not flags:
        return str(error)
    names = "|".join(re.escape(n) + ("" if n.endswith("=") else r"(?![\w-])")
                     for n in sorted(flags, key=len, reverse=True))
    return re.sub(r"(?<![\w-])(?:" + names + ")", lambda m: flags[m.group(0)], str(error))
