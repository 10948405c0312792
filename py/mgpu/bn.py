"""BatchNorm in the trainer: which layers keep their running statistics frozen, and a forward pass that
normalises with the batch's statistics but leaves the running ones untouched.

A frozen BatchNorm runs in eval mode: it normalises with its running statistics and never updates them.
That is every BatchNorm with ``--freeze-bn``, and the BatchNorm layers of a locked tower (their weights
frozen: ``--lock-image``), whose statistics stay those of the pretrained weights.

``running_stats_kept`` is for passes that repeat a forward the step already made: the recomputation of a
checkpointed block in the backward pass, and the no-grad feature pass of ``--accum-steps``. In training
mode a BatchNorm would fold the batch into its running statistics a second time; inside this context it
normalises exactly as before (batch statistics) and leaves them as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def is_frozen(m: nn.Module, freeze_all: bool) -> bool:
    """A BatchNorm whose statistics must not move: all of them with freeze_all, else those whose affine
    weights are frozen (a locked tower's)."""
    if not isinstance(m, _BatchNorm):
        return False
    return freeze_all or (m.weight is not None and not m.weight.requires_grad)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), with frozen BatchNorm layers (is_frozen) in eval mode."""
    model.train()
    for m in model.modules():
        if is_frozen(m, freeze_bn):
            m.eval()


def restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    """Put every module back in the mode recorded by ``modes`` (``{m: m.training}``)."""
    for m in model.modules():
        if m in modes:
            m.training = modes[m]


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Inside: BatchNorm layers in training mode normalise with the batch's statistics, as they would, but
    leave running_mean, running_var and num_batches_tracked as they were (momentum 0: the running
    values are kept exactly; the autograd graph is the same as outside)."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
