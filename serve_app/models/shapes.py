"""The layer sizes of a Mistral-architecture checkpoint, read from its `params.json` (Mistral's
layout) or `config.json` (Hugging Face's): what a LoRA adapter's weights must match."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serve_app.config.model import is_local_source


@dataclass(frozen=True)
class ModelShapes:
    """The layer sizes of a Mistral-architecture base model that a LoRA's weights must match."""

    layers: int
    hidden: int
    q_out: int  # heads x head_dim
    kv_out: int  # kv heads x head_dim
    intermediate: int

    def module(self, name: str) -> tuple[int, int] | None:
        """(in features, out features) of a LoRA target module, None if not known here."""
        table = {
            "q_proj": (self.hidden, self.q_out),
            "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out),
            "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        return table.get(name)


def model_shapes(model_source: str) -> ModelShapes | None:
    """The base model's layer sizes, from its local `params.json` (Mistral's layout) or
    `config.json`; None where the source is not local or says too little (then vLLM checks)."""
    if not is_local_source(model_source):
        return None
    root = Path(model_source).expanduser()
    try:
        if (root / "params.json").is_file():
            p = json.loads((root / "params.json").read_text())
            head_dim = int(p.get("head_dim") or p["dim"] // p["n_heads"])
            return ModelShapes(
                int(p["n_layers"]),
                int(p["dim"]),
                int(p["n_heads"]) * head_dim,
                int(p.get("n_kv_heads", p["n_heads"])) * head_dim,
                int(p["hidden_dim"]),
            )
        if (root / "config.json").is_file():
            c = json.loads((root / "config.json").read_text())
            c = c.get("text_config", c)
            heads = int(c["num_attention_heads"])
            head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
            return ModelShapes(
                int(c["num_hidden_layers"]),
                int(c["hidden_size"]),
                heads * head_dim,
                int(c.get("num_key_value_heads", heads)) * head_dim,
                int(c["intermediate_size"]),
            )
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    return None
