"""g2pW polyphones (``--g2pw``): the model's inputs, its reading through the tables and the
post-processing, against a restatement of GPT-SoVITS's ``text/g2pw`` on a small model we make in
g2pW.onnx's format (same input/output names, ranks and dtypes) with tables in the official formats."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from fedvox.shared.errors import CheckpointError, ConfigError  # noqa: E402
from fedvox.shared.text import phonemize  # noqa: E402
from fedvox.shared.text.g2pw import G2pwSpec, g2pw_spec, model_inputs  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + list("我說行長很。.他在銀工作人走了業度,") + ["ab", "##c", "12"]
POLYPHONIC = [("行", "ㄒㄧㄥ2"), ("行", "ㄏㄤ2"), ("長", "ㄔㄤ2"), ("長", "ㄓㄤ3"), ("一", "ㄧ1"), ("一", "ㄧ2")]
MONOPHONIC = [("他", "ㄊㄚ4"), ("似", "ㄙ4")]  # 他 ta4 (pypinyin: ta1) shows the table is read
BOPOMOFO = {"ㄒㄧㄥ": "xing", "ㄏㄤ": "hang", "ㄔㄤ": "chang", "ㄓㄤ": "zhang", "ㄧ": "yi", "ㄊㄚ": "ta", "ㄙ": "si"}
LABELS = sorted({bopomofo for _, bopomofo in POLYPHONIC})
# The crafted model: the reading of a polyphone is decided by the token after it.
NEXT_TOKEN_READS = {"長": "ㄏㄤ2", "很": "ㄓㄤ3", "人": "ㄏㄤ2"}
DEFAULT_READS = ("ㄒㄧㄥ2", "ㄔㄤ2", "ㄧ1")


class NextTokenModel(torch.nn.Module):
    """Probabilities over LABELS from the token after the query, masked to the character's readings."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        table = torch.zeros(len(VOCAB), len(LABELS))
        table[:, [LABELS.index(label) for label in DEFAULT_READS]] = 1.0
        for token, label in NEXT_TOKEN_READS.items():
            table[VOCAB.index(token), LABELS.index(label)] = 5.0
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, token_type_ids, attention_mask, phoneme_mask, char_ids, position_ids):
        rows = input_ids.expand(char_ids.shape[0], -1)  # one encoder row may serve several queries
        after = torch.gather(rows, 1, (position_ids + 1).unsqueeze(1)).squeeze(1)
        unused = (token_type_ids.sum() + attention_mask.sum() + char_ids.sum()).float() * 0.0
        return torch.softmax(self.table[after] + (phoneme_mask - 1.0) * 1e4 + unused, dim=1)


def _export(path: Path, names: tuple[str, ...] = ()) -> None:
    names = names or ("input_ids", "token_type_ids", "attention_mask", "phoneme_mask", "char_ids", "position_ids")
    ids = torch.zeros(2, 5, dtype=torch.long)
    example = (
        ids,
        ids,
        ids,
        torch.ones(2, len(LABELS)),
        torch.zeros(2, dtype=torch.long),
        torch.zeros(2, dtype=torch.long),
    )
    axes = {name: {0: "batch", 1: "tokens"} for name in names[:3]} | {name: {0: "batch"} for name in names[3:]}
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; its output format is not
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            NextTokenModel(names),
            example,
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=["probs"],
            dynamic_axes=axes | {"probs": {0: "batch"}},
        )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("roberta")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _write_tables(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "POLYPHONIC_CHARS.txt").write_text("\n".join(f"{c}\t{b}" for c, b in POLYPHONIC) + "\n", "utf-8")
    (folder / "MONOPHONIC_CHARS.txt").write_text("\n".join(f"{c}\t{b}" for c, b in MONOPHONIC) + "\n", "utf-8")
    (folder / "bopomofo_to_pinyin_wo_tune_dict.json").write_text(json.dumps(BOPOMOFO, ensure_ascii=False), "utf-8")
    (folder / "char_bopomofo_dict.json").write_text(json.dumps({"行": ["ㄒㄧㄥ2", "ㄏㄤ2"]}), "utf-8")
    (folder / "config.py").write_text("model_source = 'bert-base-chinese'\nuse_mask = True\nuse_char_phoneme = False\n")
    return folder


@pytest.fixture(scope="module")
def spec(tmp_path_factory, bert_dir: Path) -> G2pwSpec:
    folder = _write_tables(tmp_path_factory.mktemp("G2PWModel"))
    _export(folder / "g2pW.onnx")
    return g2pw_spec(folder, bert_dir)


# ---------------------------------------------------------------- upstream, restated


def _upstream_tokenize(tokenizer, text: str):
    """g2pW's utils.tokenize_and_map: words are space-free ASCII alnum runs or single characters."""
    words, text2word, word2text = [], [], []
    rest = text
    while rest:
        space = re.match(r"^ +", rest)
        if space:
            text2word += [None] * len(space.group(0))
            rest = rest[len(space.group(0)) :]
            continue
        alnum = re.match(r"^[a-zA-Z0-9]+", rest)
        word = alnum.group(0) if alnum else rest[0]
        word2text.append((len(text2word), len(text2word) + len(word)))
        text2word += [len(words)] * len(word)
        words.append(word)
        rest = rest[len(word) :]
    tokens, token2text = [], []
    for word, (start, end) in zip(words, word2text, strict=True):
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 0 or pieces == ["[UNK]"]:
            token2text.append((start, end))
            tokens.append("[UNK]")
            continue
        for piece in pieces:
            size = len(re.sub(r"^##", "", piece))
            token2text.append((start, start + size))
            start += size
            tokens.append(piece)
    for i, (start, end) in enumerate(token2text):
        for position in range(start, end):
            text2word[position] = i
    return tokens, text2word, token2text


def _upstream_inputs(tokenizer, texts, queries, labels, char2phonemes, max_len=512):
    """g2pW's dataset.prepare_onnx_input (use_mask, no window) with its _truncate."""
    chars = sorted(char2phonemes)
    rows, masks, char_ids, positions = [], [], [], []
    for raw, query in zip(texts, queries, strict=True):
        text = raw.lower()
        tokens, text2token, token2text = _upstream_tokenize(tokenizer, text)
        if len(tokens) > max_len - 2:
            keep = max_len - 2
            first = text2token[query] - keep // 2
            last = first + keep
            if -first > 0:
                first, last = first - first, last - first
            elif last - len(tokens) > 0:
                first, last = first - (last - len(tokens)), len(tokens)
            start, end = token2text[first][0], token2text[last - 1][1]
            text2token = [i - first if i is not None else None for i in text2token[start:end]]
            text, query, tokens = text[start:end], query - start, tokens[first:last]
        rows.append(list(tokenizer.convert_tokens_to_ids(["[CLS]", *tokens, "[SEP]"])))
        masks.append([1 if i in char2phonemes[text[query]] else 0 for i in range(len(labels))])
        char_ids.append(chars.index(text[query]))
        positions.append(text2token[query] + 1)
    width = max(len(row) for row in rows)
    return {
        "input_ids": np.array([row + [0] * (width - len(row)) for row in rows]).astype(np.int64),
        "token_type_ids": np.zeros((len(rows), width)).astype(np.int64),
        "attention_mask": np.array([[1] * len(row) + [0] * (width - len(row)) for row in rows]).astype(np.int64),
        "phoneme_mask": np.array(masks).astype(np.float32),
        "char_ids": np.array(char_ids).astype(np.int64),
        "position_ids": np.array(positions).astype(np.int64),
    }


def _upstream_tables():
    labels = sorted({b for _, b in POLYPHONIC})
    char2phonemes: dict[str, list[int]] = {}
    for char, bopomofo in POLYPHONIC:
        char2phonemes.setdefault(char, []).append(labels.index(bopomofo))
    return labels, char2phonemes


# ---------------------------------------------------------------- tests


def test_model_inputs_are_upstreams(spec: G2pwSpec) -> None:
    g2pw = spec.build()
    assert g2pw.tables.labels == LABELS
    texts = ["我說行長很長。", "行 ab12c長。", "AbC行", "行長" + "我" * 700 + "行", "我" * 600 + "行長" + "我" * 300]
    queries = [2, 0, 3, 702, 601]
    ours = model_inputs(g2pw.tokenizer, g2pw.tables, texts, queries)
    theirs = _upstream_inputs(g2pw.tokenizer, texts, queries, *_upstream_tables())
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert ours["input_ids"].shape[1] == 512  # the long texts were cut to 510 tokens around the query


def test_the_sentence_feed_is_upstreams_with_context_and_dedup(spec: G2pwSpec) -> None:
    g2pw = spec.build()
    feeds = []
    session = g2pw.session

    class Recorder:
        def run(self, names, feed):
            feeds.append(feed)
            return session.run(names, feed)

    g2pw.session = Recorder()  # type: ignore[assignment]
    try:
        sentence = "他" * 20 + "说行长很长。"  # context: 16 characters left of the first polyphone
        result = g2pw.pinyins([sentence])
    finally:
        g2pw.session = session
    traditional = "他" * 20 + "說行長很長。"
    context = traditional[21 - 16 :]
    expected = _upstream_inputs(g2pw.tokenizer, [context] * 3, [16, 17, 19], *_upstream_tables())
    (feed,) = feeds  # one sentence, three queries: one encoder row shared (upstream's sentence dedup)
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(feed[name], expected[name][:1], err_msg=name)
    for name in ("phoneme_mask", "char_ids", "position_ids"):
        np.testing.assert_array_equal(feed[name], expected[name], err_msg=name)
    assert result == [["ta4"] * 20 + ["shuo1", "hang2", "zhang3", "hen3", "chang2", "。"]]


def test_phones_follow_the_model_the_corrections_and_sandhi(spec: G2pwSpec) -> None:
    # The crafted model: 行 before 長 -> hang2, 長 before 很 -> zhang3, 長 at the end -> chang2, so
    # the merged word 很长 keeps hen3 (pypinyin reads zhang3 there and the 3-3 rule gives hen2).
    assert phonemize("我说行长很长。", "zh", "v2", spec).phones == (
        ["w", "o3", "sh", "uo1", "h", "ang2", "zh", "ang3", "h", "en3", "ch", "ang2", "."]
    )
    assert phonemize("我说行长很长。", "zh", "v2").phones[-5:] == ["h", "en2", "zh", "ang3", "."]  # pypinyin
    # 他 from the monophonic table (ta4; pypinyin ta1); 行人: the model says hang2, GPT-SoVITS's
    # correction dictionary xing2; 银行: the dictionary's yin2 hang2.
    assert phonemize("行人走了。", "zh", "v2", spec).phones == ["x", "ing2", "r", "en2", "z", "ou3", "l", "e5", "."]
    assert phonemize("他在银行工作。", "zh", "v2", spec).phones[:8] == ["t", "a4", "z", "ai4", "y", "in2", "h", "ang2"]
    # v1 (chinese.py) never used g2pW
    assert phonemize("我说行长很长。", "zh", "v1", spec) == phonemize("我说行长很长。", "zh", "v1")


def test_a_folder_missing_a_file_is_refused_in_one_line(tmp_path: Path, bert_dir: Path) -> None:
    folder = _write_tables(tmp_path / "G2PWModel")
    with pytest.raises(CheckpointError, match=r"lacks g2pW\.onnx") as error:
        g2pw_spec(folder, bert_dir)
    assert "\n" not in str(error.value)
    _export(folder / "g2pw.onnx")
    (folder / "MONOPHONIC_CHARS.txt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks MONOPHONIC_CHARS\.txt"):
        g2pw_spec(folder, bert_dir)
    with pytest.raises(ConfigError, match="--g2pw needs --bert"):
        g2pw_spec(folder, None)


def test_a_model_with_another_signature_is_refused(tmp_path: Path, bert_dir: Path) -> None:
    folder = _write_tables(tmp_path / "G2PWModel")
    names = ("input_ids", "token_type_ids", "attention_mask", "phoneme_mask", "char_id", "position_ids")
    _export(folder / "g2pW.onnx", names)
    with pytest.raises(CheckpointError, match="is not GPT-SoVITS's g2pW model") as error:
        g2pw_spec(folder, bert_dir).build()
    assert "\n" not in str(error.value)


def test_prepare_keys_the_cache_on_the_model_and_says_which_reader_was_used(spec: G2pwSpec, tmp_path: Path) -> None:
    from fedvox.client.data.cache import FeatureCache
    from fedvox.client.data.extractors import ExtractorSpecs
    from fedvox.client.data.prepare import prepare
    from fedvox.shared.bert import bert_spec
    from fedvox.shared.semantic import file_digest, tokenizer_spec
    from tests.data_fixtures import write_good_set
    from tests.extractor_fixtures import write_roberta

    roberta = write_roberta(tmp_path / "roberta")
    good = write_good_set(tmp_path / "good", source="pseudo")
    options = {
        "tokenizer": tokenizer_spec(),
        "symbols_version": "v2",
        "workers": 1,
        "show_progress": False,
        "extractors": ExtractorSpecs(bert=bert_spec(roberta, "cpu")),
    }
    plain = prepare(good, tmp_path / "plain", **options)
    read = prepare(good, tmp_path / "g2pw", g2pw=g2pw_spec(spec.model_dir, roberta), **options)
    assert any("read by pypinyin (no --g2pw)" in note for note in plain.notes)
    name = f"g2pw-{file_digest(spec.model_file)}"
    assert any(f"read by g2pW ({name})" in note for note in read.notes)
    index = FeatureCache(tmp_path / "g2pw").read_index()
    assert index.settings.g2pw == name and FeatureCache(tmp_path / "plain").read_index().settings.g2pw == ""
    zh = [item.id for item in index.items if item.language.lower() == "zh"]
    assert zh and not set(zh) & {item.id for item in FeatureCache(tmp_path / "plain").read_index().items}


def test_prepare_refuses_g2pw_without_bert(spec: G2pwSpec, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedvox.client.cli import app

    listing = tmp_path / "voice.list"
    listing.write_text("a.wav|me|zh|你好。\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["prepare", str(listing), "--out", str(tmp_path / "cache"), "--g2pw", spec.model_dir]
    )
    assert isinstance(result.exception, ConfigError)  # run_cli prints it as one error: line, exit 2
    assert "--g2pw needs --bert" in str(result.exception) and "\n" not in str(result.exception)
