"""Hugging Face transformers.Trainer driving ASGO on a tiny Llama (random init, no downloads).

ASGO reaches the Trainer in the two ways its documentation offers: an optimizer built by hand
(`optimizers=(opt, None)`) and a class with keyword arguments (`optimizer_cls_and_kwargs`).
Both use asgo_param_groups with head-wise Q/K blocks. A run that stops at a checkpoint and
resumes from it must end bit for bit where the uninterrupted run ends.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from asgo_core.adapters.torch import ASGO, asgo_param_groups  # noqa: E402

HEADS = 4
TOTAL_STEPS = 6
CHECKPOINT_STEP = 3


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=16, attention_dropout=0.0)
    return LlamaForCausalLM(config)


class CountingSequences(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: easy to learn."""

    def __init__(self, size=16, length=12, vocab=32):
        starts = torch.randint(0, vocab, (size, 1), generator=torch.Generator().manual_seed(1))
        self.tokens = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def training_arguments(output_dir) -> TrainingArguments:
    # 16 sequences in batches of 2 with 2 accumulation steps: 4 optimizer steps an epoch, so the
    # checkpoint at step 3 is mid-epoch and the resumed run must skip the batches already used.
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=TOTAL_STEPS, save_steps=CHECKPOINT_STEP,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.02,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True)


def trainer_with_optimizer(model, args, dataset) -> Trainer:
    groups = asgo_param_groups(model, num_heads=model.config.num_attention_heads, qk_names=("q_proj", "k_proj"))
    opt = ASGO(groups, lr=0.02, weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None))
    return trainer


def trainer_with_optimizer_cls(model, args, dataset) -> Trainer:
    # "params" replaces the Trainer's own decay/no-decay groups with ASGO's groups.
    groups = asgo_param_groups(model, num_heads=model.config.num_attention_heads, qk_names=("q_proj", "k_proj"))
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      optimizer_cls_and_kwargs=(ASGO, {"params": groups, "lr": 0.02, "weight_decay": 0.01}))
    return trainer


def final_parameters(trainer: Trainer) -> dict:
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


@pytest.mark.parametrize("make_trainer", [trainer_with_optimizer, trainer_with_optimizer_cls])
def test_trainer_trains_and_resumes_bit_for_bit(make_trainer, tmp_path):
    uninterrupted = make_trainer(tiny_llama(), training_arguments(tmp_path / "run"), CountingSequences())
    initial = final_parameters(uninterrupted)
    uninterrupted.train()
    expected = final_parameters(uninterrupted)

    optimizer = uninterrupted.optimizer.optimizer  # the Trainer wraps it for accelerate
    assert isinstance(optimizer, ASGO)
    head_groups = [g for g in optimizer.param_groups if g["num_heads"] == HEADS]
    assert len(head_groups) == 1 and len(head_groups[0]["params"]) == 2 * 2  # q and k of 2 layers
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    assert len(losses) == TOTAL_STEPS and losses[-1] < 0.8 * losses[0]
    q_weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(expected[q_weight], initial[q_weight])

    checkpoint = str(tmp_path / "run" / f"checkpoint-{CHECKPOINT_STEP}")
    resumed = make_trainer(tiny_llama(), training_arguments(tmp_path / "resumed"), CountingSequences())
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == TOTAL_STEPS
    for name, value in final_parameters(resumed).items():
        assert torch.equal(value, expected[name]), name
