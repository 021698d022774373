"""fedvox's DP-SGD engine: per-sample gradients, the DP optimizer, the private model, the trainer.

In the spirit of Opacus's ``PrivacyEngine``, a few names are the whole public entry:

- :func:`make_private` wraps a module and its optimizer for DP-SGD (per-sample gradients through
  every fedvox sampler, :mod:`fedvox.client.dp.samplers`, clipped and noised by the DP optimizer);
- :class:`Trainer` runs one privacy-accounted release at a time for a stage's :class:`Task`:
  it plans the noise (:class:`PrivacyPlan`, :class:`RoundPlan`), refuses past the budget, trains
  with Poisson logical batches split into physical ones, charges the :class:`Ledger`, and saves
  and restores itself (``state_dict``/``load_state_dict``) for resume.

Importing the package registers every per-sample gradient sampler with Opacus.
"""

from fedvox.client.dp.engine import PrivateModel, make_private
from fedvox.client.dp.task import Task
from fedvox.client.dp.trainer import PrivacyPlan, ReleaseResult, RoundPlan, Trainer
from fedvox.shared.privacy.ledger import Ledger

__all__ = ["Ledger", "PrivacyPlan", "PrivateModel", "ReleaseResult", "RoundPlan", "Task", "Trainer", "make_private"]
