"""How far can fine-tuning move the voice? Speaker similarity at each stage's ceiling.

    python -m bench.voice_ceiling --speakers-dir out/sim/speakers            # the shipped base
    python -m bench.voice_ceiling --speakers-dir out/sim/speakers --s2 EXPORT/s2G.safetensors

On the simulation's clients (each held-out sentence prompted with another held-out recording of
the speaker, as the report's speech-quality scoring does), four waveforms are scored against the
speaker's voice (the GE2E d-vector centroid of its other held-out recordings):

``recordings``    the speaker's own recording: the ceiling of the metric;
``text to speech``  s1 then s2 from text: what the base says (the report's "base model" row);
``perfect s1``    s2 decoding the recording's own semantic codes: the most any s1, however well
                  fine-tuned, reaches with this s2;
``s2 posterior``  s2's decoder on the recording's own posterior latent (its spectrogram encoded,
                  the mean, no prior): what the decoder renders when handed all of the recording
                  but its waveform.

``perfect s1 - text to speech`` bounds what fine-tuning s1 can add to similarity; a posterior
far below the recordings says the decoder itself cannot yet render these voices. ``--s2``
swaps in another s2 generator (e.g. a newer ``fedvox-sim pretrain-export``) for every row.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer

from bench.common import host, load_average, table, write_json
from fedvox.shared.cli import run_cli

app = typer.Typer(add_completion=False)
ROWS = ("recordings", "text to speech", "perfect s1", "s2 posterior")


def stage_waveforms(s2: Any, item: Any, tokenizer: Any, symbols_version: str, seed: int) -> dict[str, np.ndarray]:
    """``perfect s1`` and ``s2 posterior`` for one test item, from s2 alone."""
    from fedvox.client.synthesize import read_reference
    from fedvox.shared.audio import linear_spectrogram
    from fedvox.shared.text import phonemize

    recording = read_reference(item.recording).float()
    spec = linear_spectrogram(recording).unsqueeze(0)
    reference = linear_spectrogram(read_reference(item.prompt).float()).unsqueeze(0)
    phonemes = torch.tensor([phonemize(item.text, item.language, symbols_version).ids])
    with torch.inference_mode():
        codes = tokenizer.encode(recording).unsqueeze(0)
        perfect = s2.decode(codes, phonemes, reference, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(1, 1, spec.shape[-1])
        ge, _ = s2.global_embedding(spec, mask, None)
        latent, _, _ = s2.enc_q(spec, mask, ge, torch.zeros(1, s2.config.inter_channels, spec.shape[-1]))
        posterior = s2.dec(latent, ge)
    return {"perfect s1": perfect[0, 0].numpy(), "s2 posterior": posterior[0, 0].numpy()}


def ceilings(
    speakers_dir: Path, sentences: int, s2_weights: Path | None, seed: int
) -> dict[str, dict[str, float | None]]:
    """Similarity of every row by test item key (``speaker#i``)."""
    from fedvox.shared.audio import SAMPLE_RATE
    from fedvox.shared.models.factory import build_model
    from fedvox.shared.models.subsets import trainable_state_dict
    from fedvox.shared.runconfig import RunConfig
    from fedvox.shared.semantic import tokenizer_spec
    from fedvox.shared.stages import recipe
    from fedvox.simulations.quality import scoring
    from fedvox.simulations.quality.compare import Contender, speak
    from fedvox.simulations.sample import PLAIN, build_voice

    config = RunConfig()
    base = config.build_model()
    voice = build_voice(config, trainable_state_dict(base))
    if s2_weights is not None:  # the voice is built once per process: speak() below renders with this s2 too
        generator = recipe("s2").voice_model(build_model("s2", config.model_config, PLAIN, pretrained=s2_weights))
        voice.s2.load_state_dict(generator.state_dict())
    items = [
        item
        for folder in sorted(p for p in (speakers_dir / "clients").iterdir() if p.is_dir())
        for item in scoring.test_items(folder.name, folder, sentences)
    ]
    tokenizer = tokenizer_spec().build()
    rows: dict[str, dict[str, float | None]] = {row: {} for row in ROWS}
    spoken = speak(config, Contender("base", trainable_state_dict(base)), items, seed)
    for item in items:
        rows["recordings"][item.key] = scoring.score_recording(item)["similarity"]
        rows["text to speech"][item.key] = spoken[item.key]["similarity"]
        for row, wave in stage_waveforms(voice.s2, item, tokenizer, voice.symbols_version, seed).items():
            rows[row][item.key] = scoring.score(wave, SAMPLE_RATE, item, with_mcd=False)["similarity"]
    return rows


@app.command()
def main(
    speakers_dir: Path = typer.Option(..., help="A `fedvox-sim speakers` folder (e.g. out/sim/speakers)."),
    sentences: int = typer.Option(2, help="Held-out sentences per speaker (the report's default 2)."),
    s2: Path | None = typer.Option(None, "--s2", help="Another s2 generator (safetensors) instead of the base's."),
    seed: int = typer.Option(0, help="Synthesis seed."),
    out: Path | None = typer.Option(None, help="JSON result path (default runs/bench/voice_ceiling.json)."),
) -> None:
    """Speaker similarity of recordings, the base's speech, a perfect s1 and s2's posterior."""
    from fedvox.simulations.quality.scoring import cluster_bootstrap, paired_differences

    torch.set_num_threads(1)
    load = load_average()
    rows = ceilings(speakers_dir, sentences, s2, seed)
    estimates = {row: cluster_bootstrap(values) for row, values in rows.items()}
    pairs = {
        f"{a} - {b}": cluster_bootstrap(paired_differences(rows[a], rows[b]))
        for a, b in (
            ("perfect s1", "text to speech"),
            ("s2 posterior", "text to speech"),
            ("recordings", "s2 posterior"),
        )
    }
    result = {
        "host": host(torch.device("cpu")),
        "load-average": [load, load_average()],
        "s2": str(s2) if s2 else "the shipped base",
        "similarity": rows,
        "estimates": {k: asdict(v) if v else None for k, v in {**estimates, **pairs}.items()},
    }
    path = write_json(result, out, "voice_ceiling")
    print(
        table(
            ["speaker similarity", "mean", "95 % CI", "speakers"],
            [
                [k, f"{v.mean:+.3f}" if " - " in k else f"{v.mean:.3f}", f"{v.low:.3f} to {v.high:.3f}", v.speakers]
                for k, v in {**estimates, **pairs}.items()
                if v
            ],
        )
    )
    print(f"{path}")


if __name__ == "__main__":
    run_cli(app)
