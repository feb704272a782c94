"""rltk's calls into transformers and peft use no deprecated API: a deprecated argument or attribute works
until a release removes it, and rltk's bounds allow newer releases only once the tests pass on them.

pyproject's ``filterwarnings`` makes every FutureWarning an error across the suite; these tests state it for
the call paths that hand a KV cache to transformers (prefill, its expansion, the forward on top of it, and
``generate`` continuing from it), and also fail on any warning transformers logs (it only logs some
deprecations, such as reading ``output.past_key_values``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from conftest import make_tiny_model
from test_forward import PREFIX_LEN, G, make_batch
from transformers import PreTrainedTokenizerBase

from rltk.forward import MODES, SEPARATE_ROWS_FROM, completion_scores
from rltk.models import add_lora
from rltk.sampler import SamplingParams, sample_turn

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Records(logging.Handler):
    """Keeps the log records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def no_warnings() -> Iterator[None]:
    """Turn every Python warning into an error, and fail on any warning transformers logs."""
    # transformers logs some deprecations once per process: forget those an earlier test triggered
    transformers.utils.logging.warning_once.cache_clear()
    handler = Records()
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        library_logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


def test_forward_modes_use_no_deprecated_api(tokenizer: PreTrainedTokenizerBase) -> None:
    model = make_tiny_model(tokenizer)
    with no_warnings():
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=LORA_MODULES)
        model.train()
        short = make_batch(tokenizer.pad_token_id, prefix_len=PREFIX_LEN)  # prefix once, packed rows
        lc = SEPARATE_ROWS_FROM + 1
        long = make_batch(
            tokenizer.pad_token_id, prefix_len=PREFIX_LEN, completion_lens=[[lc] * G, [lc, 2, 3, 4], [1] * G]
        )  # one row per completion
        for batch in (short, long):
            for mode in MODES:
                scores = completion_scores(model, batch, mode=mode, entropy=True)
                scores.logp.sum().backward()


def test_sampling_uses_no_deprecated_api(tokenizer: PreTrainedTokenizerBase) -> None:
    model = make_tiny_model(tokenizer)
    prefix = torch.randint(3, 2000, (PREFIX_LEN,), generator=torch.Generator().manual_seed(0))
    prompts = [torch.cat([prefix, torch.tensor(own)]) for own in ([5, 6, 7], [8], [9, 10])]  # shared prefix
    sampled = SamplingParams(max_new_tokens=4, temperature=0.9, stop_strings=("</answer>",))
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    with no_warnings():
        for params in (sampled, greedy):
            samples = sample_turn(
                model, prompts, G, params, [tokenizer.eos_token_id], tokenizer.pad_token_id, tokenizer
            )
            assert len(samples) == len(prompts) * G
