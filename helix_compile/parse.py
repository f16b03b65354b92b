"""The text forms a user types for layouts, token counts and dtypes: one parser each, shared by every command and by
the Python API that takes text (``planner.plan(context="128K", layout="kvp=2,tpa=2")``).

- Layout: ``kvp=2,tpa=2[,tpf=..,ep=..,kv_block=..,hopb_chunks=..]`` -> a dict of positive ints (``kv-block`` is
  read as ``kv_block``).
- Token counts: an integer, or with a binary suffix, K = 1024 and M = 1024 * 1024 (``128K`` = 131,072 tokens,
  ``1M`` = 1,048,576); ``Ki``/``Mi`` mean the same; a decimal count is written out (``1000000``) or as ``1e6``.
- dtypes: ``bfloat16``, ``float16``, ``float32`` (also ``bf16``, ``fp16``, ``fp32``), and for the cost model only
  ``fp8`` and ``fp4``; ``auto`` where a checkpoint's own dtype can be kept.

Errors are ValueError with one line naming the flag, the text given and the accepted forms.
"""

from __future__ import annotations

import re

LAYOUT_FIELDS = ("kvp", "tpa", "tpf", "ep", "kv_block", "hopb_chunks")
TOKEN_UNITS = "K = 1024 tokens, M = 1024*1024 (128K = 131072, 1M = 1048576); 1e6 or 1000000 for a decimal million"

_SCALE = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}

# every name a dtype flag accepts -> its canonical name
DTYPE_ALIASES = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32", "fp8": "fp8",
                 "fp4": "fp4"}
TORCH_DTYPES = ("bfloat16", "float16", "float32")  # the canonical names a model runs in


def parse_layout(text, flag: str = "layout") -> dict:
    """``'kvp=2,tpa=4[,tpf=8,ep=1,kv_block=16,hopb_chunks=2]'`` (or such a dict) -> {field: positive int}."""
    if isinstance(text, dict):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"invalid {flag} {text!r}: expected key=value pairs such as kvp=2,tpa=4")
            key, value = part.split("=", 1)
            items.append((key.strip(), value.strip()))
    out = {}
    for key, value in items:
        key = key.replace("-", "_")
        if key not in LAYOUT_FIELDS:
            raise ValueError(f"invalid {flag} key {key!r} in {text!r}: known keys are {', '.join(LAYOUT_FIELDS)}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
            raise ValueError(f"invalid {flag} value {key}={value!r}: must be a positive integer")
        out[key] = number
    if not out:
        raise ValueError(f"invalid {flag} {text!r}: give key=value pairs such as kvp=2,tpa=4")
    return out


def parse_tokens(text, flag: str | None = None) -> int:
    """A token count: ``4096``, ``128K`` (131,072), ``1M`` (1,048,576), ``1e6`` (1,000,000); at least 1.
    ``flag`` names it in the error (the command line's own errors name the flag already)."""
    where = f"{flag}: " if flag else ""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([kKmMgG][iI]?)?\s*", str(text))
        if not m:
            raise ValueError(f"{where}cannot read {str(text)!r} as a token count: use e.g. 4096, 32K or 1M "
                             f"({TOKEN_UNITS})")
        value = float(m.group(1)) * _SCALE[(m.group(2) or "").lower()]
    if value != int(value):
        raise ValueError(f"{where}{text!r} is {value:g} tokens, not a whole number")
    if value < 1:
        raise ValueError(f"{where}must be at least 1, got {text}")
    return int(value)


def parse_dtype(text, allowed=("auto",) + TORCH_DTYPES, flag: str | None = None) -> str:
    """A dtype name or alias -> its canonical name (``bf16`` -> ``bfloat16``), refused unless in ``allowed``."""
    name = DTYPE_ALIASES.get(str(text).strip().lower().removeprefix("torch."))
    if name is None or name not in allowed:
        raise ValueError(f"{flag + ' ' if flag else ''}{text!r} is not a dtype here: use one of {', '.join(allowed)} "
                         f"(aliases: {', '.join(k for k, v in DTYPE_ALIASES.items() if k != v and v in allowed)})")
    return name
