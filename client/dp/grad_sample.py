"""Per-sample gradients for DP-SGD: Opacus hooks, without the gradient DP-SGD throws away.

:class:`DirectGradSampleModule` is Opacus's ``GradSampleModule`` in hooks mode that finds every
fedvox sampler (:mod:`fedvox.client.dp.samplers`, weight-normed convolutions included), so
nothing falls back to functorch. :class:`PrivateGradSampleModule` adds one change to the
backward pass. A plain ``loss.backward()`` makes autograd compute every parameter's *summed*
gradient ``p.grad`` besides the per-sample gradients the hooks compute; DP-SGD never reads that
sum (the optimizer replaces it by the noisy sum of clipped per-sample gradients), yet it costs a
third of each layer's backward. :meth:`PrivateGradSampleModule.backward` asks autograd only for
the gradients that reach the hooks: the gradient with respect to the *outputs* of the lowest
trainable modules (those none of whose inputs requires a gradient). Every hooked module lies on
a path from the loss to one of them, so every hook fires with exactly the output gradient it
would otherwise see, while the edges into the parameters themselves are pruned.

Precondition (true of every fedvox task): no input of the wrapped model requires a gradient, so
anything in the forward pass that does descends from the model's own trainable parameters. If
it is violated, a module's hook may not fire and the optimizer raises instead of going on.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from fedvox.client.dp.samplers import sampler_key


class DirectGradSampleModule(GradSampleModule):
    """``opacus.GradSampleModule`` that looks samplers up by :func:`sampler_key`: every layer of
    both stages through a direct formula. Use it wherever ``GradSampleModule`` would be used."""

    def _get_module_type(self, module: nn.Module) -> type:
        return sampler_key(module)


class PrivateGradSampleModule(DirectGradSampleModule):
    """Hooks-mode per-sample gradients, back-propagated without the summed parameter gradients."""

    def __init__(self, module: nn.Module, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self._targets: list[torch.Tensor] = []

    def capture_activations_hook(self, module: nn.Module, forward_input, forward_output) -> None:
        super().capture_activations_hook(module, forward_input, forward_output)
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in forward_input):
            return  # a trainable module below feeds it: its output gradient is on the way there
        outputs = forward_output if isinstance(forward_output, (tuple, list)) else (forward_output,)
        self._targets.extend(y for y in outputs if isinstance(y, torch.Tensor) and y.requires_grad)

    def capture_backprops_hook(self, module: nn.Module, *args, **kwargs) -> None:
        # A hook firing while outputs are still recorded means an ordinary ``loss.backward()``
        # consumed the pass: drop them (they would keep its tensors alive).
        self._targets.clear()
        super().capture_backprops_hook(module, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` for per-sample gradients only (``p.grad`` stays ``None``)."""
        targets, self._targets = self._targets, []
        if not targets:  # nothing trainable was recorded (e.g. hooks off): an ordinary backward
            loss.backward()
            return
        try:
            torch.autograd.backward(loss, inputs=targets)
        finally:
            for target in targets:
                target.grad = None

    def reset_pass_state(self) -> None:
        """Forget a forward/backward pass that was cut short (e.g. by out-of-memory).

        Opacus keeps per-module activations and per-parameter counters between a module's
        forward and its backward hook; an interrupted pass leaves them behind, and the next pass
        would then never complete its per-sample gradients.
        """
        self._targets = []
        for module in self.iterate_submodules(self._module):
            for name in ("activations", "max_batch_len"):
                if hasattr(module, name):
                    delattr(module, name)
            for _, param in trainable_parameters(module):
                param._forward_counter = 0
                if hasattr(param, "_current_grad_sample"):
                    del param._current_grad_sample
                param.grad_sample = None


__all__ = ["DirectGradSampleModule", "PrivateGradSampleModule"]
