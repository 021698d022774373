"""Wire format and update validation: values, int8 deltas, the screen on what was decoded."""

import math

import pytest
import torch
from flwr.app import Array

from fedvox.shared.errors import ConfigError, UpdateRejected
from fedvox.shared.wire import (
    LEVELS,
    PACKED,
    dequantize,
    encode_update,
    from_record,
    from_wire,
    pack,
    quantize,
    read_update,
    record_bytes,
    to_record,
    to_wire,
    validate_update,
)


def _state():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


def test_fp16_round_trip_halves_the_payload_and_stays_close():
    state = _state()
    fp32, fp16 = to_wire(state, "fp32"), to_wire(state, "fp16")
    assert [(a.stype, a.dtype) for a in fp16.values()] == [(PACKED, "fp16")]  # one array, whatever the subset
    assert record_bytes(fp16) < record_bytes(fp32)
    back = from_wire(fp16)
    assert list(back) == list(state) and all(back[k].dtype == torch.float32 for k in state)
    assert all(torch.allclose(back[k], state[k], atol=1e-3) for k in state)
    assert all(torch.equal(from_wire(fp32)[k], state[k]) for k in state)
    assert all(torch.equal(from_record(to_record(state))[k], state[k]) for k in state)  # the server's own records


def test_bf16_cannot_be_chosen_for_the_wire():
    with pytest.raises(ConfigError, match="bf16"):
        to_wire(_state(), "bf16")


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


# ---------------------------------------------------------------------- int8 deltas
def _lora_pair():
    """A LoRA factor pair's deltas (A: rank x in, B: out x rank), columns of B on different scales."""
    g = torch.Generator().manual_seed(1)
    return {
        "proj.lora_A": 1e-3 * torch.randn(4, 64, generator=g),
        "proj.lora_B": torch.randn(48, 4, generator=g) * torch.tensor([1e-4, 1e-3, 1e-2, 1e-1]),
        "norm.bias": 1e-2 * torch.randn(16, generator=g),
    }


def _received(delta):
    g = torch.Generator().manual_seed(2)
    return {name: torch.randn(d.shape, generator=g).half().float() for name, d in delta.items()}


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_delta_round_trip_stays_within_one_step_of_its_slice(encoding):
    delta = _lora_pair()
    received = _received(delta)
    trained = {name: received[name] + d for name, d in delta.items()}
    record = encode_update(trained, received, encoding, torch.Generator().manual_seed(0))
    update = read_update(record)
    assert update.encoding == encoding and update.relative
    levels = LEVELS[encoding]
    for name in delta:
        exact = trained[name] - received[name]  # what fp32 arithmetic on the device gave
        scales, _ = quantize(exact, levels, torch.Generator())
        # one scale per rank component (A's rows, B's columns), one for a vector
        assert scales.numel() == {"proj.lora_A": 4, "proj.lora_B": 4, "norm.bias": 1}[name]
        step = exact.abs().amax(dim=1, keepdim=True) if name == "proj.lora_A" else exact.abs().amax(dim=0)
        error = (update[name] - exact).abs()
        assert bool((error <= step / levels * 1.0001).all())
        assert update[name].dtype == torch.float32
        assert error.max() > 0  # it really was rounded


def test_int8_and_int4_payloads_are_a_quarter_and_an_eighth_of_fp32_before_deflate():
    delta = _lora_pair()
    received = _received(delta)
    trained = {name: received[name] + d for name, d in delta.items()}
    int8 = encode_update(trained, received, "int8", torch.Generator().manual_seed(0))
    fp32 = encode_update(trained, received, "fp32", torch.Generator())
    elements = sum(d.numel() for d in delta.values())
    assert _tensor_bytes(int8) <= elements + 4 * 9  # one byte a value, nine fp32 scales; deflated only if smaller
    assert _tensor_bytes(int8) < _tensor_bytes(fp32) / 3.5 and _tensor_bytes(fp32) == 4 * elements
    int4 = encode_update(trained, received, "int4", torch.Generator().manual_seed(0))
    assert _tensor_bytes(int4) <= (elements + 3) // 2 + 4 * 9  # odd tensors pad a nibble


def _tensor_bytes(record):
    """A packed record's bytes after its manifest (a few dozen bytes a tensor: names and shapes)."""
    (array,) = record.values()
    return len(array.data) - 4 - int.from_bytes(array.data[:4], "little")


def test_deflate_is_used_only_where_it_pays():
    g = torch.Generator().manual_seed(3)
    sparse = torch.zeros(32, 256)
    sparse[:, :8] = torch.randn(32, 8, generator=g)  # mostly zero: deflates well
    dense = torch.rand(32, 256, generator=g) * 2 - 1  # uniform over the range: 8 bits of entropy a value
    zero = {"sparse": torch.zeros(32, 256), "dense": torch.zeros(32, 256)}
    record = encode_update({"sparse": sparse, "dense": dense}, zero, "int8", torch.Generator().manual_seed(0))
    decoded = read_update(record)
    assert decoded.deflated_tensors == 1  # the sparse one
    assert record_bytes(record) < 32 * 256 * (1 + 1 / 4) + 4 * 64 + 200
    raw = encode_update(
        {"sparse": sparse, "dense": dense}, zero, "int8", torch.Generator().manual_seed(0), deflate=False
    )
    assert read_update(raw).deflated_tensors == 0 and record_bytes(raw) > record_bytes(record) + 32 * 256 / 2
    for name, value in {"sparse": sparse, "dense": dense}.items():
        assert float((decoded[name] - value).abs().max()) <= float(value.abs().max()) / 127 * 1.0001


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(encoding):
    delta = _lora_pair()["proj.lora_B"]
    levels = LEVELS[encoding]
    draws = 2000
    total = torch.zeros_like(delta, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        total += dequantize(*quantize(delta, levels, generator)).double()
    mean = total / draws
    # Each draw's error is zero-mean with |error| < step; the mean of n draws has std < step / (2 sqrt n).
    step = (delta.abs().amax(dim=0) / levels).double()
    assert bool(((mean - delta.double()).abs() <= 5 * step / (2 * draws**0.5)).all())
    # Nearest rounding would be biased by up to half a step; this data has such offsets to find.
    nearest = (torch.round(delta / (step.float())) * step.float()).double()
    assert float((nearest - delta.double()).abs().max()) > 10 * float((mean - delta.double()).abs().max())


def test_the_screen_reads_the_decoded_delta_and_its_norm():
    delta = _lora_pair()
    received = _received(delta)
    trained = {name: received[name] + d for name, d in delta.items()}
    update = read_update(encode_update(trained, received, "int8", torch.Generator().manual_seed(0)))
    norm = validate_update(received, update, max_update_norm=10.0)
    decoded = math.sqrt(sum(float(update[n].double().pow(2).sum()) for n in delta))
    assert norm == pytest.approx(decoded, rel=1e-6)
    assert norm == pytest.approx(math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values())), rel=1e-2)
    with pytest.raises(UpdateRejected, match=r"^norm:"):
        validate_update(received, update, max_update_norm=0.5 * norm)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda s: s["proj.lora_A"].__setitem__((0, 0), float("nan")), "nonfinite"),
        (lambda s: s.__setitem__("proj.lora_A", torch.zeros(5, 64)), "shape"),
        (lambda s: s.pop("norm.bias"), "keys"),
    ],
)
def test_malformed_int8_updates_are_rejected_with_their_reason(mutate, reason):
    received = _received(_lora_pair())
    trained = {name: t + 1e-3 for name, t in received.items()}
    mutate(trained)
    with pytest.raises(UpdateRejected, match=f"^{reason}:"):
        record = encode_update(
            trained, {**received, "proj.lora_A": torch.zeros(trained["proj.lora_A"].shape)}, "int8", torch.Generator()
        )
        validate_update(received, read_update(record))


def _repacked(record, data=None, dtype=None):
    (array,) = record.values()
    data = array.data if data is None else data
    return type(record)({"subset": Array(dtype=dtype or array.dtype, shape=(len(data),), stype=array.stype, data=data)})


def test_corrupt_or_foreign_arrays_are_rejected_as_encoding():
    received = _received(_lora_pair())
    record = encode_update({n: t + 1e-3 for n, t in received.items()}, received, "int8", torch.Generator())
    (array,) = record.values()
    for corrupt in (
        _repacked(record, data=array.data[:-1]),  # the manifest no longer tiles the bytes
        _repacked(record, data=array.data + b"\x00"),
        _repacked(record, data=b"\xff\xff\x00\x00" + array.data[4:]),  # a manifest longer than the array
        _repacked(record, data=array.data[:4] + b"x" + array.data[5:]),  # not JSON
        _repacked(record, dtype="float64"),
        _repacked(record, dtype="int4"),  # int8 bytes read as int4: the sizes disagree
    ):
        with pytest.raises(UpdateRejected, match=r"^encoding:"):
            validate_update(received, read_update(corrupt))
    segments = {n: (tuple(t.shape), t.half().numpy().tobytes(), True) for n, t in received.items()}
    with pytest.raises(UpdateRejected, match=r"^encoding: an fp16 tensor .* deflated"):
        validate_update(received, read_update(pack(segments, "fp16")))
    twice = pack({"a": ((1,), b"\x00\x00", False)}, "fp16")
    (one,) = twice.values()
    twice_data = one.data.replace(b'[["a",[1],2,false]]', b'[["a",[1],1,false],["a",[1],1,false]]')
    twice_data = len(twice_data[4:].split(b"]]}")[0] + b"]]}").to_bytes(4, "little") + twice_data[4:]
    with pytest.raises(UpdateRejected, match=r"^encoding: .*distinct"):
        read_update(_repacked(twice, data=twice_data))


def test_a_record_of_another_protocol_is_refused_clearly():
    per_tensor = to_record(_state(), "fp16")  # protocol 2: one array per tensor
    with pytest.raises(
        UpdateRejected, match=r"^encoding: expected one fedvox.packed array \(fedvox protocol 3\), got 2"
    ):
        read_update(per_tensor)
    with pytest.raises(UpdateRejected, match=r"^encoding: expected values"):
        from_wire(encode_update(_state(), _state(), "int8", torch.Generator()))


def test_a_plan_of_another_protocol_version_is_refused_clearly():
    from fedvox.shared.errors import ProtocolError
    from fedvox.shared.protocol import PROTOCOL, PROTOCOL_VERSION, Plan
    from fedvox.shared.runconfig import RunConfig

    record = Plan(RunConfig(), 1, "run", "a").to_record()
    assert record[PROTOCOL] == PROTOCOL_VERSION and Plan.from_record(record).config.update_encoding == "int4"
    record[PROTOCOL] = 2  # a server that sends one array per tensor
    with pytest.raises(ProtocolError, match="server speaks fedvox protocol 2, this client 3: run the same fedvox"):
        Plan.from_record(record)
    del record[PROTOCOL]  # a server from before int8 deltas
    with pytest.raises(ProtocolError, match="server speaks fedvox protocol 1, this client 3"):
        Plan.from_record(record)


def test_the_same_subset_is_the_same_bytes_whatever_its_order():
    state = _state()
    backwards = dict(reversed(list(state.items())))
    assert list(backwards) != list(state)
    (a,), (b,) = to_wire(state, "fp16").values(), to_wire(backwards, "fp16").values()
    assert a.data == b.data  # a device's reply cache knows a re-sent question by its bytes
    up = [encode_update(s, state, "int8", torch.Generator().manual_seed(1)) for s in (state, backwards)]
    assert up[0]["subset"].data == up[1]["subset"].data
