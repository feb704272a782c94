"""GGUF: an export converted by llama.cpp's own converter carries the source GGUF's tokenizer, the chat
template and a tied head, and under real llama.cpp answers greedily exactly as transformers does in fp32.

Skipped only where llama-cpp-python is not installed (``bash scripts/setup_gguf.sh`` installs it, with the
converter; CI runs it). The tiny model here has wider random weights than ``conftest``'s (init range 0.2):
with 0.02 a tied tiny Llama echoes "\\n" whatever its input, and equal answers would prove nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from transformers import PreTrainedTokenizerBase

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run bash scripts/setup_gguf.sh")

from gguf import GGUFReader

from rltk import plugins
from rltk.chat import render_prompt
from rltk.config import Config, load_config
from rltk.evaluate import model_rollouts
from rltk.export import export, write_sums
from rltk.gguf import (
    IM_END,
    GgufError,
    copy_gguf,
    find_converter,
    head_state,
    metadata_problems,
    require_llama_cpp,
    run_converter,
    write_gguf,
)
from rltk.llamacpp_sampler import LlamaCppSampler, prompt_token_mismatches, verify_gguf
from rltk.models import DEFAULT_MODEL, EMBEDDED, find_gguf, load_tokenizer, make_tiny_model
from rltk.reward import Rubric
from rltk.sampler import HFSampler, SamplingParams
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
SOURCE = find_gguf(EMBEDDED[DEFAULT_MODEL])


@pytest.fixture(scope="module")
def run_and_export(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase
) -> tuple[Config, Path]:
    """A 2-step LoRA run of the quickstart recipe on a tiny model (tied, init range 0.2) and its export."""
    root = tmp_path_factory.mktemp("gguf")
    model_dir = root / "tiny"
    make_tiny_model(tokenizer, init_range=0.2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    Trainer(load_config(RECIPE, tiny_overrides(str(model_dir), root / "run", steps=2))).train()
    return load_config(root / "run" / "config.yaml", []), export(root / "run", root / "out", n=8)


@pytest.fixture(scope="module")
def f32(run_and_export: tuple[Config, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export as an f32 GGUF."""
    return write_gguf(run_and_export[1], "f32", tmp_path_factory.mktemp("f32") / "model.gguf")


def _tokenizer_keys(path: Path) -> dict[str, object]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}


def test_conversion_carries_the_source_tokenizer_template_and_tied_head(
    run_and_export: tuple[Config, Path], f32: Path
) -> None:
    _, out = run_and_export
    reader = GGUFReader(f32)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert meta["tokenizer.chat_template"] == (out / "chat_template.jinja").read_text()
    assert "<|im_start|>assistant" in meta["tokenizer.chat_template"]
    source = _tokenizer_keys(SOURCE)
    assert _tokenizer_keys(f32) == source  # every key: tokens, merges, types, special ids, pre-tokenizer
    assert source["tokenizer.ggml.pre"] == "smollm" and len(source["tokenizer.ggml.tokens"]) == 49152
    im_end = meta["tokenizer.ggml.tokens"].index(IM_END)
    assert im_end in {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reads token_embd
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert metadata_problems(f32, out, SOURCE) == []


def test_the_check_catches_what_the_converter_alone_gets_wrong(
    run_and_export: tuple[Config, Path], tmp_path: Path
) -> None:
    # The converter's own vocab (before the copy from the source) lacks the source's add_space_prefix:
    # metadata_problems sees it, which is why write_gguf copies the keys and then checks them.
    _, out = run_and_export
    raw = tmp_path / "raw.gguf"
    run_converter(out, "f32", raw, find_converter())
    problems = metadata_problems(raw, out, SOURCE)
    assert problems == [f"tokenizer.ggml.add_space_prefix differs from the source GGUF's ({SOURCE.name})"]


def test_the_check_catches_an_eos_that_is_not_im_end(
    run_and_export: tuple[Config, Path], f32: Path, tmp_path: Path
) -> None:
    _, out = run_and_export
    source = GGUFReader(SOURCE)
    override = {k: f for k, f in source.fields.items() if k.startswith("tokenizer.ggml.")}
    override["tokenizer.ggml.eos_token_id"] = source.fields["tokenizer.ggml.unknown_token_id"]  # id 0
    bad = tmp_path / "eos0.gguf"
    copy_gguf(GGUFReader(f32), bad, override, drop=set())
    assert GGUFReader(bad).fields["tokenizer.ggml.eos_token_id"].contents() == 0
    not_im_end = f"{IM_END} (id 2) is not among the end tokens (eos/eot ids [0])"
    assert metadata_problems(bad, out, None) == [not_im_end]
    differs = f"tokenizer.ggml.eos_token_id differs from the source GGUF's ({SOURCE.name})"
    assert metadata_problems(bad, out, SOURCE) == [differs, not_im_end]


def test_llama_cpp_tokenizes_the_envs_prompts_as_transformers(
    f32: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    tasks = plugins.make_env("policy_flagging", {}).tasks("eval", 40, seed=0)
    sampler = LlamaCppSampler(f32, tokenizer)
    try:
        assert prompt_token_mismatches(sampler.llm, tokenizer, tasks) == []
        # not vacuous: read without the special tokens (as plain text), the same prompt no longer matches
        task = tasks[0]
        text = tokenizer.apply_chat_template(list(task.messages), add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|im_start|>system")
        as_text = sampler.llm.tokenize(text.encode(), add_bos=False, special=False)
        assert as_text != render_prompt(tokenizer, task.messages)
    finally:
        sampler.close()


@pytest.mark.parametrize(("env_name", "n"), [("policy_flagging", 8), ("support_refund", 3)])
def test_greedy_rollouts_equal_transformers_in_f32(
    run_and_export: tuple[Config, Path], f32: Path, env_name: str, n: int
) -> None:
    from transformers import AutoModelForCausalLM

    _, out = run_and_export
    tokenizer = load_tokenizer(str(out))
    env = plugins.make_env(env_name, {})
    rubric = Rubric.from_config([], env, workers=0)
    tasks = env.tasks("eval", n, seed=0)
    max_new_tokens = 16
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    want = model_rollouts(model, tokenizer, env, rubric, tasks, max_new_tokens)
    sampler = LlamaCppSampler(f32, tokenizer, kv_cache="f32")  # f16's cache rounding can flip a near tie
    try:
        got = model_rollouts(sampler, tokenizer, env, rubric, tasks, max_new_tokens)
    finally:
        sampler.close()
    assert [r.token_ids.tolist() for r in got] == [r.token_ids.tolist() for r in want]
    assert [r.turns for r in got] == [r.turns for r in want]
    assert len({tuple(r.token_ids.tolist()) for r in want}) > 1, (
        "answers must differ, or equality proves little"
    )
    if env.max_turns > 1:
        assert max(len(r.turns) for r in got) > 1, "a multi-turn episode went past its first turn"


def test_stop_strings_eos_and_min_tokens_cut_as_hf_does(
    run_and_export: tuple[Config, Path], f32: Path
) -> None:
    from transformers import AutoModelForCausalLM

    _, out = run_and_export
    tokenizer = load_tokenizer(str(out))
    hf = HFSampler(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), tokenizer)
    tasks = plugins.make_env("policy_flagging", {}).tasks("eval", 4, seed=0)
    prompts = [torch.tensor(render_prompt(tokenizer, t.messages)) for t in tasks]
    sampler = LlamaCppSampler(f32, tokenizer, kv_cache="f32")
    try:
        free = hf.sample(prompts, 1, SamplingParams(max_new_tokens=12, temperature=0))
        text = tokenizer.decode(free[0].token_ids[:6].tolist(), skip_special_tokens=True)
        stop = text[-3:].strip() or text  # ends within the first continuation's 6th token
        assert stop
        for params in (
            SamplingParams(max_new_tokens=12, temperature=0, stop_strings=(stop,)),
            SamplingParams(max_new_tokens=12, min_new_tokens=10, temperature=0, stop_strings=(stop,)),
        ):
            a, b = hf.sample(prompts, 1, params), sampler.sample(prompts, 1, params)
            assert [s.token_ids.tolist() for s in b] == [s.token_ids.tolist() for s in a], params
            assert [s.finished for s in b] == [s.finished for s in a]
            assert b[0].finished and len(b[0].token_ids) <= 6
            # greedy log-probs are the plain log-softmax: fp32 llama.cpp against fp32 torch
            assert torch.allclose(b[0].sample_logp, a[0].sample_logp, atol=1e-4)
    finally:
        sampler.close()


def test_sampler_seeds_from_torch_refuses_weights_and_closes(
    f32: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    sampler = LlamaCppSampler(f32, tokenizer)
    prompt = [torch.tensor(render_prompt(tokenizer, [{"role": "user", "content": "Hi"}]))]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50)
    torch.manual_seed(3)
    first = sampler.sample(prompt, 3, params)
    torch.manual_seed(3)
    again = sampler.sample(prompt, 3, params)
    assert [s.token_ids.tolist() for s in again] == [s.token_ids.tolist() for s in first]
    assert len({tuple(s.token_ids.tolist()) for s in first}) > 1  # three draws, not one repeated
    assert all(bool((s.sample_logp <= 0).all()) for s in first)
    assert sampler.limits.eos_ids == (tokenizer.convert_tokens_to_ids(IM_END),)
    with pytest.raises(GgufError, match="fixed weights"):
        sampler.push_weights(torch.nn.Linear(1, 1))
    sampler.close()
    sampler.close()  # idempotent
    with pytest.raises(GgufError, match="closed"):
        sampler.sample(prompt, 1, params)


def test_verify_gguf_reports_a_pass_for_f32(run_and_export: tuple[Config, Path], f32: Path) -> None:
    cfg, out = run_and_export
    report = verify_gguf(f32, out, cfg, n=6, kv_cache="f32")
    assert report.n == 6 and report.identical == 6 and report.prompt_mismatches == []
    assert report.diff_points == 0 and report.passed
    assert report.mean_reward_gguf == report.mean_reward_hf
    assert json.loads(json.dumps(report.to_json()))["passed"] is True


_Q8_RUN = """
import sys, torch
from rltk.llamacpp_sampler import LlamaCppSampler
from rltk.models import load_tokenizer
from rltk.sampler import SamplingParams
tok = load_tokenizer(sys.argv[2])
sampler = LlamaCppSampler(sys.argv[1], tok)
params = SamplingParams(8, min_new_tokens=8, temperature=0)
out = sampler.sample([torch.tensor([1, 9690, 198, 17, 28, 17, 45, 2])], 1, params)
print(len(out[0].token_ids))
"""


def test_q8_0_and_f16_convert_smaller_and_run(
    run_and_export: tuple[Config, Path], f32: Path, tmp_path: Path
) -> None:
    _, out = run_and_export
    sizes = {"f32": f32.stat().st_size}
    for outtype, ggml in (("f16", "F16"), ("q8_0", "Q8_0")):
        path = write_gguf(out, outtype, tmp_path / f"{outtype}.gguf")
        sizes[outtype] = path.stat().st_size
        types = {t.tensor_type.name for t in GGUFReader(path).tensors}
        assert ggml in types, types
        assert _tokenizer_keys(path) == _tokenizer_keys(SOURCE)
        # in a child process: a llama.cpp built for a CPU feature the machine lacks dies with SIGILL here
        proc = subprocess.run(
            [sys.executable, "-c", _Q8_RUN, str(path), str(out)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, (
            f"{outtype} under llama.cpp: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        )
        assert proc.stdout.strip().splitlines()[-1] == "8"
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"], sizes


def _untie(export_dir: Path, target: Path, delta: float) -> Path:
    """A copy of ``export_dir`` with an ``lm_head.weight`` = embeddings + ``delta`` (SHA256SUMS rewritten)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = Path(shutil.copytree(export_dir, target))
    weights_file = copy / "model.safetensors"
    with safe_open(str(weights_file), "pt") as f:
        metadata = f.metadata()
    weights = load_file(str(weights_file))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone() + delta
    save_file(weights, str(weights_file), metadata=metadata)
    config = json.loads((copy / "config.json").read_text())
    config["tie_word_embeddings"] = delta == 0
    (copy / "config.json").write_text(json.dumps(config))
    write_sums(copy)
    return copy


def test_an_untied_head_is_refused_unless_untied_explicitly(
    run_and_export: tuple[Config, Path], tmp_path: Path
) -> None:
    _, out = run_and_export
    untied = _untie(out, tmp_path / "untied", delta=0.01)
    assert head_state(untied) == "untied" and head_state(out) == "tied"
    with pytest.raises(GgufError, match=r"lm_head\.weight that differs .* untie=True"):
        write_gguf(untied, "f32", tmp_path / "refused.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    path = write_gguf(untied, "f32", tmp_path / "untied.gguf", untie=True)
    assert "output.weight" in {t.name for t in GGUFReader(path).tensors}
    # a head that merely repeats the embeddings is written tied, as the base model is
    duplicate = _untie(out, tmp_path / "duplicate", delta=0.0)
    assert head_state(duplicate) == "duplicate"
    path = write_gguf(duplicate, "f32", tmp_path / "duplicate.gguf")
    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}


def test_missing_tools_name_what_to_install(
    run_and_export: tuple[Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = run_and_export
    with pytest.raises(
        GgufError, match=r"not at .*nope\.py: pass the convert_hf_to_gguf\.py .*setup_gguf\.sh"
    ):
        write_gguf(out, "f16", tmp_path / "a.gguf", converter=tmp_path / "nope.py")
    lone = tmp_path / "lone" / "convert_hf_to_gguf.py"
    lone.parent.mkdir()
    shutil.copy(find_converter(), lone)  # a converter without its gguf-py beside it
    with pytest.raises(GgufError, match="no gguf-py/ beside"):
        write_gguf(out, "f16", tmp_path / "a.gguf", converter=lone)
    monkeypatch.setenv("RLTK_CACHE", str(tmp_path / "empty-cache"))  # setup_gguf.sh never ran for this cache
    with pytest.raises(GgufError, match=r"empty-cache/llama\.cpp-0\.3\.36/.*run bash scripts/setup_gguf\.sh"):
        write_gguf(out, "f16", tmp_path / "a.gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets where it is absent
    with pytest.raises(GgufError, match=r"llama-cpp-python==0\.3\.36\) is not installed .*setup_gguf\.sh"):
        require_llama_cpp()
    with pytest.raises(GgufError, match="outtype 'q4_0' is not one of f32, f16, q8_0"):
        write_gguf(out, "q4_0", tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_sentencepiece_missing_is_named(
    run_and_export: tuple[Config, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "sentencepiece" else real(n, *a)
    )
    with pytest.raises(GgufError, match=r"needs the Python package sentencepiece.*setup_gguf\.sh"):
        write_gguf(run_and_export[1], "f16", tmp_path / "a.gguf")


def test_a_tampered_export_is_refused(run_and_export: tuple[Config, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run_and_export[1], tmp_path / "copy"))
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(GgufError, match=r"chat_template\.jinja changed"):
        write_gguf(copy, "f32", tmp_path / "a.gguf")


def test_rltk_export_gguf_writes_checked_files_inside_the_sums(
    run_and_export: tuple[Config, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rltk.cli import main

    cfg, _ = run_and_export
    out = tmp_path / "with-gguf"
    assert (
        main(["export", cfg.run.output_dir, "--out", str(out), "--n", "4", "--gguf", "f32", "--gguf", "q8_0"])
        == 0
    )
    manifest = json.loads((out / "rltk_export.json").read_text())
    assert [g["file"] for g in manifest["gguf"]] == ["model-f32.gguf", "model-q8_0.gguf"]
    assert all(g["passed"] and g["n"] == 4 and g["prompt_mismatches"] == [] for g in manifest["gguf"])
    assert manifest["gguf"][0]["identical"] == 4  # f32: the same greedy episodes as transformers
    assert (
        "model-q8_0.gguf" in (out / "SHA256SUMS").read_text()
        and "model-q8_0.gguf" in (out / "README.md").read_text()
    )
    assert main(["export", "--check", str(out)]) == 0
    assert (
        main(["export", cfg.run.output_dir, "--out", str(tmp_path / "x"), "--adapter-only", "--gguf", "f16"])
        == 2
    )
    assert "--gguf converts merged weights" in capsys.readouterr().err
