"""Value checks of LoraConfig fields that need more than a line: regex pattern keys and trainable token ids.

A config layer module (it imports nothing of peftlite's): config.py calls these
from `LoraConfig._validate`, so every way of making a config checks alike.
"""

from __future__ import annotations

import re
import re._constants as _sre  # the regex parser's node types, to refuse nested repeats
import re._parser as _sre_parse
from typing import Any

PLAIN_KEY = re.compile(r"[\w.-]+")


def pattern_regex(key: str) -> str:
    """PEFT's reading of a pattern key: the key matches the whole path or a dotted suffix of it."""
    return rf"(?:.*\.)?(?:{key})$"


def nested_repeat(items: Any, inside_repeat: bool = False) -> bool:
    """Whether a parsed regex repeats something that itself repeats: the shape that backtracks exponentially."""
    for op, arg in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            if inside_repeat or nested_repeat(arg[2], inside_repeat=arg[1] > 1):
                return True
        elif op in (_sre.SUBPATTERN, _sre.ATOMIC_GROUP):
            if nested_repeat(arg[-1], inside_repeat):
                return True
        elif op == _sre.BRANCH and any(nested_repeat(branch, inside_repeat) for branch in arg[1]):
            return True
    return False


def check_pattern_key(field_name: str, key: object) -> None:
    """A rank/alpha pattern key: a module name or dotted suffix, or a regex PEFT-style.

    PEFT matches keys as `(.*\\.)?(key)$` regexes. Plain names match by suffix
    without a regex engine; a regex with a repeat inside a repeat ("(.+)+Z") is
    refused, since matching it against a long module path can take minutes.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"{field_name} key {key!r} is invalid: expected a module name or dotted path suffix")
    if PLAIN_KEY.fullmatch(key):
        return
    try:
        re.compile(pattern_regex(key))  # the form it is matched in: an inline flag must come first there too
        parsed = _sre_parse.parse(key)
    except re.error as err:
        raise ValueError(f"{field_name} key {key!r} is not a valid regex: {err}") from None
    if nested_repeat(parsed.data):
        raise ValueError(f"{field_name} key {key!r} repeats a repeated group, which can take exponential time "
                         "to match: expected a module name or a regex without nested repeats")


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def check_token_indices(value: object) -> None:
    """trainable_token_indices: None, a list of token ids (rows of the input embedding), or
    {module name: list of token ids}, as PEFT takes it.

    Ids must be ints >= 0; whether they are below the embedding's row count is checked
    against the model when the adapter is added (tuner/tokens.py).
    """
    if value is None or _is_token_list(value):
        return
    if isinstance(value, dict):
        for name, ids in value.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"trainable_token_indices key {name!r} is invalid: expected a module name "
                                 "such as 'embed_tokens'")
            if not _is_token_list(ids):
                raise ValueError(f"trainable_token_indices[{name!r}]={ids!r} is invalid: expected a list of "
                                 "token ids (ints >= 0)")
        return
    raise ValueError(f"trainable_token_indices={value!r} is invalid: expected None, a list of token ids "
                     "(ints >= 0) or a dict of module name -> list of token ids")
