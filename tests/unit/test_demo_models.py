"""The demo model writer produces Mistral's native layout with a real Mistral tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from serve_app.models.demo import DEMO_MODELS, N_LAYERS, write_all


def test_writes_mistral_native_layout(tmp_path: Path) -> None:
    paths = write_all(tmp_path)
    assert [p.name for p in paths] == [m.name for m in DEMO_MODELS]
    for model, path in zip(DEMO_MODELS, paths, strict=True):
        params = json.loads((path / "params.json").read_text())
        assert params["vocab_size"] == model.vocab_size
        assert params["n_layers"] == N_LAYERS
        assert (path / model.tokenizer_name).stat().st_size > 100_000
        assert not (path / "config.json").exists()
        with safe_open(str(path / "consolidated.safetensors"), "pt") as f:
            names = set(f.keys())
            assert f.get_tensor("tok_embeddings.weight").shape == (model.vocab_size, params["dim"])
        assert {"tok_embeddings.weight", "norm.weight", "output.weight"} <= names
        assert f"layers.{N_LAYERS - 1}.attention.wq.weight" in names
        assert f"layers.{N_LAYERS - 1}.feed_forward.w2.weight" in names


def test_tokenizers_are_the_real_ones(tmp_path: Path) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    for model, path in zip(DEMO_MODELS, write_all(tmp_path), strict=True):
        tok = MistralTokenizer.from_file(str(path / model.tokenizer_name))
        ids = tok.instruct_tokenizer.tokenizer.encode("Bonjour", bos=True, eos=False)
        assert len(ids) >= 2 and max(ids) < model.vocab_size


def test_rewrite_is_skipped_when_complete(tmp_path: Path) -> None:
    first = write_all(tmp_path)
    mtime = (first[0] / "consolidated.safetensors").stat().st_mtime_ns
    write_all(tmp_path)
    assert (first[0] / "consolidated.safetensors").stat().st_mtime_ns == mtime
    (first[0] / "params.json").write_text("{}")
    write_all(tmp_path)
    assert json.loads((first[0] / "params.json").read_text())["vocab_size"] == DEMO_MODELS[0].vocab_size
