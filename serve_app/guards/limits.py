"""Bounds on what a request may carry, and where each is checked.

At the ingress (serve_app.serving.payload), before anything is forwarded: the size of the
headers and of the body (413 past `max_body_bytes`, counted as it arrives whether or not the
client declares its length), the time to send the body (408 past `max_body_seconds`), UTF-8
and JSON without `NaN`/`Infinity` literals or oversized integers, one JSON object.

In the model replica, by `check_request`, after vLLM's own request model has accepted the body
(so a body vLLM refuses gets vLLM's error, as from `vllm serve`) and before any engine work:

- on the request vLLM parsed, the values the engine will act on: `n` and `best_of`, the
  token budget vLLM uses (`max_completion_tokens`, else `max_tokens`) against the context,
  `top_logprobs` / `logprobs`, `seed`, the stop strings, the tools (count, name, size, and
  their total size), the size of a `json_schema` response format, and what vLLM expands into
  per-token work: `logit_bias`, `bad_words`, token-id lists (`stop_token_ids`,
  `allowed_token_ids`), `prompt_logprobs`, and structured-output patterns, grammars and
  schemas (`structured_outputs`, the older `guided_*`). vLLM's request model has already checked their
  types; the fake engine, which has no such model, passes its decoded body, whose fields have
  the same names;
- on the decoded JSON body, what vLLM's parsed request cannot show: the messages (vLLM
  validates content parts lazily, as a one-pass iterator that reading would empty), the JSON
  types of integer fields and token ids (vLLM turns `"2"` and `true` into numbers; OpenAI's API
  refuses them, and so do we), the completions prompts and detokenize tokens for that reason,
  and strings holding lone surrogates (`\\ud800`).

Every route that reaches an engine passes these checks, `/tokenize` and `/detokenize` included;
image parts are checked on the decoded JSON too (serve_app.guards.media).

A refusal is a 400 in OpenAI's error shape naming the offending parameter. The checks are cheap
(a walk over the messages, no schema validation) and refuse only what is certainly wrong or
over a configured bound (`RequestLimits`, serve_app.config.guards): a request that plain
`vllm serve` accepts and that stays within the bounds passes. What vLLM's models accept loosely
is accepted here too: integers written as `2.0`, content parts without `"type"` that carry a
media key (`{"image_url": ...}`), bare strings as content parts, `max_tokens: 0` with `echo` in
completions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from serve_app.config import RequestLimits
from serve_app.errors import ApiError

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Keys that make a content part without "type" valid to vLLM (it infers the type from them).
_TYPELESS_PART_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "video_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "tool_reference",
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_ROUTES = ("chat", "completion", "tokenize", "detokenize")
_SCALARS = frozenset({int, float, bool, type(None)})
# Integer fields of each route, as OpenAI's API types them (vLLM would also take "2" or true).
_INTEGER_FIELDS = {
    "chat": (
        "n",
        "best_of",
        "max_tokens",
        "max_completion_tokens",
        "top_logprobs",
        "prompt_logprobs",
        "seed",
    ),
    "completion": ("n", "best_of", "max_tokens", "logprobs", "prompt_logprobs", "seed"),
}


class InputError(ApiError):
    """A request out of bounds (400, or 413 for a body over the size limit)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(status, message, param=param)


def check_body_size(length: int, limits: RequestLimits, *, so_far: bool = False) -> None:
    """Raise InputError (413) if a body of `length` bytes (`so_far`: read so far) is over the limit."""
    if length > limits.max_body_bytes:
        size = f"over {limits.max_body_bytes} bytes" if so_far else f"{length} bytes"
        raise InputError(
            f"The request body is {size}; the limit is {limits.max_body_bytes} bytes.", status=413
        )


def check_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]],
    limits: RequestLimits,
) -> None:
    """Raise InputError (400) if the headers' names and values together are over the limit.

    `headers` is a mapping (a repeated header of a Starlette `Headers` counts each time) or
    (name, value) pairs, e.g. an ASGI scope's raw `headers` (bytes).
    """
    pairs: Iterable[tuple[str | bytes, str | bytes]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    size = 0
    for name, value in pairs:
        size += len(name) + len(value)
    if size > limits.max_header_bytes:
        raise InputError(
            f"The request headers are {size} bytes; the limit is {limits.max_header_bytes} bytes."
        )


def decode_body(body: bytes) -> Any:
    """The JSON value of a request body; InputError (400) if it is not UTF-8 JSON.

    A leading UTF-8 byte-order mark is allowed, as `json.loads` allows it on bytes.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("The request body is not valid UTF-8.") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"The request body is not valid JSON: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts (4,300)
        raise InputError("The request body holds a number too long to read.") from None
    except RecursionError:
        raise InputError("The request body is not valid JSON: it is nested too deeply.") from None


def _no_constant(name: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity` are not JSON, though Python's parser takes them."""
    raise InputError(f"The request body is not valid JSON: {name} is not a JSON number.")


def check_request(
    route: str, payload: Any, limits: RequestLimits, max_model_len: int | None, parsed: Any = None
) -> None:
    """Raise InputError if a request to `route` is out of bounds.

    `payload` is the decoded JSON body; `parsed` is what the engine's request model made of it
    (vLLM's ChatCompletionRequest, ...), the payload itself by default. `route` is "chat",
    "completion", "tokenize" or "detokenize"; `max_model_len` is the model's context length when
    known. Fields not checked here are left to the engine.
    """
    if route not in _ROUTES:
        raise ValueError(f"unknown route {route!r}")
    if not isinstance(payload, dict):
        raise InputError("The request body must be a JSON object.")
    request = payload if parsed is None else parsed
    _check_unicode(payload)
    _check_integer_types(route, payload)
    if route == "chat":
        _check_chat_numbers(payload, request, limits, max_model_len)
        _check_messages(payload, limits)
        _check_stop(request, limits)
        _check_tools(request, limits)
        _check_response_format(request, limits)
        _check_expansions(payload, request, limits)
    elif route == "completion":
        _check_completion_numbers(request, limits, max_model_len)
        _check_prompt(payload, limits)
        _check_stop(request, limits)
        _check_expansions(payload, request, limits)
    elif route == "tokenize":
        if "messages" in payload:
            _check_messages(payload, limits)
            _check_tools(request, limits)
        else:
            _check_tokenize_prompt(request, limits)
    else:
        _check_token_ids(payload.get("tokens"), "tokens")


# --- reading a request --------------------------------------------------------------------


def _get(request: Any, name: str) -> Any:
    """A field of a parsed request (a pydantic model) or of a decoded body (a dict)."""
    if isinstance(request, Mapping):
        return request.get(name)
    return getattr(request, name, None)


def _kind(value: Any) -> str:
    """How JSON would name the value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: int) -> str:
    return str(value) if value.bit_length() <= 128 else "a number too large to show"


def _json_size(value: Any, where: str) -> int:
    """Bytes of `value` as compact JSON (non-ASCII counted as UTF-8)."""
    try:
        if isinstance(value, BaseModel):
            return len(value.model_dump_json(exclude_unset=True, by_alias=True).encode("utf-8"))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)  # vLLM's StructuredOutputsParams
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8"))
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
        raise InputError(f"{where} is not valid JSON.", param=where) from None


# --- numbers --------------------------------------------------------------------------------


def _check_integer_types(route: str, payload: dict[str, Any]) -> None:
    """Integer fields must be JSON numbers with no fraction; chat's `logprobs` a boolean."""
    for name in _INTEGER_FIELDS.get(route, ()):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"`{name}` must be an integer, not {_kind(value)}.", param=name)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise InputError(f"`{name}` must be an integer, got {value}.", param=name)
    logprobs = payload.get("logprobs")
    if route == "chat" and logprobs is not None and not isinstance(logprobs, bool):
        raise InputError(
            f"`logprobs` must be true or false in a chat request, not {_kind(logprobs)}; "
            "`top_logprobs` sets how many.",
            param="logprobs",
        )


def _int(request: Any, name: str, low: int, high: int | None) -> int | None:
    """The integer field `name` (None when absent or null), checked to lie in low..high."""
    value = _get(request, name)
    if value is None:
        return None
    value = int(value)  # a number (its JSON type is checked): 2.0 counts as 2
    if value < low:
        if high is None:
            raise InputError(f"`{name}` must be at least {low}, got {_show(value)}.", param=name)
        raise InputError(f"`{name}` must be between {low} and {high}, got {_show(value)}.", param=name)
    if high is not None and value > high:
        raise InputError(f"`{name}` must be between {low} and {high}, got {_show(value)}.", param=name)
    return value


def _max_tokens(request: Any, name: str, low: int, max_model_len: int | None, *, effective: bool) -> None:
    """Check a token budget; only the `effective` one (the one vLLM reads) is held to the context."""
    value = _int(request, name, low, None)
    if value is None:
        return
    if effective and max_model_len is not None and value > max_model_len:
        raise InputError(
            f"{name} ({_show(value)}) must be at most the model's context length ({max_model_len}).",
            param=name,
        )
    if value > _INT64_MAX:
        raise InputError(f"`{name}` must be at most {_INT64_MAX}, got {_show(value)}.", param=name)


def _check_chat_numbers(
    payload: dict[str, Any], request: Any, limits: RequestLimits, max_model_len: int | None
) -> None:
    _int(request, "n", 1, limits.max_n)
    _int(payload, "best_of", 1, limits.max_n)  # not a field of vLLM's chat request
    # vLLM reads max_completion_tokens when set, and then ignores max_tokens.
    uses_completion_tokens = _get(request, "max_completion_tokens") is not None
    _max_tokens(request, "max_completion_tokens", 1, max_model_len, effective=True)
    _max_tokens(request, "max_tokens", 1, max_model_len, effective=not uses_completion_tokens)
    _int(request, "top_logprobs", 0, limits.max_top_logprobs)
    _int(request, "seed", _INT64_MIN, _INT64_MAX)


def _check_completion_numbers(request: Any, limits: RequestLimits, max_model_len: int | None) -> None:
    _int(request, "n", 1, limits.max_n)
    _int(request, "best_of", 1, limits.max_n)
    # With echo, max_tokens 0 asks for the prompt (and its logprobs) alone.
    _max_tokens(request, "max_tokens", 0 if _get(request, "echo") else 1, max_model_len, effective=True)
    _int(request, "logprobs", 0, limits.max_top_logprobs)
    _int(request, "seed", _INT64_MIN, _INT64_MAX)


# --- chat -----------------------------------------------------------------------------


def _check_messages(payload: dict[str, Any], limits: RequestLimits) -> None:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        if messages is None:
            raise InputError("`messages` is required.", param="messages")
        raise InputError(f"`messages` must be an array, not {_kind(messages)}.", param="messages")
    if not messages:
        raise InputError("`messages` must not be empty.", param="messages")
    if len(messages) > limits.max_messages:
        raise InputError(
            f"`messages` has {len(messages)} items; the limit is {limits.max_messages}.",
            param="messages",
        )
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]", limits)


def _check_message(message: Any, where: str, limits: RequestLimits) -> None:
    if not isinstance(message, dict):
        raise InputError(f"{where} must be an object, not {_kind(message)}.", param=where)
    role = message.get("role")
    if role is None:
        raise InputError(f"{where}.role is required.", param=f"{where}.role")
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role) if isinstance(role, str) else _kind(role)
        raise InputError(
            f"{where}.role must be one of {', '.join(ROLES)}; got {shown[:80]}.", param=f"{where}.role"
        )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise InputError(f"{where}.name must be a string, not {_kind(name)}.", param=f"{where}.name")
    content = message.get("content")
    if content is None:
        return
    if isinstance(content, str):
        chars = len(content)
    elif isinstance(content, list):
        chars = 0
        for j, part in enumerate(content):
            chars += _check_part(part, f"{where}.content[{j}]")
    else:
        raise InputError(
            f"{where}.content must be a string, an array of content parts or null, not {_kind(content)}.",
            param=f"{where}.content",
        )
    if chars > limits.max_message_chars:
        raise InputError(
            f"{where}.content has {chars} characters of text; the limit is {limits.max_message_chars}.",
            param=f"{where}.content",
        )


def _check_part(part: Any, where: str) -> int:
    """Check one content part; return the length of its text."""
    if isinstance(part, str):
        return len(part)  # vLLM takes a bare string as a text part
    if not isinstance(part, dict):
        raise InputError(f"{where} must be an object, not {_kind(part)}.", param=where)
    kind = part.get("type")
    if kind is None:
        if not any(key in part for key in _TYPELESS_PART_KEYS):
            raise InputError(f"{where}.type is required.", param=f"{where}.type")
    elif not isinstance(kind, str):
        raise InputError(f"{where}.type must be a string, not {_kind(kind)}.", param=f"{where}.type")
    text = part.get("text")
    return len(text) if isinstance(text, str) else 0


def _check_tools(request: Any, limits: RequestLimits) -> None:
    """Count, names and size of the tools (their structure is vLLM's request model's to check)."""
    tools = _get(request, "tools")
    if not isinstance(tools, list):
        return
    if len(tools) > limits.max_tools:
        raise InputError(f"`tools` has {len(tools)} items; the limit is {limits.max_tools}.", param="tools")
    total = 0
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        name = _get(_get(tool, "function"), "name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise InputError(
                f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes.",
                param=f"{where}.function.name",
            )
        size = _json_size(tool, where)
        if size > limits.max_tool_schema_bytes:
            raise InputError(
                f"{where} is {size} bytes of JSON; the limit is {limits.max_tool_schema_bytes} bytes.",
                param=where,
            )
        total += size
    if total > limits.max_tools_bytes:
        raise InputError(
            f"`tools` are {total} bytes of JSON together; the limit is {limits.max_tools_bytes} bytes.",
            param="tools",
        )


def _check_expansions(payload: dict[str, Any], request: Any, limits: RequestLimits) -> None:
    """What vLLM expands into per-token work or a grammar: logit biases, bad words, token-id
    lists, prompt logprobs and guided-decoding specs."""
    bias = _get(request, "logit_bias")
    if isinstance(bias, Mapping) and len(bias) > limits.max_logit_bias:
        raise InputError(
            f"`logit_bias` has {len(bias)} tokens; the limit is {limits.max_logit_bias}.", param="logit_bias"
        )
    words = _get(request, "bad_words")
    if isinstance(words, list):
        if len(words) > limits.max_stop:
            raise InputError(
                f"`bad_words` has {len(words)} items; the limit is {limits.max_stop}.", param="bad_words"
            )
        for i, word in enumerate(words):
            if isinstance(word, str) and len(word) > limits.max_stop_chars:
                raise InputError(
                    f"bad_words[{i}] has {len(word)} characters; the limit is {limits.max_stop_chars}.",
                    param=f"bad_words[{i}]",
                )
    for name in ("allowed_token_ids", "stop_token_ids", "logprob_token_ids"):
        ids = payload.get(name)
        if ids is not None:
            _check_token_ids(ids, name)
            if len(ids) > limits.max_token_ids:
                raise InputError(
                    f"`{name}` has {len(ids)} token ids; the limit is {limits.max_token_ids}.", param=name
                )
    if _get(request, "prompt_logprobs") == -1:
        raise InputError(
            "`prompt_logprobs` must be a number of log-probabilities per token, not -1 (the whole vocabulary).",
            param="prompt_logprobs",
        )
    _int(request, "prompt_logprobs", 0, limits.max_top_logprobs)
    for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        spec = _get(request, name)
        if spec is not None and (size := _json_size(spec, name)) > limits.max_structured_output_bytes:
            raise InputError(
                f"`{name}` is {size} bytes of JSON; the limit is {limits.max_structured_output_bytes} bytes.",
                param=name,
            )


def _check_response_format(request: Any, limits: RequestLimits) -> None:
    """The size of a `json_schema` response format (its shape is vLLM's request model's to check)."""
    schema = _get(_get(request, "response_format"), "json_schema")
    if schema is None:
        return
    size = _json_size(schema, "response_format.json_schema")
    if size > limits.max_response_schema_bytes:
        raise InputError(
            f"response_format.json_schema is {size} bytes of JSON; the limit is "
            f"{limits.max_response_schema_bytes} bytes.",
            param="response_format.json_schema",
        )


# --- stop, prompts, tokens ------------------------------------------------------------


def _check_stop(request: Any, limits: RequestLimits) -> None:
    """Count and length of the stop strings (their type is vLLM's request model's to check)."""
    stop = _get(request, "stop")
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list):
        if len(stop) > limits.max_stop:
            raise InputError(
                f"`stop` has {len(stop)} sequences; the limit is {limits.max_stop}.", param="stop"
            )
        stops = stop
    else:
        return
    for i, seq in enumerate(stops):
        where = "stop" if stops is not stop else f"stop[{i}]"
        if isinstance(seq, str) and len(seq) > limits.max_stop_chars:
            raise InputError(
                f"{where} has {len(seq)} characters; the limit is {limits.max_stop_chars}.", param=where
            )


def _check_prompt(payload: dict[str, Any], limits: RequestLimits) -> None:
    """Count and size of the completions prompts, and their token ids as JSON integers (vLLM's
    request model turns `true` into 1); their shape is vLLM's request model's to check."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        _check_prompt_text(prompt, "prompt", limits)
        return
    if not isinstance(prompt, list) or not prompt:
        return  # vLLM takes prompt_embeds instead, or says that a prompt is required
    if not isinstance(prompt[0], (str, list)):
        _check_token_ids(prompt, "prompt")  # one prompt, as token ids: as long as the body allows
        return
    if len(prompt) > limits.max_prompt_items:
        raise InputError(
            f"`prompt` has {len(prompt)} prompts; the limit is {limits.max_prompt_items}.", param="prompt"
        )
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            _check_prompt_text(item, f"prompt[{i}]", limits)
        else:
            _check_token_ids(item, f"prompt[{i}]")


def _check_tokenize_prompt(request: Any, limits: RequestLimits) -> None:
    prompt = _get(request, "prompt")
    if not isinstance(prompt, str):
        raise InputError(
            f"`prompt` (a string) or `messages` is required, got prompt {_kind(prompt)}.", param="prompt"
        )
    _check_prompt_text(prompt, "prompt", limits)


def _check_prompt_text(text: str, where: str, limits: RequestLimits) -> None:
    if len(text) > limits.max_message_chars:
        raise InputError(
            f"{where} has {len(text)} characters; the limit is {limits.max_message_chars}.", param=where
        )


def _is_token_id(value: Any) -> bool:
    if type(value) is int:
        return 0 <= value <= _INT64_MAX
    return isinstance(value, float) and value.is_integer() and 0 <= value <= _INT64_MAX


def _check_token_ids(tokens: Any, where: str) -> None:
    if not isinstance(tokens, list):
        raise InputError(f"{where} must be an array of token ids, not {_kind(tokens)}.", param=where)
    if not tokens or (set(map(type, tokens)) == {int} and min(tokens) >= 0 and max(tokens) <= _INT64_MAX):
        return  # the usual case, checked without a Python loop
    for i, token in enumerate(tokens):
        if not _is_token_id(token):
            shown = _show(token) if type(token) is int else _kind(token)
            raise InputError(
                f"{where}[{i}] must be a token id (an integer, at least 0), got {shown}.",
                param=f"{where}[{i}]",
            )


# --- unicode --------------------------------------------------------------------------


def _check_unicode(payload: dict[str, Any]) -> None:
    """Refuse strings (keys included) holding lone surrogates, as JSON's \\ud800 decodes."""
    search = _SURROGATE.search
    stack: list[Any] = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and not key.isascii() and search(key):
                    _raise_unicode(payload)
                if isinstance(value, str):
                    if not value.isascii() and search(value):
                        _raise_unicode(payload)
                elif value and isinstance(value, (dict, list)):
                    stack.append(value)
        elif not _SCALARS.issuperset(map(type, node)):  # e.g. token ids: no strings, nothing nested
            for value in node:
                if isinstance(value, str):
                    if not value.isascii() and search(value):
                        _raise_unicode(payload)
                elif value and isinstance(value, (dict, list)):
                    stack.append(value)


def _raise_unicode(payload: dict[str, Any]) -> None:
    """Find a string with a lone surrogate (the slow walk, with paths) and refuse it."""
    stack: list[tuple[Any, str]] = [(payload, "")]
    while stack:
        node, path = stack.pop()
        items: Iterable[tuple[Any, Any]]
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, value in items:
            where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
            if (isinstance(key, str) and _SURROGATE.search(key)) or (
                isinstance(value, str) and _SURROGATE.search(value)
            ):
                raise InputError(
                    "The request contains invalid Unicode (a lone surrogate such as \\ud800).",
                    param=where.encode("utf-8", "backslashreplace").decode("utf-8"),
                )
            stack.append((value, where))
    raise InputError("The request contains invalid Unicode (a lone surrogate such as \\ud800).")
