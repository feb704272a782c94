"""``optim.rollouts_per_micro_batch``: update micro-batches that are pieces of groups, the same gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from rltk import experience, loss
from rltk.config import load_config
from rltk.trainer import Trainer

RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]"


@pytest.mark.parametrize(
    ("algorithm", "layout"), [("grpo", "kv"), ("dr_grpo", "packed"), ("ppo", "off"), ("ppo", "kv")]
)
def test_pieces_of_groups_sum_to_the_whole_groups_gradient(
    tiny_model_dir: str, tmp_path: Path, algorithm: str, layout: str
) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path, steps=1),
        VOWELS,
        "env.name=plugins_for_tests:CounterToolEnv",  # ragged 3-turn episodes with env tokens, two prompts
        f"algorithm.name={algorithm}",
        f"algorithm.shared_prompt={layout}",
        "algorithm.vf_coef=0.5",
        "rollout.max_new_tokens=8",
        "optim.groups_per_micro_batch=2",
    ]
    trainer = Trainer(load_config(RECIPE, overrides))
    groups = trainer.step(0).groups  # rewards scored; the gradients below are at the updated weights
    lengths = {len(r.token_ids) for g in groups for r in g.rollouts}
    grads, sizes = [], []
    for rows in (0, 1, 2):
        batches, _ = experience.make_experience(
            trainer.policy,
            trainer.algo,
            groups,
            per_micro_batch=2,
            pad_id=trainer.tokenizer.pad_token_id,
            device=trainer.accelerator.device,
            all_reduce=trainer._all_reduce_sums,
            rows_per_micro_batch=rows,
        )
        sizes.append([b.completion_ids.shape[0] for b in batches])
        normalizer = loss.normalizer_for(
            batches, trainer.algo.aggregation, trainer.cfg.rollout.max_new_tokens
        )
        trainer.policy.train()
        trainer.updater.backward(batches, normalizer, step=1)
        grads.append([p.grad.clone() for p in trainer.policy.parameters() if p.grad is not None])
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.close()
    assert sizes == [[8], [1] * 8, [2] * 4]
    assert len(grads[0]) == len(grads[1]) == len(grads[2]) > 0
    scale = max(float(g.abs().max()) for g in grads[0])
    assert scale > 0
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-4)
    assert len(lengths) > 2, f"the episodes should be ragged: lengths {lengths}"
