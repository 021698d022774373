"""bench.communication: the effect of each update encoding on the aggregate, on real DP-SGD updates."""

from bench.communication import effect, full_model_bytes
from fedvox.shared.runconfig import RunConfig


def test_quantised_updates_are_smaller_and_their_error_stays_below_the_dp_noise():
    plan = RunConfig.from_flat({"local-steps": 2, "logical-batch": 4})
    row = effect("tiny", 2, clients=2, plan=plan, phonemes=6, tokens=12, full_bytes=full_model_bytes("s1", "tiny"))
    enc = row["encodings"]
    sizes = [enc[e]["up_payload_bytes"] for e in ("fp32", "fp16", "int8", "int4")]
    # int4 is a quarter of fp16 per value (tests/test_wire.py); each packed record also carries its
    # manifest (names and shapes, about 1 kB here), a large share of a tiny rank-2 subset.
    assert sizes == sorted(sizes, reverse=True) and sizes[3] < sizes[1] / 2.5
    errors = [enc[e]["error_over_noise"] for e in ("fp32", "int8", "int4")]
    assert errors == sorted(errors) and 0 < errors[2] < 1 and row["noise_l2"] > 0
