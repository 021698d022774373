"""bench/voice_subsets trains what each candidate names: the s2 default LoRA, the whole generator, or one group."""

import pytest

from bench.voice_subsets import CANDIDATES, candidate_config

PREFIXES = {
    "decoder": ("generator.dec.",),
    "ref_enc": ("generator.ref_enc.",),
    "flow": ("generator.flow.",),
    "text_encoder": ("generator.enc_p.",),
}


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_each_candidate_trains_its_own_part_of_the_generator(name):
    model = candidate_config(name).build_model()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and not any(n.startswith("discriminator.") for n in trained)
    if name in PREFIXES:
        assert all(n.startswith(PREFIXES[name]) for n in trained)
    elif name == "lora":
        assert all(".dec." in n and "lora" in n for n in trained)
    else:
        assert {n.split(".")[1] for n in trained} >= {"dec", "ref_enc", "flow", "enc_p", "enc_q"}
