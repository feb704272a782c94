"""Stage "gguf": an rltk export (plain HF directory) → one GGUF file for llama.cpp, verified under llama.cpp.

    export dir ──llama.cpp's convert_hf_to_gguf.py (subprocess, its own gguf-py)──▶ converted.gguf
        ──tokenizer.ggml.* from the source GGUF, tied head checked──▶ out.gguf ──checks──▶ write_gguf returns
    out.gguf ──rltk.llamacpp_sampler.verify_gguf: played under llama.cpp against the safetensors

Conversion is llama.cpp's own converter, never a re-implementation: ``bash scripts/setup_gguf.sh`` unpacks it
(with its vendored ``gguf-py``, put first on the subprocess's ``PYTHONPATH``, whatever ``gguf`` rltk's venv
has) from the llama-cpp-python source distribution into ``cache_dir()/llama.cpp-<version>``, or the caller
names a ``convert_hf_to_gguf.py`` of a llama.cpp checkout. Nothing downloads at run time.

Tokenizer metadata. rltk's tokenizer for the embedded model was rebuilt by transformers from the embedded
Q4_1 GGUF (the *source*): its ids are the source's ids, and the model was trained on them. The converter
re-derives the ``tokenizer.ggml.*`` keys from the export's ``tokenizer.json`` (token types from the added
tokens, the pre-tokenizer name from a hash of the tokenizer's output on a probe text, special ids from the
config). For SmolLM2 it reproduces every key but one (``add_space_prefix``, False in the source, absent after
conversion), but a derivation can drift with a converter version. So the keys are *copied* from the source
with gguf-py's reader and writer, then *checked* on the written file: copying makes the output's tokenizer
the one the model was trained with whatever the converter guessed, and the check proves it on the bytes
that ship. Copying is only safe over the same vocabulary: where the converted tokens or merges (which fix
what each id means) differ from the source's, :func:`write_gguf` refuses instead of copying.

Tied embeddings. SmolLM2 ties its output head to the input embeddings; a tied export has no
``lm_head.weight`` and the GGUF no ``output.weight`` (llama.cpp then reads ``token_embd``). An export whose
``lm_head.weight`` differs from its embeddings (a LoRA on ``lm_head`` merged, for one) is refused unless the
caller unties explicitly (``untie=True``); one whose head merely repeats the embeddings is written tied.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from rltk.models import DEFAULT_MODEL, EMBEDDED, ModelError, cache_dir, find_gguf

if TYPE_CHECKING:
    from gguf import GGUFReader


LLAMA_CPP_VERSION = "0.3.36"
OUTTYPES = ("f32", "f16", "q8_0")
SETUP_COMMAND = "bash scripts/setup_gguf.sh"
IM_END = "<|im_end|>"
TOKENIZER_PREFIX = "tokenizer.ggml."
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")  # what each id means: never overwritten
END_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")


class GgufError(RuntimeError):
    """A GGUF could not be written, did not check out, or its tools are missing; the message names the fix."""


def llama_cpp_dir() -> Path:
    """Where ``scripts/setup_gguf.sh`` unpacks llama.cpp's converter: ``cache_dir()/llama.cpp-<version>``."""
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}"


def find_converter(converter: Path | None = None) -> Path:
    """``convert_hf_to_gguf.py``: ``converter`` if given, else the one the setup script unpacked.

    Raises:
        GgufError: It is missing, or has no ``gguf-py`` beside it (the layout of a llama.cpp checkout).

    """
    path = Path(converter) if converter is not None else llama_cpp_dir() / "convert_hf_to_gguf.py"
    if not path.is_file():
        how = (
            f"pass the convert_hf_to_gguf.py of a llama.cpp checkout, or run {SETUP_COMMAND}"
            if converter is not None
            else f"run {SETUP_COMMAND} (it unpacks llama.cpp {LLAMA_CPP_VERSION}'s converter there)"
        )
        raise GgufError(f"llama.cpp's converter is not at {path}: {how}")
    if not (path.parent / "gguf-py" / "gguf").is_dir():
        raise GgufError(
            f"{path.parent} has no gguf-py/ beside convert_hf_to_gguf.py: pass the converter of a complete "
            f"llama.cpp checkout, or run {SETUP_COMMAND}"
        )
    return path


def require_llama_cpp() -> ModuleType:
    """Import ``llama_cpp`` (llama-cpp-python), or raise :class:`GgufError` naming the setup command."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GgufError(
            f"the Python package llama_cpp (llama-cpp-python=={LLAMA_CPP_VERSION}) is not installed in "
            f"{sys.prefix}: run {SETUP_COMMAND} (it compiles it from source, about 4 minutes on 2 cores)"
        ) from exc
    return llama_cpp


def _require_sentencepiece() -> None:
    """The converter imports sentencepiece while it probes the tokenizer; say so before it fails inside."""
    if importlib.util.find_spec("sentencepiece") is None:
        raise GgufError(
            f"llama.cpp's converter needs the Python package sentencepiece, not installed in {sys.prefix}: "
            f"run {SETUP_COMMAND} (or pip install 'sentencepiece>=0.1.98,<0.3.0')"
        )


def _fields(reader: GGUFReader, prefix: str) -> dict[str, Any]:
    """``{key: value}`` of the reader's metadata keys that start with ``prefix`` (as Python values)."""
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


def _chat_template(export_dir: Path) -> str | None:
    """The export's chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s), if any."""
    jinja = export_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = export_dir / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def head_state(export_dir: Path) -> str:
    """``"tied"`` (no ``lm_head.weight``), ``"duplicate"`` (it equals the embeddings) or ``"untied"``."""
    from safetensors import safe_open

    files = sorted(export_dir.glob("*.safetensors"))
    if not files:
        raise GgufError(f"{export_dir} has no *.safetensors: pass the --out directory of `rltk export`")
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    if "lm_head.weight" not in where:
        return "tied"

    def load(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    embed = "model.embed_tokens.weight"
    return "duplicate" if embed in where and torch.equal(load("lm_head.weight"), load(embed)) else "untied"


def check_head(export_dir: Path, untie: bool) -> str:
    """:func:`head_state`, refusing an untied head unless ``untie`` (see the module docstring)."""
    state = head_state(export_dir)
    if state == "untied" and not untie:
        raise GgufError(
            f"the export at {export_dir} has an lm_head.weight that differs from its input embeddings "
            "(model.embed_tokens.weight), e.g. a LoRA on lm_head was merged, while the base model ties them. "
            "Writing it would ship a separate output matrix the base never had; nothing was written. Fix: "
            "train without lm_head in model.lora.target_modules, or untie explicitly (write_gguf(..., "
            "untie=True)) to write output.weight as its own tensor"
        )
    return state


def _converter_env(converter: Path) -> dict[str, str]:
    """The converter's environment: its own gguf-py first on PYTHONPATH, offline, no NO_LOCAL_GGUF."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    paths = [str(converter.parent / "gguf-py"), str(converter.parent)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    # The export dir holds everything the converter reads; offline makes any attempt to fetch fail loudly.
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def run_converter(export_dir: Path, outtype: str, out_file: Path, converter: Path) -> None:
    """Run ``converter`` on ``export_dir`` into ``out_file`` (a subprocess with this interpreter).

    Raises:
        GgufError: With the converter's last output lines, if it fails.

    """
    cmd = [sys.executable, str(converter), str(export_dir), "--outtype", outtype, "--outfile", str(out_file)]
    proc = subprocess.run(cmd, env=_converter_env(converter), capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise GgufError(f"llama.cpp's converter failed on {export_dir} (exit {proc.returncode}):\n{tail}")


def _token_id(tokens: Sequence[str], text: str) -> int | None:
    return tokens.index(text) if text in tokens else None


def metadata_problems(
    gguf_file: Path, export_dir: Path, source: Path | None, untie: bool = False
) -> list[str]:
    """What is wrong with a written GGUF's metadata (empty: nothing); :func:`write_gguf`'s final check.

    Checks: the export's chat template is embedded; with a ``source`` GGUF, every ``tokenizer.ggml.*`` key
    equals the source's (same keys, same values); ``<|im_end|>``, where the vocabulary has it (ChatML),
    is the EOS or EOT id; no ``output.weight`` unless ``untie`` (a tied head stays tied).
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    problems = []
    meta = _fields(reader, "tokenizer.")
    template = _chat_template(export_dir)
    if not meta.get(CHAT_TEMPLATE_KEY):
        problems.append(f"no {CHAT_TEMPLATE_KEY}")
    elif template is not None and meta[CHAT_TEMPLATE_KEY] != template:
        problems.append(f"{CHAT_TEMPLATE_KEY} differs from the export's chat template")
    if source is not None:
        want = _fields(GGUFReader(source), TOKENIZER_PREFIX)
        have = {k: v for k, v in meta.items() if k.startswith(TOKENIZER_PREFIX)}
        for key in sorted(want.keys() | have.keys()):
            if want.get(key) != have.get(key):
                problems.append(f"{key} differs from the source GGUF's ({source.name})")
    im_end = _token_id(meta.get("tokenizer.ggml.tokens") or [], IM_END)
    ends = {meta[k] for k in END_KEYS if k in meta}
    if im_end is not None and im_end not in ends:  # a ChatML turn ends at <|im_end|>: llama.cpp must stop
        problems.append(f"{IM_END} (id {im_end}) is not among the end tokens (eos/eot ids {sorted(ends)})")
    if not untie and any(t.name == "output.weight" for t in reader.tensors):
        problems.append("output.weight is present: the tied output head was written as a separate tensor")
    return problems


def _source_gguf(source: Path | None) -> Path | None:
    """The GGUF whose tokenizer metadata to carry over: ``source``, else the embedded model's (if any)."""
    if source is not None:
        return Path(source)
    try:
        return find_gguf(EMBEDDED[DEFAULT_MODEL])
    except ModelError:
        return None


def _patch(
    converted: Path, out_file: Path, source: Path | None, explicit: bool, drop_output: bool
) -> Path | None:
    """Write ``out_file``: ``converted`` with the source's tokenizer keys and without a duplicate head.

    Returns:
        The source actually used (None: the converted file's own vocabulary is a different one, so the
        default source does not apply and nothing is copied).

    Raises:
        GgufError: ``explicit`` and the vocabularies differ (copying would mislabel every id).

    """
    from gguf import GGUFReader

    reader = GGUFReader(converted)
    override: dict[str, Any] = {}
    if source is not None:
        src = GGUFReader(source)
        same_vocab = all(_fields(src, k) == _fields(reader, k) for k in VOCAB_KEYS)
        if not same_vocab and explicit:
            raise GgufError(
                f"the export's vocabulary (tokens/merges as converted) is not that of {source}: its "
                "tokenizer metadata cannot be carried over; pass the GGUF the run's base model came from"
            )
        if same_vocab:
            override = {k: f for k, f in src.fields.items() if k.startswith(TOKENIZER_PREFIX)}
        else:
            source = None
    copy_gguf(reader, out_file, override, drop={"output.weight"} if drop_output else set())
    return source


def copy_gguf(reader: GGUFReader, out_file: Path, override: dict[str, Any], drop: set[str]) -> None:
    """Write ``reader``'s file to ``out_file``, its ``tokenizer.ggml.*`` keys replaced by ``override``'s.

    ``override`` maps keys to gguf-py ``ReaderField`` objects (whose values and types are written under
    the key; usually the same key of another file); a non-empty ``override``
    drops every ``tokenizer.ggml.*`` key of ``reader`` first, so the result has exactly the override's.
    Tensors named in ``drop`` are left out; the others are copied byte for byte (any quantization).
    """
    import gguf

    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out_file), arch, endianess=reader.endianess)
    kept = {
        k: f
        for k, f in reader.fields.items()
        # the writer writes the GGUF.* header and the architecture itself
        if not k.startswith("GGUF.") and k != "general.architecture"
        if not (override and k.startswith(TOKENIZER_PREFIX))
    }
    for key, f in [*kept.items(), *override.items()]:
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), kind, sub_type=sub)
    tensors = [t for t in reader.tensors if t.name not in drop]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def _check_export_dir(export_dir: Path) -> None:
    """An rltk export: a directory with a config; where it has ``SHA256SUMS``, every file must match."""
    from rltk.export import SUMS, ExportError, check_export

    if not (export_dir / "config.json").is_file():
        raise GgufError(f"{export_dir} is not an export (no config.json): pass the --out dir of rltk export")
    if (export_dir / SUMS).is_file():
        try:
            check_export(export_dir)
        except ExportError as exc:
            raise GgufError(str(exc)) from exc


def write_gguf(
    export_dir: Path,
    outtype: str,
    out_file: Path,
    converter: Path | None = None,
    *,
    source: Path | None = None,
    untie: bool = False,
) -> Path:
    """Convert an rltk export to one GGUF file with llama.cpp's converter, then check what was written.

    Args:
        export_dir: The ``--out`` directory of ``rltk export`` (checked against its ``SHA256SUMS``).
        outtype: ``f32``, ``f16`` or ``q8_0`` (the converter's ``--outtype``).
        out_file: The GGUF to write; must not exist. Written under a temporary name, moved last.
        converter: A llama.cpp ``convert_hf_to_gguf.py`` (``gguf-py/`` beside it); default: the one
            ``bash scripts/setup_gguf.sh`` unpacked into :func:`llama_cpp_dir`.
        source: The GGUF whose ``tokenizer.ggml.*`` keys to carry over; default: the embedded model's, used
            when the export has its vocabulary (rltk's tokenizer was rebuilt from it).
        untie: Write an ``lm_head`` that differs from the embeddings as its own ``output.weight``.

    Returns:
        ``out_file``.

    Raises:
        GgufError: Bad ``outtype``, ``out_file`` exists, a missing converter or sentencepiece, an export
            that fails its ``SHA256SUMS`` or has an untied head, a failed conversion, or a written file
            whose metadata does not check out (:func:`metadata_problems`; the file is then not kept).

    """
    export_dir, out_file = Path(export_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise GgufError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if out_file.exists():
        raise GgufError(f"{out_file} exists; choose a new file name or remove it")
    found = find_converter(converter)
    _require_sentencepiece()
    _check_export_dir(export_dir)
    head = check_head(export_dir, untie)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    converted = out_file.with_name(f".{out_file.name}.converted.tmp")
    patched = out_file.with_name(f".{out_file.name}.tmp")
    try:
        run_converter(export_dir, outtype, converted, found)
        used = _patch(converted, patched, _source_gguf(source), source is not None, head == "duplicate")
        if problems := metadata_problems(patched, export_dir, used, untie=untie):
            raise GgufError(f"the GGUF converted from {export_dir} does not check out: {'; '.join(problems)}")
        os.replace(patched, out_file)
    finally:
        converted.unlink(missing_ok=True)
        patched.unlink(missing_ok=True)
    return out_file
