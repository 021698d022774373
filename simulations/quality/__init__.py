"""Speech-quality metrics: does a synthesised utterance sound like its speaker, and can it be understood?

Losses say whether a model fits held-out tokens; these say what a listener would notice. Every
metric runs offline on the CPU from models that ship inside their wheels:

- :mod:`.speaker`: speaker similarity, cosine of GE2E d-vectors (resemblyzer's pretrained encoder).
- :mod:`.intelligibility`: word error rate of pocketsphinx's English recogniser (jiwer).
- :mod:`.distortion`: mel-cepstral distortion after DTW against a recording of the same sentence.
- :mod:`.activity`: speech fraction by silero-vad, and whether a waveform is speech at all.
- :mod:`.scoring`: all of them per utterance, and bootstrap confidence intervals over groups.
"""
