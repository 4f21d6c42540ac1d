"""Write tiny LoRA adapters, in PEFT's format, for the demo models (`make models`).

Each adapter is what PEFT's `save_pretrained` writes for a LoRA of a Mistral-architecture model:
`adapter_config.json` and `adapter_model.safetensors`, its tensors named as PEFT names them
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...). Its weights are random
(seeded by the adapter's name), large enough that each adapter's greedy answers differ from the
base model's and from each other's. vLLM loads them as it loads any PEFT adapter
(`--enable-lora --lora-modules name=path`).

Usage: python -m serve_app.models.adapters [MODELS_DIR]   (default: ./models)
       python -m serve_app.models.adapters OUT_DIR --base-model DIR [--count 8] [--rank 16]
           (adapters of the same form for any local base model, e.g. a GPU benchmark's)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from serve_app.models import demo
from serve_app.models.shapes import ModelShapes, model_shapes

ADAPTERS_DIR = "adapters"  # under the models directory: models/adapters/<name>
RANK = 8
ALPHA = 16
# The PEFT names of the modules each decoder layer adapts (its attention and MLP).
_MODULES: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MODULES += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEMO_SHAPES = ModelShapes(
    layers=demo.N_LAYERS,
    hidden=demo.DIM,
    q_out=demo.N_HEADS * demo.HEAD_DIM,
    kv_out=demo.N_KV_HEADS * demo.HEAD_DIM,
    intermediate=demo.HIDDEN_DIM,
)


@dataclass(frozen=True)
class DemoAdapter:
    """One demo adapter: its name, the demo model it adapts, its rank."""

    name: str
    base: str  # a DEMO_MODELS name
    rank: int = RANK


# Eight adapters of tiny-mistral-v3 (the routing and eviction benchmark serves them all with
# max_loras 2), one of tiny-mistral-tekken.
DEMO_ADAPTERS = (
    *(DemoAdapter(f"tiny-mistral-v3-lora-{i}", "tiny-mistral-v3") for i in range(8)),
    DemoAdapter("tiny-mistral-tekken-lora-0", "tiny-mistral-tekken"),
)


def adapter_config(adapter: DemoAdapter) -> dict[str, object]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base,
        "r": adapter.rank,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(m.rsplit(".", 1)[1] for m in _MODULES),
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def _weights(adapter: DemoAdapter, shapes: ModelShapes) -> dict[str, object]:
    import torch

    seed = int.from_bytes(hashlib.sha256(adapter.name.encode()).digest()[:4], "big")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, object] = {}
    for layer in range(shapes.layers):
        for module in _MODULES:
            sizes = shapes.module(module.rsplit(".", 1)[1])
            assert sizes is not None
            fan_in, fan_out = sizes
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            # B is not zero (PEFT's initial value): the adapter must change the answers.
            a = torch.randn(adapter.rank, fan_in, generator=gen) / fan_in**0.5
            b = torch.randn(fan_out, adapter.rank, generator=gen) * 0.5
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    return tensors


def write_adapter(adapter: DemoAdapter, out_dir: Path, shapes: ModelShapes = DEMO_SHAPES) -> Path:
    """Write one adapter of a model of `shapes` to `out_dir/<name>`; skip when it is already complete."""
    from safetensors.torch import save_file

    target = out_dir / adapter.name
    config = adapter_config(adapter)
    config_file = target / "adapter_config.json"
    if (
        config_file.is_file()
        and (target / "adapter_model.safetensors").is_file()
        and json.loads(config_file.read_text()) == config
    ):
        print(f"  {target}: up to date")
        return target
    with demo.staged(target) as tmp:
        save_file(_weights(adapter, shapes), str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"  {target}: written (LoRA rank {adapter.rank} of {adapter.base})")
    return target


def write_all(models_dir: Path) -> list[Path]:
    return [write_adapter(a, models_dir / ADAPTERS_DIR) for a in DEMO_ADAPTERS]


def write_for(base: Path, out_dir: Path, count: int, rank: int) -> list[Path]:
    """`count` adapters of rank `rank` for the local model at `base` (its params.json or
    config.json gives the shapes), named `<base dir name>-lora-<i>`."""
    shapes = model_shapes(str(base.resolve()))
    if shapes is None:
        raise SystemExit(f"{base}: no params.json or config.json with the model's sizes")
    adapters = [
        DemoAdapter(f"{base.resolve().name}-lora-{i}", base.resolve().name, rank) for i in range(count)
    ]
    return [write_adapter(a, out_dir, shapes) for a in adapters]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", nargs="?", default="models", type=Path)
    parser.add_argument("--base-model", type=Path, help="adapters of this local model, not the demo models'")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.base_model is not None:
        print(
            f"Writing {args.count} LoRA adapters of {args.base_model} to {args.out_dir}/ (rank {args.rank})"
        )
        write_for(args.base_model, args.out_dir, args.count, args.rank)
        return 0
    print(f"Writing demo LoRA adapters to {args.out_dir / ADAPTERS_DIR}/ (PEFT format, random weights)")
    write_all(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
