"""What the command lines share: the library's errors name fields and arguments, users know flags.

`flag_message(error, parser)` rewrites every field name in an error message that is also one of
the parser's destinations (`num_layers`, `tensor_model_parallel_size`, ...) into its flag
(`--num-layers`, ...); `renames` covers library names whose flag is spelled differently.
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, Optional


def flag_message(error: BaseException, parser: argparse.ArgumentParser,
                 renames: Optional[Dict[str, str]] = None) -> str:
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    flags.update(renames or {})
    names = sorted((n for n in flags if "_" in n or n in (renames or {})), key=len, reverse=True)
    if not names:
        return str(error)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
    return pattern.sub(lambda m: flags[m.group(1)], str(error))


