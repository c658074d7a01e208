"""PyTorch Lightning driving ASGO: configure_optimizers returns ASGO with a per-step LR schedule.

The model is a tiny language model with a fused nn.MultiheadAttention (head-wise Q/K/V blocks
through asgo_param_groups), trained in bf16 mixed precision on the CPU. A run resumed from the
end-of-epoch-1 checkpoint must end bit for bit where the uninterrupted two-epoch run ends.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from asgo_core.adapters.torch import ASGO, asgo_param_groups

VOCAB, WIDTH, HEADS = 32, 32, 4
STEPS_PER_EPOCH, EPOCHS = 3, 2


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB)
        self.losses = []

    def forward(self, tokens):
        x = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return self.head(x + self.mlp(x))

    def training_step(self, tokens, batch_index):
        logits = self(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = ASGO(asgo_param_groups(self, num_heads=self.attn.num_heads), lr=0.02, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def counting_sequences() -> torch.utils.data.DataLoader:
    starts = torch.randint(0, VOCAB, (4 * STEPS_PER_EPOCH, 1), generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader((starts + torch.arange(12)) % VOCAB, batch_size=4)


def fit(checkpoint_dir, ckpt_path=None) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, precision="bf16-mixed",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1)])
    trainer.fit(model, counting_sequences(), ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    return model


def test_fit_and_resume_from_a_checkpoint_are_bit_for_bit_equal(tmp_path):
    torch.manual_seed(0)
    initial = TinyLM().state_dict()
    uninterrupted = fit(tmp_path / "run")
    assert len(uninterrupted.losses) == STEPS_PER_EPOCH * EPOCHS
    assert uninterrupted.losses[-1] < 0.8 * uninterrupted.losses[0]
    optimizer = uninterrupted.trainer.optimizers[0]
    assert isinstance(optimizer, ASGO)
    assert [g["num_heads"] for g in optimizer.param_groups if g["num_heads"]] == [3 * HEADS]  # in_proj
    assert optimizer.param_groups[0]["lr"] < 0.1 * 0.02  # the cosine schedule stepped every batch

    epoch_one = tmp_path / "run" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    resumed = fit(tmp_path / "resumed", ckpt_path=epoch_one)
    assert len(resumed.losses) == STEPS_PER_EPOCH
    expected = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():
        assert not torch.equal(value, initial[name]), name
        assert torch.equal(value, expected[name]), name
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
