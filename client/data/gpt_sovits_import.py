"""``prepare --from-gpt-sovits DIR``: a GPT-SoVITS experiment folder into fedvox's feature cache.

GPT-SoVITS's preparation (webui tab 1A) writes, under ``logs/<experiment>/``:

    2-name2text.txt        name<TAB>phones (space-separated)<TAB>word2ph<TAB>normalised text
    3-bert/<name>.pt       zh only: [1024, phones] RoBERTa features
    4-cnhubert/<name>.pt   [1, 768, T50] chinese-hubert-base features
    5-wav32k/<name>        the loudness-mixed clip, 16-bit PCM at 32 kHz
    6-name2semantic.tsv    header "item_name<TAB>semantic_audio", then name<TAB>codes (25 Hz)
    7-sv_cn/<name>.pt      v2Pro: [1, 20480] speaker embedding

The list file it was made from gives each utterance's speaker and language (the name is the
audio path's base name). Every utterance is checked as ``prepare`` checks recordings (same
reasons, same report), plus: its files exist and have the shapes above, its phones are in the
symbol table's phone set, and its semantic codes are the ones the given s2's ``ssl_proj`` and
codebook make from its HuBERT features (so the tokens came from that s2). Nothing in the
experiment folder is modified.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedvox.client.data.cache import CachedItem, FeatureCache, FeatureSettings, item_id
from fedvox.client.data.checks import AudioLimits, check_audio
from fedvox.client.data.extractors import ExtractorSpecs
from fedvox.client.data.features import SAMPLES_PER_TOKEN, Features, to_pcm16
from fedvox.client.data.listfile import Entry, read_list
from fedvox.client.data.reasons import Reason, Rejected, Rejection
from fedvox.client.data.report import PrepareReport
from fedvox.shared.audio import SAMPLE_RATE, read_audio
from fedvox.shared.bert import BERT_DIM
from fedvox.shared.cli import progress
from fedvox.shared.errors import ConfigError, DataError
from fedvox.shared.semantic import TokenizerSpec
from fedvox.shared.speaker import SV_DIM
from fedvox.shared.text.symbols import UNK, phones_to_ids, symbol_to_id

log = logging.getLogger(__name__)

NAME2TEXT = "2-name2text.txt"
NAME2SEMANTIC = "6-name2semantic.tsv"
SSL_DIM = 768
IMPORTED_BERT = "gpt-sovits-3-bert"
IMPORTED_SV = "gpt-sovits-7-sv_cn"


@dataclass(frozen=True)
class _Text:
    phones: list[str]
    word2ph: list[int] | None
    norm_text: str


def import_experiment(
    list_file: str | os.PathLike[str],
    experiment: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tokenizer: TokenizerSpec,
    symbols_version: str,
    limits: AudioLimits = AudioLimits(),
    show_progress: bool = True,
) -> PrepareReport:
    """Import ``experiment`` (made from ``list_file``) into the cache at ``out``; returns the report.

    ``tokenizer`` must be the HuBERT + s2 pair GPT-SoVITS made the codes with (its pretrained
    s2G): it names the cache's tokens and its s2 checks them.
    """
    if tokenizer.hubert is None or tokenizer.s2 is None:
        raise ConfigError(
            "--from-gpt-sovits needs --hubert and --s2: the chinese-hubert-base folder and the s2G .pth "
            "GPT-SoVITS made the experiment's semantic tokens with (its pretrained s2G)"
        )
    folder = Path(experiment)
    texts = _read_name2text(folder / NAME2TEXT)
    codes = _read_name2semantic(folder / NAME2SEMANTIC)
    entries = read_list(list_file)
    names = [Path(e.audio_path.replace("\\", "/")).name for e in entries if isinstance(e, Entry)]
    has_bert = any((folder / "3-bert" / f"{name}.pt").is_file() for name in names)
    has_sv = any((folder / "7-sv_cn" / f"{name}.pt").is_file() for name in names)
    settings = FeatureSettings(
        tokenizer=tokenizer.name,
        symbols_version=symbols_version,
        bert=IMPORTED_BERT if has_bert else "",
        sv=IMPORTED_SV if has_sv else "",
    )
    from fedvox.shared.models.s2.checkpoint import load_generator  # Opacus import: only when used

    s2 = load_generator(tokenizer.s2).eval()
    known_phones = symbol_to_id(symbols_version)
    cache = FeatureCache(out)
    accepted: list[CachedItem] = []
    rejected: list[Rejection] = []
    with cache.lock(), progress() as bar:
        task = bar.add_task("importing", total=len(entries), visible=show_progress)
        started = time.perf_counter()
        seen: dict[str, int] = {}
        for entry in entries:
            bar.advance(task)
            if isinstance(entry, Rejection):
                rejected.append(entry)
                continue
            try:
                name = Path(entry.audio_path.replace("\\", "/")).name
                if name in seen:
                    raise Rejected(Reason.DUPLICATE_ENTRY, f"line {entry.line}: same name as line {seen[name]}")
                seen[name] = entry.line
                item = _import_one(entry, name, folder, texts, codes, s2, known_phones, settings, limits, cache)
            except Rejected as exc:
                rejected.append(Rejection(entry.line, entry.audio_path, exc.reason, str(exc)))
                continue
            accepted.append(item)
        elapsed = time.perf_counter() - started
        notes = [f"imported from the GPT-SoVITS experiment folder {folder.name}"]
        if not has_bert:
            notes += ExtractorSpecs().notes(accepted)
        stale = 0
        if accepted:
            cache.write_index(settings, accepted)
            stale = cache.prune({item.id for item in accepted})
        report = PrepareReport.build(
            list_file=Path(list_file),
            out=cache.root,
            tokenizer=tokenizer.name,
            accepted=accepted,
            rejected=rejected,
            featurised=len(accepted),
            featurise_s=elapsed,
            workers=1,
            stale_removed=stale,
            notes=notes,
        )
        report.write(cache.root)
    return report


def _import_one(
    entry: Entry,
    name: str,
    folder: Path,
    texts: dict[str, _Text],
    codes: dict[str, list[int]],
    s2: torch.nn.Module,
    known_phones: dict[str, int],
    settings: FeatureSettings,
    limits: AudioLimits,
    cache: FeatureCache,
) -> CachedItem:
    where = f"line {entry.line}: {name}"
    if name not in texts or name not in codes:
        missing = NAME2TEXT if name not in texts else NAME2SEMANTIC
        raise Rejected(Reason.MISSING_FEATURES, f"{where}: not in {missing}")
    text = texts[name]
    wav_path = folder / "5-wav32k" / name
    try:
        data = wav_path.read_bytes()
        wave, rate = read_audio(data, name=name)
    except FileNotFoundError:
        raise Rejected(Reason.MISSING_FEATURES, f"{where}: no 5-wav32k/{name}") from None
    except DataError as exc:
        raise Rejected(Reason.UNDECODABLE_AUDIO, f"{where}: {exc}") from None
    if rate != SAMPLE_RATE:
        raise Rejected(Reason.MISMATCHED_FEATURES, f"{where}: 5-wav32k holds {rate} Hz audio, not 32 kHz")
    duration_s = check_audio(wave, rate, limits, where)
    ssl = _load_tensor(folder / "4-cnhubert" / f"{name}.pt", where, (1, SSL_DIM, None))
    semantic = torch.tensor(codes[name], dtype=torch.long)
    with torch.no_grad():
        expected = s2.extract_latent(ssl.float())[0]
    if not torch.equal(expected, semantic):
        raise Rejected(
            Reason.MISMATCHED_FEATURES,
            f"{where}: its semantic codes are not what the given s2 makes from 4-cnhubert/{name}.pt "
            f"({semantic.numel()} codes, {int((expected[: semantic.numel()] != semantic[: expected.numel()]).sum())} "
            "differ); pass the s2G GPT-SoVITS used (its pretrained one)",
        )
    unknown = sorted({phone for phone in text.phones if phone not in known_phones})
    if unknown and unknown != [UNK]:
        raise Rejected(
            Reason.MISMATCHED_FEATURES,
            f"{where}: phones {unknown[:3]} are not in the {settings.symbols_version} symbol table; pick the "
            "--config the experiment was prepared for",
        )
    bert = None
    bert_path = folder / "3-bert" / f"{name}.pt"
    if bert_path.is_file():
        bert = _load_tensor(bert_path, where, (BERT_DIM, len(text.phones))).T.contiguous()
    sv = None
    sv_path = folder / "7-sv_cn" / f"{name}.pt"
    if sv_path.is_file():
        sv = _load_tensor(sv_path, where, (1, SV_DIM))[0]
    tokens = min(semantic.numel(), wave.numel() // SAMPLES_PER_TOKEN)
    features = Features(
        wave=to_pcm16(wave[: tokens * SAMPLES_PER_TOKEN]),
        semantic_ids=semantic[:tokens].to(torch.int16),
        phoneme_ids=torch.tensor(phones_to_ids(text.phones, settings.symbols_version), dtype=torch.int16),
        bert=bert,
        sv=sv,
    )
    item = item_id(hashlib.sha256(data).hexdigest(), entry.language, entry.text, settings)
    metadata = {
        "tokenizer": settings.tokenizer,
        "symbols_version": settings.symbols_version,
        "language": entry.language,
        "duration_s": round(duration_s, 4),
        "phones": text.phones,
        "word2ph": text.word2ph,
        "norm_text": text.norm_text,
        "imported": "gpt-sovits",
    }
    cache.write_item(item, features, metadata)
    return CachedItem.of(entry, item, metadata["duration_s"], tokens, len(text.phones))


def _load_tensor(path: Path, where: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A feature file's tensor, its shape checked against ``shape`` (None: any length)."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Rejected(Reason.MISSING_FEATURES, f"{where}: no {path.parent.name}/{path.name}") from None
    except Exception as exc:  # torch raises several types for damaged or non-tensor files
        raise Rejected(
            Reason.MISMATCHED_FEATURES, f"{where}: cannot read {path.parent.name}/{path.name} ({type(exc).__name__})"
        ) from None
    if (
        not isinstance(tensor, torch.Tensor)
        or tensor.ndim != len(shape)
        or any(want is not None and have != want for have, want in zip(tensor.shape, shape, strict=True))
    ):
        got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise Rejected(
            Reason.MISMATCHED_FEATURES,
            f"{where}: {path.parent.name}/{path.name} has shape {got}, expected {[s or 'T' for s in shape]}",
        )
    return tensor


def _read_name2text(path: Path) -> dict[str, _Text]:
    texts: dict[str, _Text] = {}
    for number, line in enumerate(_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataError(f"{path} line {number}: expected name, phones, word2ph and text separated by tabs")
        name, phones, word2ph, norm_text = fields
        try:
            counts = ast.literal_eval(word2ph)  # a Python list literal or None, as upstream writes it
        except (ValueError, SyntaxError):
            raise DataError(f"{path} line {number}: word2ph {word2ph[:20]!r} is not a list") from None
        texts[name] = _Text(phones.split(" "), counts, norm_text)
    return texts


def _read_name2semantic(path: Path) -> dict[str, list[int]]:
    lines = _lines(path)
    if lines and lines[0].startswith("item_name"):
        lines = lines[1:]
    codes: dict[str, list[int]] = {}
    for number, line in enumerate(lines, start=2):
        name, _, values = line.partition("\t")
        try:
            codes[name] = [int(value) for value in values.split()]
        except ValueError:
            raise DataError(f"{path} line {number}: semantic codes must be integers") from None
    return codes


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"no {path.name} in {path.parent}: pass the GPT-SoVITS experiment folder (logs/<name>) after "
            "its 1A preparation steps"
        ) from None
    return [line for line in text.strip("\n").split("\n") if line]


__all__ = ["import_experiment"]
