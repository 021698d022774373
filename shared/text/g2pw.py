"""Mandarin polyphones read by g2pW, as GPT-SoVITS v2 reads them (``chinese2.py``, ``text/g2pw/``).

g2pW is a BERT-based classifier over the readings of polyphonic characters. GPT-SoVITS runs it
as an ONNX model from its ``GPT_SoVITS/text/G2PWModel`` folder (``g2pW.onnx`` and the tables it
was trained with), tokenising with the chinese-roberta-wwm-ext-large tokenizer. For each zh chunk
it converts the text to Taiwan traditional characters (OpenCC ``s2tw``, the tables' script),
asks the model about every polyphonic character (the text cut to 16 characters around the first
and last of them), takes monophonic characters from the table and every other character from
pypinyin; a correction dictionary (``data/g2pw_polyphonic.txt``) then overrides whole words or
single characters before the tone-sandhi rules run (in :mod:`fedvox.shared.text.zh`).

Nothing is downloaded: the user points to the folder GPT-SoVITS ships. The model runs with
onnxruntime (the ``g2pw`` extra) on the CPU.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedvox.shared.errors import CheckpointError, ConfigError, TextError

MODEL_FILES = ("g2pW.onnx", "g2pw.onnx")  # upstream accepts either spelling, in this order
POLYPHONIC_TABLE = "POLYPHONIC_CHARS.txt"
MONOPHONIC_TABLE = "MONOPHONIC_CHARS.txt"
BOPOMOFO_TABLE = "bopomofo_to_pinyin_wo_tune_dict.json"
CONFIG_FILE = "config.py"
TABLES = (POLYPHONIC_TABLE, MONOPHONIC_TABLE, BOPOMOFO_TABLE, CONFIG_FILE)

# The model's inputs: name -> (onnxruntime element type, rank). The output is the class
# probabilities, [batch, labels].
MODEL_INPUTS = {
    "input_ids": ("tensor(int64)", 2),
    "token_type_ids": ("tensor(int64)", 2),
    "attention_mask": ("tensor(int64)", 2),
    "phoneme_mask": ("tensor(float)", 2),
    "char_ids": ("tensor(int64)", 1),
    "position_ids": ("tensor(int64)", 1),
}
CONTEXT_CHARS = 16  # upstream's g2pw_polyphonic_context_chars default
MAX_TOKENS = 512  # [CLS] + 510 tokens + [SEP]
# Characters upstream reads with pypinyin / the model despite the tables (onnx_api.py).
NOT_POLYPHONIC = frozenset("一不和咋嗲剖差攢倒難奔勁拗肖瘙誒泊听噢")
NOT_MONOPHONIC = frozenset("似攢")
_ALNUM_RUN = re.compile(r"[a-zA-Z0-9]+")


@dataclass(frozen=True)
class G2pwSpec:
    """Where the g2pW folder and its tokenizer (the BERT folder) are; picklable, hashable."""

    model_dir: str
    tokenizer_dir: str

    @property
    def model_file(self) -> Path:
        return next(Path(self.model_dir) / name for name in MODEL_FILES if (Path(self.model_dir) / name).is_file())

    def build(self) -> G2pw:
        """The loaded model, once per process."""
        return _load(self)


def g2pw_spec(model_dir: str | Path, tokenizer_dir: str | Path | None) -> G2pwSpec:
    """Check GPT-SoVITS's ``G2PWModel`` folder; ``tokenizer_dir`` is the chinese-roberta folder."""
    if tokenizer_dir is None:
        raise ConfigError(
            "--g2pw needs --bert: g2pW reads text through chinese-roberta-wwm-ext-large's tokenizer, as GPT-SoVITS"
        )
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"no g2pW folder at {folder}: pass GPT-SoVITS's GPT_SoVITS/text/G2PWModel")
    missing = [name for name in TABLES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in MODEL_FILES):
        missing.insert(0, MODEL_FILES[0])
    if missing:
        raise CheckpointError(
            f"the g2pW folder {folder} lacks {', '.join(missing)}: pass GPT-SoVITS's complete "
            "GPT_SoVITS/text/G2PWModel folder (G2PWModel_1.1)"
        )
    return G2pwSpec(str(folder), str(tokenizer_dir))


@cache
def corrections() -> dict[str, list[str]]:
    """GPT-SoVITS's correction dictionary (``polyphonic.rep`` then ``polyphonic-fix.rep``)."""
    text = resources.files("fedvox.shared.text.data").joinpath("g2pw_polyphonic.txt").read_text("utf-8")
    return {word: pinyins.split(" ") for word, pinyins in (line.split("\t") for line in text.splitlines())}


def correct_pronunciation(word: str, pinyins: list[str]) -> list[str]:
    """The dictionary's reading of ``word`` if it has one, else per character where it has one."""
    table = corrections()
    if word in table:
        return list(table[word])
    pinyins = list(pinyins)
    for i, char in enumerate(word):
        if char in table:
            pinyins[i] = table[char][0]
    return pinyins


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text("utf-8").strip().split("\n"), 1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CheckpointError(f"{path}: line {number} is not 'character<TAB>bopomofo'; the file is damaged")
        pairs.append((fields[0], fields[1]))
    return pairs


def _read_config(path: Path) -> dict[str, Any]:
    """The literal settings of g2pW's ``config.py`` (read, never executed), with upstream's defaults."""
    settings: dict[str, Any] = {"use_mask": True, "use_char_phoneme": False}
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in settings:
                try:
                    settings[name] = bool(ast.literal_eval(node.value))
                except ValueError as exc:
                    raise CheckpointError(f"{path}: {name} is not a literal; the file is damaged") from exc
    return settings


@dataclass(frozen=True)
class Tables:
    """g2pW's label space and character tables, as upstream derives them from the folder's files."""

    labels: list[str]
    char2phonemes: dict[str, list[int]]
    char2id: dict[str, int]
    polyphonic: frozenset[str]
    monophonic: dict[str, str]
    bopomofo_to_pinyin: dict[str, str]
    use_mask: bool
    use_char_phoneme: bool

    @classmethod
    def read(cls, folder: Path) -> Tables:
        config = _read_config(folder / CONFIG_FILE)
        polyphonic = _read_pairs(folder / POLYPHONIC_TABLE)
        keys = [f"{char} {bopomofo}" if config["use_char_phoneme"] else bopomofo for char, bopomofo in polyphonic]
        labels = sorted(set(keys))
        index = {label: i for i, label in enumerate(labels)}
        char2phonemes: dict[str, list[int]] = {}
        for (char, _), key in zip(polyphonic, keys, strict=True):
            char2phonemes.setdefault(char, []).append(index[key])
        chars = sorted(char2phonemes)
        monophonic = {char: bopomofo for char, bopomofo in _read_pairs(folder / MONOPHONIC_TABLE)}
        return cls(
            labels=labels,
            char2phonemes=char2phonemes,
            char2id={char: i for i, char in enumerate(chars)},
            polyphonic=frozenset(chars) - NOT_POLYPHONIC,
            monophonic={char: b for char, b in monophonic.items() if char not in NOT_MONOPHONIC},
            bopomofo_to_pinyin=json.loads((folder / BOPOMOFO_TABLE).read_text("utf-8")),
            use_mask=config["use_mask"],
            use_char_phoneme=config["use_char_phoneme"],
        )

    def phoneme_mask(self, char: str) -> list[float]:
        """1 for the labels ``char`` can take (all labels without ``use_mask``)."""
        if not self.use_mask:
            return [1.0] * len(self.labels)
        allowed = set(self.char2phonemes[char])
        return [1.0 if i in allowed else 0.0 for i in range(len(self.labels))]

    def pinyin(self, bopomofo: str) -> str:
        """Toned bopomofo -> toned pinyin through the folder's table (``ㄏㄤ2`` -> ``hang2``)."""
        syllable = self.bopomofo_to_pinyin.get(bopomofo[:-1])
        if not syllable or bopomofo[-1:] not in "12345" or not bopomofo[-1:]:
            raise CheckpointError(
                f"g2pW's {BOPOMOFO_TABLE} has no pinyin for {bopomofo!r}; the G2PWModel folder's tables do not match"
            )
        return syllable + bopomofo[-1]


def tokenize_and_map(tokenizer: Any, text: str) -> tuple[list[str], list[int | None], list[tuple[int, int]]]:
    """g2pW's tokenisation: tokens, the token of each character, the character span of each token.

    Spaces belong to no token; a run of ASCII letters and digits is one word, every other
    character a word of its own; a word the tokenizer cannot read is one ``[UNK]``.
    """
    text2token: list[int | None] = []
    spans: list[tuple[int, int]] = []
    position = 0
    words: list[tuple[str, int]] = []
    while position < len(text):
        if text[position] == " ":
            text2token.append(None)
            position += 1
            continue
        match = _ALNUM_RUN.match(text, position)
        word = match.group(0) if match else text[position]
        words.append((word, position))
        text2token += [len(words) - 1] * len(word)
        position += len(word)
    tokens: list[str] = []
    for word, start in words:
        pieces = tokenizer.tokenize(word)
        if not pieces or pieces == ["[UNK]"]:
            spans.append((start, start + len(word)))
            tokens.append("[UNK]")
            continue
        for piece in pieces:
            length = len(piece[2:] if piece.startswith("##") else piece)
            spans.append((start, start + length))
            start += length
            tokens.append(piece)
    for token, (start, end) in enumerate(spans):
        for char in range(start, end):
            text2token[char] = token
    return tokens, text2token, spans


def _window(tokens: list[str], text2token: list[int | None], spans: list[tuple[int, int]], query: int) -> tuple:
    """Upstream's ``_truncate``: at most 510 tokens centred on the query's token."""
    keep = MAX_TOKENS - 2
    first = text2token[query] - keep // 2  # type: ignore[operator]
    last = first + keep
    if first < 0:
        first, last = 0, keep
    elif last > len(tokens):
        first, last = first - (last - len(tokens)), len(tokens)
    start, end = spans[first][0], spans[last - 1][1]
    return (
        start,
        tokens[first:last],
        [None if token is None else token - first for token in text2token[start:end]],
    )


def model_inputs(tokenizer: Any, tables: Tables, texts: Sequence[str], queries: Sequence[int]) -> dict[str, np.ndarray]:
    """The ONNX feed for ``texts[i]``'s character ``queries[i]`` (upstream's ``prepare_onnx_input``).

    Texts are lower-cased and tokenised between [CLS] and [SEP]; ``position_ids`` is the query's
    token (counting [CLS]); ``char_ids`` indexes the sorted polyphonic characters; rows are padded
    with 0 to the longest.
    """
    rows: list[list[int]] = []
    masks, char_ids, positions = [], [], []
    tokenized: dict[str, tuple[list[str], list[int | None], list[tuple[int, int]]]] = {}
    for raw, query in zip(texts, queries, strict=True):
        text = raw.lower()
        if text not in tokenized:
            tokenized[text] = tokenize_and_map(tokenizer, text)
        tokens, text2token, spans = tokenized[text]
        if len(tokens) > MAX_TOKENS - 2:
            start, tokens, text2token = _window(tokens, text2token, spans, query)
            text, query = text[start:], query - start
        rows.append(tokenizer.convert_tokens_to_ids(["[CLS]", *tokens, "[SEP]"]))
        char = text[query]
        masks.append(tables.phoneme_mask(char))
        char_ids.append(tables.char2id[char])
        positions.append(text2token[query] + 1)  # type: ignore[operator]
    width = max(len(row) for row in rows)
    return {
        "input_ids": np.array([row + [0] * (width - len(row)) for row in rows], dtype=np.int64),
        "token_type_ids": np.zeros((len(rows), width), dtype=np.int64),
        "attention_mask": np.array([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=np.int64),
        "phoneme_mask": np.array(masks, dtype=np.float32),
        "char_ids": np.array(char_ids, dtype=np.int64),
        "position_ids": np.array(positions, dtype=np.int64),
    }


class G2pw:
    """GPT-SoVITS's ``G2PWOnnxConverter`` in pinyin style: per sentence, a toned pinyin per character."""

    def __init__(self, spec: G2pwSpec):
        import onnxruntime

        from fedvox.shared.bert import load_tokenizer
        from fedvox.shared.text.zh_normalize import simplifier

        folder = Path(spec.model_dir)
        self.tables = Tables.read(folder)
        self.tokenizer = load_tokenizer(spec.tokenizer_dir)
        self._to_simplified = simplifier()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2  # as upstream
        try:
            self.session = onnxruntime.InferenceSession(
                str(spec.model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
            raise CheckpointError(f"{spec.model_file} is not a readable ONNX model: {exc}") from exc
        self._check_signature(spec.model_file)

    def _check_signature(self, path: Path) -> None:
        found = {item.name: (item.type, len(item.shape)) for item in self.session.get_inputs()}
        if found != MODEL_INPUTS:
            raise CheckpointError(
                f"{path} is not GPT-SoVITS's g2pW model: its inputs are {found}, expected {MODEL_INPUTS}"
            )
        outputs = self.session.get_outputs()
        labels = outputs[0].shape[-1] if outputs and len(outputs[0].shape) == 2 else None
        if labels is None or (isinstance(labels, int) and labels != len(self.tables.labels)):
            raise CheckpointError(
                f"{path} does not output [batch, {len(self.tables.labels)}] probabilities (one per reading in "
                f"{POLYPHONIC_TABLE}); the model and its tables do not belong together"
            )

    def pinyins(self, sentences: Sequence[str]) -> list[list[str]]:
        """Toned pinyin (``hang2``; punctuation as itself) of every character of each sentence."""
        cc = _s2tw()
        traditional = [cc(sentence) for sentence in sentences]
        texts: list[str] = []
        queries: list[int] = []
        targets: list[tuple[int, int]] = []
        results: list[list[str]] = []
        for number, sentence in enumerate(traditional):
            if len(sentence) != len(sentences[number]):
                raise TextError(
                    f"OpenCC s2tw changed the length of zh text {sentences[number]!r}; g2pW cannot read it",
                    reason="unphonemizable_text",
                )
            fallback = _pypinyin(self._to_simplified(sentence))
            result: list[str] = []
            polyphones: list[int] = []
            for i, char in enumerate(sentence):
                if char in self.tables.polyphonic:
                    polyphones.append(i)
                    result.append("")
                elif char in self.tables.monophonic:
                    result.append(self.tables.pinyin(self.tables.monophonic[char]))
                elif i < len(fallback):
                    result.append(fallback[i][0])
                else:
                    raise TextError(
                        f"pypinyin read zh text {sentences[number]!r} into fewer syllables than characters",
                        reason="unphonemizable_text",
                    )
            if polyphones:
                left = max(0, polyphones[0] - CONTEXT_CHARS)
                context = sentence[left : polyphones[-1] + CONTEXT_CHARS + 1]
                for i in polyphones:
                    texts.append(context)
                    queries.append(i - left)
                    targets.append((number, i))
            results.append(result)
        if texts:
            labels = self._predict(model_inputs(self.tokenizer, self.tables, texts, queries), texts)
            for (number, i), label in zip(targets, labels, strict=True):
                bopomofo = label.split(" ")[1] if self.tables.use_char_phoneme else label
                results[number][i] = self.tables.pinyin(bopomofo)
        return results

    def _predict(self, feed: dict[str, np.ndarray], texts: list[str]) -> list[str]:
        """Labels of each row; rows of one text share one encoder row (upstream's sentence dedup)."""
        groups: dict[str, list[int]] = {}
        for row, text in enumerate(texts):
            groups.setdefault(text, []).append(row)
        if all(len(rows) == 1 for rows in groups.values()):
            return self._run(feed)
        labels = [""] * len(texts)
        for rows in groups.values():
            group = {name: value[rows] for name, value in feed.items()}
            if len(rows) > 1:
                for name in ("input_ids", "token_type_ids", "attention_mask"):
                    group[name] = group[name][:1]
            for row, label in zip(rows, self._run(group), strict=True):
                labels[row] = label
        return labels

    def _run(self, feed: dict[str, np.ndarray]) -> list[str]:
        probs = self.session.run(None, feed)[0]
        return [self.tables.labels[index] for index in np.argmax(probs, axis=1).tolist()]


@cache
def _load(spec: G2pwSpec) -> G2pw:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--g2pw runs g2pW with onnxruntime: pip install 'fedvox[g2pw]'") from exc
    return G2pw(spec)


@cache
def _s2tw() -> Any:
    import opencc

    return opencc.OpenCC("s2tw").convert


def _pypinyin(text: str) -> list[list[str]]:
    from pypinyin import Style, pinyin

    return pinyin(text, neutral_tone_with_five=True, style=Style.TONE3)
