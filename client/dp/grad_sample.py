"""Per-sample gradients for DP-SGD: lean hooks, without the gradient DP-SGD throws away.

:class:`DirectGradSampleModule` is Opacus's ``GradSampleModule`` in hooks mode that finds every
fedvox sampler (:mod:`fedvox.client.dp.samplers`, weight-normed convolutions included), so
nothing falls back to functorch. :class:`PrivateGradSampleModule`, the engine's, replaces
Opacus's per-layer hooks by leaner ones (see the class) and changes the backward pass. A plain
``loss.backward()`` makes autograd compute every parameter's *summed*
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

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from fedvox.client.dp.book_keeping import Keeper, Record, keeper_for
from fedvox.client.dp.samplers import sampler_key

Sampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]
"""A per-sample gradient formula: ``(layer, its inputs, its output gradient) -> {param: [B, *shape]}``."""


class DirectGradSampleModule(GradSampleModule):
    """``opacus.GradSampleModule`` that looks samplers up by :func:`sampler_key`: every layer of
    both stages through a direct formula. Use it wherever ``GradSampleModule`` would be used."""

    def _get_module_type(self, module: nn.Module) -> type:
        return sampler_key(module)


class _Layer:
    """A hooked layer's plan, made once at wrap time (its sampler, book-keeping path and
    parameters, and the hook on its outputs), and the inputs of its forward uses whose backward
    is still to come."""

    __slots__ = ("hook", "inputs", "keeper", "module", "params", "sampler")

    def __init__(
        self,
        module: nn.Module,
        sampler: Sampler,
        keeper: tuple[Keeper, bool] | None,
        per_sample: Callable[[_Layer, torch.Tensor], None],
    ) -> None:
        self.module, self.sampler, self.keeper = module, sampler, keeper
        self.params = tuple(module.parameters())
        self.inputs: list[list[torch.Tensor]] = []
        self.hook = partial(per_sample, self)


class PrivateGradSampleModule(DirectGradSampleModule):
    """Per-sample gradients from one lean hook per layer, back-propagated without the summed
    parameter gradients.

    Opacus's hooks mode registers a *full* backward hook per layer, which wraps the layer's
    inputs and outputs in extra autograd nodes on every forward, looks the layer's sampler up on
    every backward, and accumulates each per-sample gradient into a freshly zeroed buffer. Here a
    forward hook records the layer's inputs and puts a tensor hook on its output, which autograd
    calls with exactly the output gradient the full hook would get; the sampler, the layer's
    parameters and the output hook are made once per layer (:class:`_Layer`), per-parameter
    counts are keyed by ``id`` (a tensor's ``__hash__`` is a Python call), and a per-sample
    gradient is stored as computed.

    Layers with a book-keeping path (:mod:`fedvox.client.dp.book_keeping`: linear layers where
    the ghost norm is cheaper, weight-normed convolutions) leave a record in ``param.book``
    instead of ``param.grad_sample``, when it is the parameter's only use since the optimizer's
    last step; the DP optimizer reads both.
    """

    def __init__(self, module: nn.Module, **kwargs) -> None:
        self._targets: list[torch.Tensor] = []
        self._layers: dict[nn.Module, _Layer] = {}
        self._pending: dict[int, int] = {}
        """Forward uses of a parameter (by ``id``) whose per-sample gradient has not been added yet."""
        self._partial: dict[int, torch.Tensor] = {}
        """Per-sample gradients (by parameter ``id``) summed over the parameter's uses so far in this pass."""
        self._books: dict[nn.Module, Record] = {}
        """Book-keeping records summed over a layer's uses so far in this pass."""
        super().__init__(module, **kwargs)

    def add_hooks(
        self, *, loss_reduction: str = "sum", batch_first: bool = True, force_functorch: bool = False
    ) -> None:
        if loss_reduction != "sum" or not batch_first or force_functorch:
            raise ValueError("PrivateGradSampleModule takes summed per-sample losses, batch first, no forced functorch")
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self.autograd_grad_sample_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._module.autograd_grad_sample_hooks = self.autograd_grad_sample_hooks
        for module in self.iterate_submodules(self._module):
            sampler = self.GRAD_SAMPLERS.get(self._get_module_type(module))
            if sampler is None:  # no direct formula: Opacus's functorch fallback
                prepare_layer(module, batch_first=True)
                sampler = ft_compute_per_sample_gradient
            self._layers[module] = _Layer(module, sampler, keeper_for(module), self._per_sample)
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(self._record))
        self.enable_hooks()

    def _record(self, module: nn.Module, inputs: tuple, output: object) -> None:
        """Forward hook: keep the layer's inputs and hook its output's gradient."""
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        layer = self._layers[module]
        trainable = [p for p in layer.params if p.requires_grad]
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if not (trainable and isinstance(outputs[0], torch.Tensor) and outputs[0].requires_grad):
            return
        layer.inputs.append([x.detach() for x in inputs])
        pending = self._pending
        for param in trainable:
            key = id(param)
            pending[key] = pending.get(key, 0) + 1
        outputs[0].register_hook(layer.hook)
        if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            # no trainable module below feeds it: the pruned backward stops at its outputs
            self._targets.extend(y for y in outputs if isinstance(y, torch.Tensor) and y.requires_grad)

    def _per_sample(self, layer: _Layer, grad_output: torch.Tensor) -> None:
        """Tensor hook on a layer's output: the layer's per-sample gradients."""
        # A hook firing while outputs are still recorded means an ordinary ``loss.backward()``
        # consumed the pass: drop them (they would keep its tensors alive).
        self._targets.clear()
        inputs = layer.inputs.pop()
        if not self.hooks_enabled:
            return
        module, keeper = layer.module, layer.keeper
        if keeper is not None:
            trainable = [p for p in layer.params if p.requires_grad]
            if self._can_keep_books(module, trainable, additive=keeper[1]):
                record = keeper[0](module, inputs, grad_output.detach())
                if record is not None:
                    self._keep(module, trainable, record)
                    return
        pending, partial_sums = self._pending, self._partial
        for param, grad_sample in layer.sampler(module, inputs, grad_output.detach()).items():
            key = id(param)
            uses = pending.get(key)
            if uses is None:  # not trainable in the forward pass
                continue
            previous = partial_sums.pop(key, None)
            if previous is not None:
                grad_sample = previous + grad_sample
            if uses > 1:
                pending[key], partial_sums[key] = uses - 1, grad_sample
            else:
                del pending[key]
                self._promote(param, grad_sample)

    def _keep(self, module: nn.Module, trainable: list[nn.Parameter], record: Record) -> None:
        """Add a use's record to the layer's book; hand the book to its parameters after the last use."""
        previous = self._books.pop(module, None)
        record = record if previous is None else previous.plus(record)
        pending = self._pending
        for param in trainable:
            pending[id(param)] -= 1
        if pending[id(trainable[0])] > 0:
            self._books[module] = record
            return
        for param in trainable:
            del pending[id(param)]
            cast(Any, param).book = record

    def _can_keep_books(self, module: nn.Module, trainable: list[nn.Parameter], additive: bool) -> bool:
        """Whether the layer's trainable parameters have no per-sample state from another pass or
        path, and, unless its records add over uses, this is their only use in this pass (a
        :class:`~fedvox.client.dp.book_keeping.Record` holds one physical batch)."""
        uses = {self._pending.get(id(p)) for p in trainable}
        if not trainable or len(uses) != 1 or (not additive and uses != {1}):
            return False
        return module in self._books or not any(
            id(p) in self._partial
            or getattr(p, "grad_sample", None) is not None
            or getattr(p, "book", None) is not None
            for p in trainable
        )

    @staticmethod
    def _promote(param: nn.Parameter, grad_sample: torch.Tensor) -> None:
        """Hand a pass's per-sample gradient over as Opacus does: ``param.grad_sample``, a tensor,
        or a list after several passes without an optimizer step."""
        opacus_param = cast(Any, param)  # Opacus's attribute, unknown to torch's types
        previous = opacus_param.grad_sample
        if previous is None:
            opacus_param.grad_sample = grad_sample
        else:
            opacus_param.grad_sample = (
                [*previous, grad_sample] if isinstance(previous, list) else [previous, grad_sample]
            )

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

        The hooks keep each layer's inputs and each parameter's count of pending uses between
        a layer's forward and its backward; an interrupted pass leaves them behind, and the next
        pass would then never complete its per-sample gradients.
        """
        self._targets, self._pending, self._partial, self._books = [], {}, {}, {}
        for layer in self._layers.values():
            layer.inputs.clear()
        for _, param in trainable_parameters(self._module):
            param.grad_sample = None
            param.book = None


__all__ = ["DirectGradSampleModule", "PrivateGradSampleModule"]
