"""Can the base speak? Intelligibility of its English on validation sentences of its own voices.

For each chosen validation utterance (an English voice of the corpus, a sentence never trained
on), three waveforms are transcribed by pocketsphinx and scored by word error rate against the
text: the corpus recording itself (the ceiling the recogniser allows on this synthetic speech);
s2 alone, decoding the recording's own semantic codes (what the SoVITS stage can say); and the
full text-to-speech path, s1 then s2 (what the base says from text), prompted as GPT-SoVITS's
inference and the simulation's scoring prompt it: with another recording of the same voice and
its transcript. silero-vad's speech fraction of the text-to-speech output says whether it is
speech at all, and its length against the recording's whether s1 said the whole sentence.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedvox.client.data.listfile import Entry, read_list
from fedvox.client.synthesize import Voice, read_reference, synthesize
from fedvox.shared.audio import SAMPLE_RATE, linear_spectrogram
from fedvox.shared.models.s1 import Text2SemanticDecoder
from fedvox.shared.models.s2 import SynthesizerTrn
from fedvox.shared.semantic import FallbackTokenizer
from fedvox.shared.text import phonemize
from fedvox.simulations.quality.activity import speech_fraction
from fedvox.simulations.quality.intelligibility import transcribe, word_error_rate

log = logging.getLogger(__name__)


def evaluate_speech(
    corpus: Path, s1: Text2SemanticDecoder, s2: SynthesizerTrn, utterances: int = 8, seed: int = 0
) -> dict:
    """Mean WER of recordings, s2 resynthesis and s1+s2 synthesis over English validation utterances."""
    entries = [e for e in read_list(corpus / "valid.list") if isinstance(e, Entry) and e.language == "en"]
    first = list({e.speaker: e for e in reversed(entries)}.values())[::-1]  # one per voice, corpus order
    chosen = [first[int(i)] for i in np.unique(np.linspace(0, len(first) - 1, utterances).round())]
    references = {e.speaker: e for e in read_list(corpus / "train.list") if isinstance(e, Entry) and e.language == "en"}
    tokenizer = FallbackTokenizer()
    voice = Voice(s1.eval(), s2.eval())
    rows = []
    for k, entry in enumerate(chosen):
        wave = read_reference(corpus / entry.audio_path)
        reference = read_reference(corpus / references[entry.speaker].audio_path)
        phonemes = torch.tensor([phonemize(entry.text, "en", s1.config.symbols_version).ids])
        generator = torch.Generator().manual_seed(seed + k)
        with torch.inference_mode():
            codes = tokenizer.encode(wave).unsqueeze(0)
            resynthesis = s2.decode(codes, phonemes, linear_spectrogram(reference).unsqueeze(0), generator=generator)
        prompt = references[entry.speaker]
        spoken = synthesize(
            voice, entry.text, "en", reference, tokenizer, reference_text=prompt.text, seed=seed + k
        ).numpy()
        rows.append(
            {
                "wer_recording": word_error_rate(entry.text, transcribe(wave.numpy(), SAMPLE_RATE)),
                "wer_s2_resynthesis": word_error_rate(entry.text, transcribe(resynthesis[0, 0].numpy(), SAMPLE_RATE)),
                "wer_text_to_speech": word_error_rate(entry.text, transcribe(spoken, SAMPLE_RATE)),
                "tts_speech_fraction": speech_fraction(spoken, SAMPLE_RATE),
                "tts_seconds": len(spoken) / SAMPLE_RATE,
                "tts_length_ratio": len(spoken) / len(wave),  # both 32 kHz
            }
        )
    return {
        "method": "pocketsphinx WER (jiwer) on English validation sentences of corpus voices; "
        "s2_resynthesis decodes the recording's own semantic codes",
        "utterances": len(rows),
        "voices": sorted({e.speaker for e in chosen}),
        "mean": {key: round(float(np.mean([r[key] for r in rows])), 4) for key in rows[0]},
    }
