"""Pronunciations of out-of-vocabulary English words: g2p_en's neural model, run in numpy.

GPT-SoVITS predicts words missing from CMUdict with g2p_en's GRU encoder-decoder (graphemes ->
ARPAbet, greedy, at most 20 phones). Its weights (``checkpoint20.npz``, 3.4 MB) ship inside the
g2p_en wheel, but importing g2p_en downloads NLTK data, so the package is never imported: the
file is located through the import system and the network is run here. Same weights, same
greedy decoding, so the same phones as GPT-SoVITS.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

from fedvox.shared.text.package_data import package_file

_GRAPHEMES = ["<pad>", "<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz"]
_PHONEMES = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "AA0",
    "AA1",
    "AA2",
    "AE0",
    "AE1",
    "AE2",
    "AH0",
    "AH1",
    "AH2",
    "AO0",
    "AO1",
    "AO2",
    "AW0",
    "AW1",
    "AW2",
    "AY0",
    "AY1",
    "AY2",
    "B",
    "CH",
    "D",
    "DH",
    "EH0",
    "EH1",
    "EH2",
    "ER0",
    "ER1",
    "ER2",
    "EY0",
    "EY1",
    "EY2",
    "F",
    "G",
    "HH",
    "IH0",
    "IH1",
    "IH2",
    "IY0",
    "IY1",
    "IY2",
    "JH",
    "K",
    "L",
    "M",
    "N",
    "NG",
    "OW0",
    "OW1",
    "OW2",
    "OY0",
    "OY1",
    "OY2",
    "P",
    "R",
    "S",
    "SH",
    "T",
    "TH",
    "UH0",
    "UH1",
    "UH2",
    "UW",
    "UW0",
    "UW1",
    "UW2",
    "V",
    "W",
    "Y",
    "Z",
    "ZH",
]
_GRAPHEME_IDS = {g: i for i, g in enumerate(_GRAPHEMES) if len(g) == 1}
_UNK_GRAPHEME, _END_GRAPHEME = 1, 2
_START_PHONEME, _END_PHONEME = 2, 3
MAX_PHONES = 20


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class GruSeq2Seq:
    """g2p_en's model: one GRU layer each side, 256 units, PyTorch gate order (r, z, n).

    Input projections of every grapheme and phoneme embedding are computed once, so a step is
    two small matrix-vector products (no matrix-matrix product per word).
    """

    def __init__(self, w: dict[str, np.ndarray]) -> None:
        self.enc_in = w["enc_emb"] @ w["enc_w_ih"].T + w["enc_b_ih"]  # [graphemes, 3H]
        self.dec_in = w["dec_emb"] @ w["dec_w_ih"].T + w["dec_b_ih"]  # [phonemes, 3H]
        self.enc_hh = (np.ascontiguousarray(w["enc_w_hh"].T), w["enc_b_hh"])
        self.dec_hh = (np.ascontiguousarray(w["dec_w_hh"].T), w["dec_b_hh"])
        self.out = (np.ascontiguousarray(w["fc_w"].T), w["fc_b"])
        self.hidden = w["enc_w_hh"].shape[1]

    def _step(self, x_proj: np.ndarray, h: np.ndarray, hh: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """One GRU step given the input projection ``x @ w_ih.T + b_ih``."""
        h_proj = h @ hh[0] + hh[1]
        n = self.hidden
        rz = _sigmoid(x_proj[: 2 * n] + h_proj[: 2 * n])
        r, z = rz[:n], rz[n:]
        candidate = np.tanh(x_proj[2 * n :] + r * h_proj[2 * n :])
        return (1.0 - z) * candidate + z * h

    def encode(self, word: str) -> np.ndarray:
        h = np.zeros(self.hidden, np.float32)
        for grapheme in [_GRAPHEME_IDS.get(c, _UNK_GRAPHEME) for c in word] + [_END_GRAPHEME]:
            h = self._step(self.enc_in[grapheme], h, self.enc_hh)
        return h

    def predict(self, word: str) -> list[str]:
        """Greedy decoding from ``<s>`` until ``</s>`` or :data:`MAX_PHONES` phones."""
        h = self.encode(word)
        previous = _START_PHONEME
        phones: list[str] = []
        for _ in range(MAX_PHONES):
            h = self._step(self.dec_in[previous], h, self.dec_hh)
            previous = int(np.argmax(h @ self.out[0] + self.out[1]))
            if previous == _END_PHONEME:
                break
            phones.append(_PHONEMES[previous])
        return phones


@cache
def model() -> GruSeq2Seq:
    with np.load(package_file("g2p_en", "checkpoint20.npz")) as archive:
        return GruSeq2Seq({name: archive[name] for name in archive.files})


@lru_cache(maxsize=1 << 14)
def predict(word: str) -> tuple[str, ...]:
    """ARPAbet phones for a lower-case word (characters outside a-z count as unknown)."""
    return tuple(model().predict(word))
