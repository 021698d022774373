"""Intelligibility: word error rate of an offline English recogniser on what a model said.

pocketsphinx (CMU Sphinx; BSD) ships a US-English acoustic model, a 3-gram language model and
the CMU pronouncing dictionary inside its wheel, so recognition needs no download. WER is
jiwer's (substitutions + deletions + insertions over reference words) after both sides are
lower-cased and stripped of punctuation.

Limits, measured (docs/simulation.md): pocketsphinx recognises flite's CMU voices well (0-20 %
WER on short sentences) but not espeak-ng's formant voices (80-100 %), so on espeak-ng speakers
the recordings' own WER (the ceiling) is high and differences between models are small. English
only: Mandarin utterances get no WER.

The decoder keeps at most :data:`MAX_HMMS_PER_FRAME` active HMMs per frame (pocketsphinx's
default is 30,000): on the simulation's test sentences that made recognition 2.7-3x faster
with the same hypotheses on 7 of 8 flite sentences (WER 0.42 against 0.43 with the default) and
mean WER 0.942 against 0.947 on espeak-ng recordings (docs/simulation.md); recognition was the
costliest metric of speech-quality scoring.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
MAX_HMMS_PER_FRAME = 3000
_WORD = re.compile(r"[a-z0-9']+")


def normalise(text: str) -> str:
    """Lower case, words only (apostrophes kept), single spaces."""
    return " ".join(_WORD.findall(text.lower()))


@lru_cache(maxsize=1)
def _decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", maxhmmpf=MAX_HMMS_PER_FRAME)


def transcribe(wave: np.ndarray, sample_rate: int) -> str:
    """pocketsphinx's best hypothesis for an English utterance (peak-normalised first)."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        wave = librosa.resample(wave, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    peak = float(np.abs(wave).max(initial=0.0))
    if peak == 0.0:
        return ""
    pcm = (wave / peak * 0.5 * 32767).astype(np.int16).tobytes()
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
    return hypothesis.hypstr if hypothesis is not None else ""


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of ``hypothesis`` against ``reference`` (can exceed 1 with insertions)."""
    import jiwer

    reference, hypothesis = normalise(reference), normalise(hypothesis)
    if not reference:
        raise ValueError("the reference transcript has no words")
    return float(jiwer.wer(reference, hypothesis)) if hypothesis else 1.0


__all__ = ["normalise", "transcribe", "word_error_rate"]
