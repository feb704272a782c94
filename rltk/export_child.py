"""The export check's child: an export loaded as a server would load it, with rltk and peft refused.

Run by path in an isolated interpreter (``python -I rltk/export_child.py DIR merged|adapter``), never
imported: it must not import rltk. ``sys.modules[name] = None`` makes ``import rltk`` fail and makes
``importlib.util.find_spec`` report the package absent, so transformers behaves as it does where rltk and
peft are not installed. An adapter export is loaded with peft (what peft and vLLM ``--enable-lora`` serve),
so only rltk is refused there.

Protocol: one JSON object per line. The child first writes ``{"ready": {...}}`` with what loading found
(missing, unexpected and mismatched keys, ``auto_map``, end-of-turn ids, refused modules), then answers
each request line until ``{"quit": true}`` or the end of stdin:

* ``{"render": {"messages": [...], "tools": [...] | null}}`` → ``{"ids": [...]}``: the export's own chat
  template, generation prompt added;
* ``{"generate": {"ids": [...], "max_new_tokens": N, "min_new_tokens": M, "stop_strings": [...]}}`` →
  ``{"tokens": [...]}``: greedy, batch of one, up to and including the first end-of-turn token.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

REFUSED = {"merged": ("rltk", "peft"), "adapter": ("rltk",)}


def _refuse(names: tuple[str, ...]) -> None:
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # import fails; find_spec says absent


def _imported(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` an import reaches now (a refused one must not)."""
    import importlib

    found = []
    for name in names:
        try:
            importlib.import_module(name)
            found.append(name)
        except ImportError:
            pass
    return found


def _load(path: str, kind: str) -> tuple[Any, Any, dict[str, Any]]:
    """The tokenizer, the model (fp32, eval mode) and what loading reported."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if kind == "adapter":
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        base, info = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch.float32, trust_remote_code=False, output_loading_info=True
        )
        model = PeftModel.from_pretrained(base, path)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=False, output_loading_info=True
        )
    model.eval()
    eos = model.generation_config.eos_token_id
    report = {
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])),
        "auto_map": getattr(model.config, "auto_map", None),
        "quantized": getattr(model.config, "quantization_config", None) is not None,
        "eos_ids": sorted(set(eos if isinstance(eos, list) else [eos]) - {None}),
        "imported": _imported(("rltk", "peft")),
    }
    return tokenizer, model, report


def _generate(model: Any, tokenizer: Any, request: dict[str, Any]) -> list[int]:
    import torch

    ids = torch.tensor([request["ids"]])
    stop = request.get("stop_strings") or None
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=request["max_new_tokens"],
            min_new_tokens=request.get("min_new_tokens", 0),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            **({"stop_strings": stop, "tokenizer": tokenizer} if stop else {}),
        )
    return out[0, ids.shape[1] :].tolist()


def main() -> None:
    """Load ``argv[1]`` as an export of kind ``argv[2]`` and answer requests (module docstring)."""
    path, kind = sys.argv[1], sys.argv[2]
    _refuse(REFUSED[kind])
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' prints go to stderr; stdout carries the protocol only
    tokenizer, model, report = _load(path, kind)
    reply.write(json.dumps({"ready": report}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "quit" in request:
            break
        if "render" in request:
            r = request["render"]
            tools = {} if r.get("tools") is None else {"tools": r["tools"]}
            ids = tokenizer.apply_chat_template(
                r["messages"], add_generation_prompt=True, tokenize=True, **tools
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            answer: dict[str, Any] = {"ids": list(ids)}
        else:
            answer = {"tokens": _generate(model, tokenizer, request["generate"])}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
