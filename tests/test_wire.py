"""Wire format and update validation."""

import pytest
import torch

from fedvox.shared.errors import ConfigError, UpdateRejected
from fedvox.shared.wire import from_record, record_bytes, to_record, validate_update


def _state():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


def test_fp16_round_trip_halves_the_payload_and_stays_close():
    state = _state()
    fp32, fp16 = to_record(state, "fp32"), to_record(state, "fp16")
    assert record_bytes(fp16) < record_bytes(fp32)
    back = from_record(fp16)
    assert all(back[k].dtype == torch.float32 for k in state)
    assert all(torch.allclose(back[k], state[k], atol=1e-3) for k in state)
    assert all(torch.equal(from_record(fp32)[k], state[k]) for k in state)


def test_bf16_cannot_be_chosen_for_the_wire():
    with pytest.raises(ConfigError, match="bf16"):
        to_record(_state(), "bf16")


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda s: s.pop("b.bias"), "keys"),
        (lambda s: s.__setitem__("extra", torch.zeros(1)), "keys"),
        (lambda s: s.__setitem__("a.weight", torch.zeros(3, 4)), "shape"),
        (lambda s: s.__setitem__("b.bias", torch.zeros(5, dtype=torch.long)), "dtype"),
        (lambda s: s["a.weight"].__setitem__((0, 0), float("nan")), "nonfinite"),
        (lambda s: s["a.weight"].__setitem__((0, 0), float("inf")), "nonfinite"),
        (lambda s: s["a.weight"].add_(100.0), "norm"),
    ],
)
def test_malformed_updates_are_rejected_with_their_reason(mutate, reason):
    reference = _state()
    update = {k: v.clone() for k, v in reference.items()}
    mutate(update)
    with pytest.raises(UpdateRejected, match=f"^{reason}:"):
        validate_update(reference, update, max_update_norm=10.0)


def test_a_good_update_passes_and_reports_its_norm():
    reference = _state()
    update = {k: v + 0.1 for k, v in reference.items()}
    norm = validate_update(reference, update, max_update_norm=10.0)
    assert norm == pytest.approx(0.1 * (12 + 5) ** 0.5, rel=1e-5)
