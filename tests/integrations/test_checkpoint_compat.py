"""A trainer's optimizer checkpoint written by an earlier asgo must still resume.

The HF Trainer and Lightning save `optimizer.state_dict()` and resume with
`optimizer.load_state_dict()`. A checkpoint written before a group option existed (batch_dims
is the newest) lacks that option in its param groups; torch.optim's own optimizers give such an
option its default when loading (their __setstate__), and the resumed run continues as if it had
never stopped.
"""

from __future__ import annotations

import torch
from torch import nn

from asgo_core.adapters.torch import ASGO


def step_with(opt, params, grads):
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    opt.step()


def test_a_checkpoint_without_a_newer_option_resumes_with_its_default():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    opt = ASGO(params, lr=0.01)
    for step_grads in grads[:2]:
        step_with(opt, params, step_grads)

    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["batch_dims"]  # as a checkpoint from before batch_dims has it
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = ASGO(resumed_params, lr=0.01)
    resumed.load_state_dict(saved)

    for step_grads in grads[2:]:
        step_with(opt, params, step_grads)
        step_with(resumed, resumed_params, step_grads)
    assert resumed.param_groups[0]["batch_dims"] == 0
    for resumed_param, param in zip(resumed_params, params):
        assert torch.equal(resumed_param, param)
