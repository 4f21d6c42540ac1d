"""Write the tiny demo models that `configs/local.yaml` serves.

Each demo model is a Mistral-architecture transformer with random weights, saved in
Mistral's native layout (`params.json` + `consolidated.safetensors`) beside a real
Mistral tokenizer shipped inside the `mistral_common` package. vLLM loads it with
`tokenizer_mode`, `config_format` and `load_format` set to `mistral`, exactly as it
loads Mistral's published checkpoints. Its text is random; every layer of the
serving stack is real.

Usage: python -m serve_app.models.demo [OUTPUT_DIR]   (default: ./models)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mistral_common


@dataclass(frozen=True)
class DemoModel:
    """One demo model: where it goes and which real tokenizer it carries."""

    name: str
    tokenizer_file: str  # file name inside mistral_common/data
    tokenizer_name: str  # the name vLLM looks for in a Mistral-layout directory
    vocab_size: int
    vision: bool = False  # a Pixtral-architecture vision encoder + adapter


DEMO_MODELS = (
    # The Mistral 7B v0.3 family: SentencePiece v3 tokenizer, 32768 tokens.
    DemoModel(
        "tiny-mistral-v3",
        "mistral_instruct_tokenizer_240323.model.v3",
        "tokenizer.model.v3",
        32768,
    ),
    # The Mistral Large 2411 family: SentencePiece v7 tokenizer, 32768 tokens. Its system
    # prompt keeps its place at the head of the conversation (v3 moves it to the last user
    # message), so each turn's prompt starts with the one before: the cache-aware routing
    # benchmark (serve_app.tools.bench.turns) serves it. Not served by configs/local.yaml.
    DemoModel(
        "tiny-mistral-v7",
        "mistral_instruct_tokenizer_241114.model.v7",
        "tokenizer.model.v7",
        32768,
    ),
    # The Mistral NeMo family: Tekken tokenizer, 131072 tokens.
    DemoModel("tiny-mistral-tekken", "tekken_240718.json", "tekken.json", 131072),
    # The Pixtral family: Pixtral-12B-2409's Tekken (with its image settings) and a tiny
    # vision encoder. Not served by configs/local.yaml; tests use it for the image path.
    DemoModel("tiny-pixtral", "tekken_240911.json", "tekken.json", 131072, vision=True),
)

# Small enough to load in seconds on two CPU cores, big enough to exercise every layer type.
DIM = 128
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = DIM // N_HEADS
HIDDEN_DIM = 256
MAX_SEQ_LEN = 4096
SEED = 0
# Vision encoder of the Pixtral demo (Pixtral-12B: hidden 1024, 24 layers, 16 heads).
V_HIDDEN = 64
V_LAYERS = 2
V_HEADS = 2  # head_dim 32: 2D RoPE needs it even
V_FFN = 128


def _vision_params(model: DemoModel) -> dict[str, object]:
    image = json.loads(tokenizer_source(model).read_text())["image"]
    return {
        "hidden_size": V_HIDDEN,
        "num_channels": 3,
        # vLLM sizes its 2D-RoPE table by image_size / patch_size patches per side, and the
        # tokenizer lets images up to max_image_size through: they must agree.
        "image_size": image["max_image_size"],
        "patch_size": image["image_patch_size"],
        "rope_theta": 10000.0,
        "intermediate_size": V_FFN,
        "num_hidden_layers": V_LAYERS,
        "num_attention_heads": V_HEADS,
        "image_token_id": 10,
        "image_break_token_id": 12,
        "image_end_token_id": 13,
        "adapter_bias": True,
    }


def _params(model: DemoModel) -> dict[str, object]:
    params = _text_params(model.vocab_size)
    if model.vision:
        params["vision_encoder"] = _vision_params(model)
    return params


def _text_params(vocab_size: int) -> dict[str, object]:
    return {
        "dim": DIM,
        "n_layers": N_LAYERS,
        "head_dim": HEAD_DIM,
        "hidden_dim": HIDDEN_DIM,
        "n_heads": N_HEADS,
        "n_kv_heads": N_KV_HEADS,
        "norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 1_000_000.0,
        "max_seq_len": MAX_SEQ_LEN,
        # Without it, vLLM 0.32 looks for a Hugging Face config.json to read the context length
        # from, retrying every 2 s, 11 times per engine start: 62 s to start a demo engine,
        # against 38 s with it (measured on 2 cores).
        "max_position_embeddings": MAX_SEQ_LEN,
    }


def _weights(model: DemoModel, patch: int = 16) -> dict[str, object]:
    """Random weights under Mistral's own tensor names (what `load_format=mistral` reads)."""
    vocab_size = model.vocab_size
    import torch

    gen = torch.Generator().manual_seed(SEED)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    tensors: dict[str, object] = {
        "tok_embeddings.weight": rand(vocab_size, DIM),
        "norm.weight": ones(DIM),
        "output.weight": rand(vocab_size, DIM),
    }
    kv_dim = N_KV_HEADS * HEAD_DIM
    for i in range(N_LAYERS):
        p = f"layers.{i}"
        tensors[f"{p}.attention.wq.weight"] = rand(N_HEADS * HEAD_DIM, DIM)
        tensors[f"{p}.attention.wk.weight"] = rand(kv_dim, DIM)
        tensors[f"{p}.attention.wv.weight"] = rand(kv_dim, DIM)
        tensors[f"{p}.attention.wo.weight"] = rand(DIM, N_HEADS * HEAD_DIM)
        tensors[f"{p}.feed_forward.w1.weight"] = rand(HIDDEN_DIM, DIM)
        tensors[f"{p}.feed_forward.w2.weight"] = rand(DIM, HIDDEN_DIM)
        tensors[f"{p}.feed_forward.w3.weight"] = rand(HIDDEN_DIM, DIM)
        tensors[f"{p}.attention_norm.weight"] = ones(DIM)
        tensors[f"{p}.ffn_norm.weight"] = ones(DIM)
    if model.vision:
        # Pixtral's vision tower (no biases) and its GELU adapter into the text model.
        tensors["vision_encoder.patch_conv.weight"] = rand(V_HIDDEN, 3, patch, patch)
        tensors["vision_encoder.ln_pre.weight"] = ones(V_HIDDEN)
        for i in range(V_LAYERS):
            p = f"vision_encoder.transformer.layers.{i}"
            for w in ("wq", "wk", "wv", "wo"):
                tensors[f"{p}.attention.{w}.weight"] = rand(V_HIDDEN, V_HIDDEN)
            tensors[f"{p}.feed_forward.w1.weight"] = rand(V_FFN, V_HIDDEN)
            tensors[f"{p}.feed_forward.w2.weight"] = rand(V_HIDDEN, V_FFN)
            tensors[f"{p}.feed_forward.w3.weight"] = rand(V_FFN, V_HIDDEN)
            tensors[f"{p}.attention_norm.weight"] = ones(V_HIDDEN)
            tensors[f"{p}.ffn_norm.weight"] = ones(V_HIDDEN)
        tensors["vision_language_adapter.w_in.weight"] = rand(DIM, V_HIDDEN)
        tensors["vision_language_adapter.w_in.bias"] = torch.zeros(DIM, dtype=torch.bfloat16)
        tensors["vision_language_adapter.w_out.weight"] = rand(DIM, DIM)
        tensors["vision_language_adapter.w_out.bias"] = torch.zeros(DIM, dtype=torch.bfloat16)
    return tensors


def tokenizer_source(model: DemoModel) -> Path:
    path = Path(mistral_common.__file__).parent / "data" / model.tokenizer_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this mistral_common release does not ship the "
            f"{model.tokenizer_file} tokenizer"
        )
    return path


def write_model(model: DemoModel, out_dir: Path) -> Path:
    """Write one demo model to `out_dir/model.name`; skip when it is already complete."""
    from safetensors.torch import save_file

    target = out_dir / model.name
    params = _params(model)
    params_file = target / "params.json"
    done = (
        params_file.is_file()
        and (target / "consolidated.safetensors").is_file()
        and (target / model.tokenizer_name).is_file()
        and json.loads(params_file.read_text()) == params
    )
    if done:
        print(f"  {target}: up to date")
        return target
    with staged(target) as tmp:
        save_file(_weights(model), str(tmp / "consolidated.safetensors"))
        shutil.copyfile(tokenizer_source(model), tmp / model.tokenizer_name)
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    print(f"  {target}: written ({model.tokenizer_name}, vocab {model.vocab_size})")
    return target


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target` to write into, renamed to `target` once the block has
    run: an interrupted run leaves no half model."""
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def write_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_model(m, out_dir) for m in DEMO_MODELS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", nargs="?", default="models", type=Path)
    args = parser.parse_args(argv)
    print(f"Writing demo models to {args.out_dir}/ (random weights, real Mistral tokenizers)")
    write_all(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
