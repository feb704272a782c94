"""Model aliases: ``tiny`` builds once into rltk's cache and loads like any model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rltk.models import DEFAULT_MODEL, TINY_MODEL, load_model, load_tokenizer, resolve


def test_the_tiny_alias_is_built_once_and_loads_with_a_chat_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = Path(resolve(DEFAULT_MODEL))  # the tokenizer's source, converted once for the whole suite
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / default.name).symlink_to(default)
    monkeypatch.setenv("RLTK_CACHE", str(tmp_path))
    path = Path(resolve(TINY_MODEL))
    assert path.parent == tmp_path / "models" and (path / "rltk_source.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve(TINY_MODEL) == str(path) and (path / "model.safetensors").stat().st_mtime_ns == stamp
    model, tokenizer = load_model(TINY_MODEL), load_tokenizer(TINY_MODEL)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template
    again = load_model(str(path))  # seeded: the same weights wherever it is built
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
