"""Deduplication: exact (normalized text hash), URL, and MinHash near-duplicates through datatrove.

The flow, spread over the pipeline's stages (see danlu.data.pipeline), so that no task ever holds every
signature — the work scales out over datatrove's executors (local tasks, Slurm, Ray):
1. (all tasks) `DedupSignatures` records per document (in the order the first stage writes them): a hash of the
   normalized text, a hash of the normalized URL, domain, language, token estimate, a topic key and the
   document's place in the one-task reading order (`order`, see SourceReader.order_key); datatrove's
   `MinhashDedupSignature` writes the MinHash signatures beside it, shingling with `MixedWordTokenizer` so
   Chinese is shingled by characters (datatrove's `language="zh"`/"cmn" needs spaCy and jieba, and plain
   whitespace splitting would make each Chinese sentence one "word"); it also writes each document's full
   signature to `full/<rank>.sig` for step 3, and sorts each bucket file from sorted runs (`sort_records`), where
   datatrove's own step sorted the whole file in memory (68 bytes per document of the task).
2. (num_buckets tasks) datatrove's `MinhashDedupBuckets` finds candidate pairs per LSH bucket.
3. (num_buckets tasks) `VerifyPairs` keeps the candidates whose full signatures agree on ≥ `threshold` of their
   hashes, reading only the two rows of each pair from the memory-mapped `full/` files.
4. (one task) datatrove's `MinhashDedupCluster` joins the verified pairs into clusters (`.clusters`); it holds the
   duplicate documents only, never the signatures.
5. (one task) `DedupPlan` joins those clusters, equal text hashes and equal URLs in one union-find whose root is
   the document first in reading order, so every cluster keeps exactly one document whatever mix of rules joined
   it (separate passes could each remove a different twin) and the same one on any number of tasks; writes
   datatrove `.remove` files and the mixing plan. The one step whose memory grows with the corpus: ~60 bytes
   per document at its peak (positions, the union-find, one column at a time), no signature, no string.
6. (all tasks) `ApplyPlan("dedup")` labels each document's reason and datatrove's `MinhashDedupFilter` drops
   the ones in `.remove` (reason exact_duplicate / url_duplicate / near_duplicate) into `rejected/`;
   `ApplyPlan("mix")` applies the mix (copies per document).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter

from danlu.data.clean import count_in, count_out, doc_tokens, flush_tally
from danlu.data.langid import WORD_HASHES, MixedWordTokenizer
from danlu.data.mix import MixConfig, plan_mix

REASONS = ["", "exact_duplicate", "url_duplicate", "near_duplicate", "mix_downsampled"]
_WORDS = MixedWordTokenizer()


@dataclass
class MinhashSettings:
    enabled: bool = True
    n_grams: int = 5  # shingle size in tokens: words for English, characters for Chinese
    num_buckets: int = 14
    hashes_per_bucket: int = 8  # 14 × 8: pairs above ~0.75 similarity are caught with high probability
    normalize_numbers: bool = (
        False  # datatrove's default maps every number to 0: templated facts would collide
    )
    # null: every LSH candidate pair counts (datatrove's behaviour, ~0.75 similarity for 14 × 8); a number:
    # candidates are checked against their full signatures and joined only at or above this similarity
    threshold: float | None = 0.8


@dataclass
class DedupConfig:
    """Recipe `data.dedup:`."""

    exact: bool = True
    url: bool = True
    minhash: MinhashSettings | bool = True
    top_clusters: int = 10  # how many of the largest duplicate clusters stats.md shows

    def minhash_settings(self) -> MinhashSettings | None:
        m = self.minhash
        if m is True:
            return MinhashSettings()
        if m is False or (isinstance(m, MinhashSettings) and not m.enabled):
            return None
        return m  # type: ignore[return-value]


def datatrove_minhash_config(s: MinhashSettings) -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.text import TextNormConfig

    return MinhashConfig(
        n_grams=s.n_grams,
        num_buckets=s.num_buckets,
        hashes_per_bucket=s.hashes_per_bucket,
        norm_config=TextNormConfig(norm_numbers=s.normalize_numbers),
    )


_MARKS: np.ndarray | None = None  # code point → is a combining mark (Mn), built on first use


def _strip_marks(text: str) -> str:
    """NFD with combining marks (category Mn) removed, as datatrove's diacritics normalization does, with a
    numpy lookup over the code points instead of a Python call per character."""
    global _MARKS
    if text.isascii():
        return text
    if _MARKS is None:
        marks = np.zeros(0x110000, dtype=bool)
        for lo, hi in ((0, 0x40000), (0xE0000, 0xE1000)):  # the planes that have any Mn at all
            marks[[c for c in range(lo, hi) if unicodedata.category(chr(c)) == "Mn"]] = True
        _MARKS = marks
    nfd = unicodedata.normalize("NFD", text)
    codes = np.frombuffer(nfd.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    drop = _MARKS[codes]
    return codes[~drop].tobytes().decode("utf-32-le", "surrogatepass") if drop.any() else nfd


_ROLL = np.uint64(0x9E3779B97F4A7C15)
_MERSENNE = np.uint64((1 << 61) - 1)  # datatrove's modulus for its MinHash permutations
_last_words: tuple[str, Any, np.ndarray] | None = None
_DEFAULT_NORM: Any = None


def _norm(norm: Any) -> Any:
    """The normalization asked for, or MinhashSettings' default one."""
    global _DEFAULT_NORM
    if norm is not None:
        return norm
    if _DEFAULT_NORM is None:
        from datatrove.utils.text import TextNormConfig

        _DEFAULT_NORM = TextNormConfig(norm_numbers=MinhashSettings.normalize_numbers)
    return _DEFAULT_NORM


def _wordlike_punctuation() -> re.Pattern[str]:
    from datatrove.utils.text import PUNCTUATION_SET

    chars = sorted(c for c in PUNCTUATION_SET if re.fullmatch(r"\w", c))
    return re.compile("[" + "".join(map(re.escape, chars)) + "]")


_WORDLIKE_PUNCT = _wordlike_punctuation()


def simplify_for_words(text: str, cfg: Any) -> str:
    """Text whose MixedWordTokenizer words equal those of datatrove's `simplify_text(text, cfg)`.

    Only what can change a word is done: lower case, numbers/weekdays/months (when asked), the punctuation
    characters that are word characters ("_", "１") to spaces, and diacritics. Turning other punctuation and
    runs of whitespace into single spaces changes nothing: the tokenizer splits on them anyway.
    """
    from datatrove.utils.text import MONTHS_PATTERN, NUMBERS_PATTERN, WEEKDAYS_PATTERN

    if cfg.lowercase:
        text = text.lower()
    if cfg.norm_numbers:
        text = NUMBERS_PATTERN.sub("0", text)
    if cfg.norm_weekdays:
        text = WEEKDAYS_PATTERN.sub("WEEKDAY", text)
    if cfg.norm_monthnames:
        text = MONTHS_PATTERN.sub("MONTH", text)
    if cfg.remove_punctuation and _WORDLIKE_PUNCT.search(text):
        text = _WORDLIKE_PUNCT.sub(" ", text)
    if cfg.norm_unicode_diacritics:
        text = _strip_marks(text)
    return text


def word_hashes(text: str, norm: Any = None) -> np.ndarray:
    """Hashes of the words of the normalized text (datatrove's `simplify_text`, then MixedWordTokenizer).

    DedupSignatures (topic key) and the MinHash step ask for the same document one after the other: the last
    answer is kept, keyed by the string object and the normalization.
    """
    global _last_words
    cfg = _norm(norm)
    if (
        _last_words is not None
        and _last_words[0] is text
        and (_last_words[1] is cfg or _last_words[1] == cfg)
    ):
        return _last_words[2]
    words = _WORDS.word_tokenize(simplify_for_words(text, cfg))
    out = np.fromiter(map(WORD_HASHES.__getitem__, words), dtype=np.uint64, count=len(words))
    _last_words = (text, cfg, out)
    return out


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per window of `n` words: a rolling polynomial of the word hashes, then mixed."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    h = words[: len(words) - n + 1].copy()
    for k in range(1, n):
        h = h * _ROLL + words[k : len(words) - n + 1 + k]
    return _mix64(h)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the bits of a linear combination over the whole word."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def full_signature_path(folder: str, rank: int) -> str:
    """`<folder>/<rank>.sig`: row d = the full MinHash signature (buckets × hashes uint64) of the rank's doc d."""
    return os.path.join(folder, f"{rank:05d}.sig")


SORT_CHUNK = 1 << 16  # records sorted at once by sort_records: 4.5 MB of 68-byte MinHash bucket records


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Structured rows sorted in place by all their fields in order (datatrove's own call): no copy."""
    rows.sort(order=rows.dtype.names)
    return rows


def sort_records(path: str, dtype: np.dtype, chunk: int = SORT_CHUNK, tmp_dir: str | None = None) -> None:
    """Sorts the fixed-size records of `path` in place by all their fields in order (what datatrove's
    MinhashDedupSignature does with `records.sort(order=dtype.names)`), in memory that does not grow with the file.

    Runs of `chunk` records are sorted into temporary files, then merged: each run is read a block at a time, and
    every round writes, sorted, all buffered records up to the smallest of the blocks' last records (nothing
    unread can come before it). A file of at most one chunk is sorted in memory, as datatrove does.

    Memory: one chunk of records (a run being sorted; or the runs' blocks, half a chunk, and a round's records, at
    most as many). A block holds at least 1,024 records, so past 32 runs (2 M records in one task) the blocks
    grow by about one byte per record, two with the round's. Temporary files go to `tmp_dir` (default: beside
    `path`; datatrove's bucket stage reads every file of a bucket's folder, so the pipeline passes another).
    """
    size = os.path.getsize(path) // dtype.itemsize
    tmp = os.path.join(tmp_dir or os.path.dirname(path), os.path.basename(path))
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    if size <= chunk:
        _sorted_rows(np.fromfile(path, dtype=dtype)).tofile(tmp + ".tmp")
        os.replace(tmp + ".tmp", path)
        return
    runs = []
    try:
        for lo in range(0, size, chunk):
            rows = np.fromfile(path, dtype=dtype, count=min(chunk, size - lo), offset=lo * dtype.itemsize)
            runs.append(f"{tmp}.run{len(runs)}")
            _sorted_rows(rows).tofile(runs[-1])
            del rows
        block = max(chunk // (2 * len(runs)), 1024)
        sources = [open(run, "rb") for run in runs]  # noqa: SIM115 - closed below

        def read(i: int) -> np.ndarray:
            return np.frombuffer(sources[i].read(block * dtype.itemsize), dtype=dtype)

        try:
            heads = [read(i) for i in range(len(runs))]
            written = 0
            with open(tmp + ".tmp", "wb") as out:
                while True:
                    live = [i for i, h in enumerate(heads) if len(h)]
                    if not live:
                        break
                    cutoff = _sorted_rows(np.array([heads[i][-1] for i in live], dtype=dtype))[:1]
                    parts = []
                    for i in live:
                        k = int(np.searchsorted(heads[i], cutoff, side="right")[0])
                        parts.append(heads[i][:k])
                        heads[i] = heads[i][k:] if k < len(heads[i]) else read(i)
                    merged = _sorted_rows(np.concatenate(parts))
                    merged.tofile(out)
                    written += len(merged)
        finally:
            for f in sources:
                f.close()
        if written != size:  # as datatrove checks its own sort: unsorted or lost records ruin the dedup
            raise RuntimeError(f"{path}: sorting wrote {written} of {size} MinHash records")
        os.replace(tmp + ".tmp", path)
    finally:
        for run in runs:
            with contextlib.suppress(FileNotFoundError):
                os.remove(run)


def minhash_signature_step(folder: str, config: Any, full_folder: str | None = None) -> PipelineStep:
    """datatrove's MinhashDedupSignature, shingling with MixedWordTokenizer, vectorized.

    Chinese is shingled by characters (see the module docstring), and shingles are hashed with numpy from
    cached word hashes (`ngram_hashes`) instead of one xxhash call on a joined string per n-gram, which also
    avoids datatrove 0.10's xxhash wrapper (it passes `str`, which xxhash ≥ 4 rejects). Signatures, buckets and
    file formats are datatrove's. With `full_folder`, each document's whole signature is also written there
    (`full_signature_path`) for VerifyPairs.
    """
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.typeshelper import StatHints

    class _Signature(MinhashDedupSignature):
        _full: Any = None
        _doc = -1

        def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
            """datatrove's signature files, written as its `run` writes them, then each bucket's file sorted by
            `sort_records` in bounded memory: datatrove's `run` reads a whole bucket file into memory to sort it
            (68 bytes per document of the task, the one stage-1 memory that grew with the document count)."""
            c = self.config
            fmt = f"<{c.hashes_per_bucket}{c.hash_config.struct_format}I"
            paths = [os.path.join(folder, f"bucket_{bi:03d}", f"{rank:05d}.minhash.sig") for bi in range(c.num_buckets)]  # fmt: skip
            with self.track_time(), contextlib.ExitStack() as files:
                for path in paths:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                buckets = [files.enter_context(open(path, "wb")) for path in paths]  # noqa: SIM115
                if full_folder is not None:
                    os.makedirs(full_folder, exist_ok=True)
                    self._full = files.enter_context(open(full_signature_path(full_folder, rank), "wb"))  # noqa: SIM115
                try:
                    for self._doc, doc in enumerate(data):  # datatrove's doc index: every document
                        self.stat_update(StatHints.total)
                        shingles = self.get_shingles(doc.text)
                        if shingles.size != 0:
                            for bucket, part in zip(buckets, self.get_signature(shingles)):
                                bucket.write(struct.pack(fmt, *part, self._doc))
                finally:
                    self._full = None
            with self.track_time():
                dtype = np.dtype([(f"field{i + 1}", f"<{c.hash_config.struct_format}") for i in range(c.hashes_per_bucket)] + [(f"field{c.hashes_per_bucket + 1}", "<I")])  # fmt: skip
                for path in paths:  # temporaries outside the bucket folders, which the next stage reads whole
                    sort_records(path, dtype, SORT_CHUNK, os.path.join(folder, "sorting", f"{rank:05d}"))

        def get_shingles(self, text: str) -> np.ndarray:
            words = word_hashes(text, self.config.norm_config)
            return ngram_hashes(words, self.config.n_grams).reshape((-1, 1))

        def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
            """datatrove's permutations ((shingle · a + b) mod p, per hash function, then the minimum), computed
            in place: the same numbers without two shingles × hashes temporaries (3× faster)."""
            a, b = self.parameters
            phv = shingles * a
            phv += b
            phv %= _MERSENNE
            if self.config.hash_config.precision == 32:
                phv &= np.uint64(self.config.hash_config.max)
            mins = phv.min(axis=0).astype(self.config.hash_config.np_dtype)
            if self._full is not None:  # rows of documents without shingles stay holes: no pair names them
                row = mins.astype(np.uint64)
                self._full.seek(self._doc * row.nbytes)
                self._full.write(row.tobytes())
            return [x.tolist() for x in np.split(mins, self.config.num_buckets)]

    _Signature.__name__ = _Signature.__qualname__ = "MinhashSignature"
    return _Signature(folder, config=config, language=MixedWordTokenizer())


class VerifyPairs(PipelineStep):
    """Between datatrove's buckets and cluster stages: keeps a bucket's candidate pairs whose full signatures agree
    on at least `threshold` of their hashes (null: all), in datatrove's `.dups` format, one output per input file.

    LSH with 14 × 8 hashes lets through pairs down to ~0.75 similarity; this check is what `threshold` means. Each
    task reads its `.dups` files and looks up the two rows of each pair in the memory-mapped `full/` signature
    files, so memory is the pages touched, not the signatures of the corpus.
    """

    type = "🫂 - DEDUP"
    CHUNK = 8192  # pairs compared at once: 2 × chunk × hashes × 8 bytes of temporaries

    def __init__(
        self, pairs_folder: str, full_folder: str, out_folder: str, threshold: float | None, hashes: int
    ):
        self.name = "dedup:verify"
        super().__init__()
        self.pairs_folder, self.full_folder, self.out_folder = pairs_folder, full_folder, out_folder
        self.threshold, self.hashes = threshold, hashes

    def _rows(self, maps: dict[int, np.ndarray], files: np.ndarray, docs: np.ndarray) -> np.ndarray:
        out = np.empty((len(files), self.hashes), dtype=np.uint64)
        for f in np.unique(files).tolist():
            if f not in maps:
                maps[f] = np.memmap(full_signature_path(self.full_folder, f), dtype=np.uint64, mode="r").reshape(-1, self.hashes)  # fmt: skip
            sel = files == f
            out[sel] = maps[f][docs[sel]]
        return out

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        os.makedirs(self.out_folder, exist_ok=True)
        maps: dict[int, np.ndarray] = {}
        for src in sorted(Path(self.pairs_folder).glob("*.dups"))[rank::world_size]:
            with self.track_time():
                pairs = np.fromfile(src, dtype="<u4")
                pairs = pairs[: len(pairs) // 4 * 4].reshape(-1, 4)
                keep = np.ones(len(pairs), dtype=bool)
                if self.threshold is not None:
                    for lo in range(0, len(pairs), self.CHUNK):
                        p = pairs[lo : lo + self.CHUNK].astype(np.int64)
                        a = self._rows(maps, p[:, 0], p[:, 1])
                        b = self._rows(maps, p[:, 2], p[:, 3])
                        keep[lo : lo + len(p)] = (a == b).mean(axis=1) >= self.threshold
                dst = os.path.join(self.out_folder, src.name)
                pairs[keep].astype("<u4").tofile(dst + ".tmp")
                os.replace(dst + ".tmp", dst)
                self.stat_update("candidate_pairs", value=len(pairs))
                self.stat_update("pairs_below_threshold", value=int((~keep).sum()))
        return
        yield  # a generator that yields nothing: datatrove pipes steps as generators


def stock_minhash_signature_step(folder: str, config: Any) -> PipelineStep:
    """datatrove's own MinhashDedupSignature with one fix: shingles are encoded before xxhash sees them
    (datatrove 0.10 passes `str`, which xxhash ≥ 4 rejects). For the benchmark's plain-datatrove side."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.text import ngrams, simplify_text

    class _Stock(MinhashDedupSignature):
        def get_shingles(self, text: str) -> np.ndarray:
            words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
            h = xxhash.xxh64_intdigest if self.config.hash_config.precision == 64 else xxhash.xxh32_intdigest
            return np.fromiter(
                (h(" ".join(x).encode()) for x in ngrams(words, self.config.n_grams)), dtype=np.uint64
            ).reshape((-1, 1))

    _Stock.__name__ = _Stock.__qualname__ = "MinhashSignature"
    return _Stock(folder, config=config, language=MixedWordTokenizer())


def text_hash(text: str) -> int:
    """Hash of the text's words with case, whitespace, punctuation and diacritics ignored (0 is reserved for
    "none"): the word hashes MinHash needs anyway (datatrove's default normalization, numbers kept)."""
    return xxhash.xxh64_intdigest(word_hashes(text).tobytes()) or 1


def url_hash(url: str) -> int:
    if not url:
        return 0
    try:
        p = urlsplit(url.strip())
    except ValueError:
        return 0
    host = p.netloc.lower().removeprefix("www.")
    query = "&".join(q for q in p.query.split("&") if q and not q.startswith(("utm_", "fbclid", "gclid")))
    key = f"{host}{p.path.rstrip('/')}?{query}" if host else url.strip()
    return xxhash.xxh64_intdigest(key.encode("utf-8", "surrogatepass")) or 1


def topic_key(text: str, norm: Any = None) -> int:
    """The smallest hash of the document's word (or character) bigrams, over its first 2,000 words: similar
    documents tend to share it."""
    words = word_hashes(text, norm)[:2000]
    if len(words) < 2:
        return zlib.crc32(text[:200].encode("utf-8", "surrogatepass"))
    return int(ngram_hashes(words, 2).min())


# The per-document facts DedupSignatures records: fixed-width rows written as they come (stage 1 holds one chunk,
# not a list per document), domain and language as codes into a per-rank vocabulary (`<rank>.vocab.json`).
META_DTYPE = np.dtype(
    [("exact", "<u8"), ("url", "<u8"), ("tokens", "<i8"), ("chars", "<i8"), ("topic", "<u8"), ("order", "<u8"),
     ("domain", "<u2"), ("lang", "<u2")]
)  # fmt: skip
META_CHUNK = 1 << 16


class DedupSignatures(PipelineStep):
    """Stage 1 tail: records the per-document facts for dedup and mixing (`<folder>/<rank>.meta`, read_meta)."""

    type = "🫂 - DEDUP"

    def __init__(self, folder: str, norm: Any = None) -> None:
        self.name = "dedup:signatures"
        super().__init__()
        self.folder = folder
        self.norm = norm  # the MinHash step's text normalization: both then share one word hashing per doc

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{rank:05d}.meta")
        vocab: dict[str, dict[str, int]] = {"domain": {}, "lang": {}}
        buf = np.zeros(META_CHUNK, dtype=META_DTYPE)
        k = 0
        with open(path + ".tmp", "wb") as f:
            for doc in data:
                with self.track_time():
                    m = doc.metadata
                    codes = [
                        vocab[c].setdefault(str(m.get(c) or ""), len(vocab[c])) for c in ("domain", "lang")
                    ]
                    buf[k] = (
                        text_hash(doc.text),
                        url_hash(m.get("url") or ""),
                        doc_tokens(doc),
                        len(doc.text),
                        topic_key(doc.text, self.norm),
                        int(m.pop("_order", 0)),  # not an output field: it ends here
                        *codes,
                    )
                    k += 1
                    if k == META_CHUNK:
                        buf.tofile(f)
                        k = 0
                yield doc
            buf[:k].tofile(f)
        names = {c: sorted(v, key=v.__getitem__) for c, v in vocab.items()}
        with open(path + ".vocab.tmp", "w", encoding="utf-8") as f:
            json.dump(names, f, ensure_ascii=False)
        os.replace(path + ".vocab.tmp", os.path.join(self.folder, f"{rank:05d}.vocab.json"))
        os.replace(path + ".tmp", path)


class _Meta:
    """Every rank's DedupSignatures rows, read back a chunk at a time and one field at a time, so that DedupPlan
    holds the few columns it is working on, not every field of every document at once.

    Domain and language come back as codes into one vocabulary over all ranks (`names`), numbered in the sorted
    order of the names, so codes sort, group and compare as the names would."""

    def __init__(self, folder: str | Path) -> None:
        self.files = sorted(Path(folder).glob("*.meta"))
        self.ranks = [int(f.name.split(".")[0]) for f in self.files]
        self.sizes = [f.stat().st_size // META_DTYPE.itemsize for f in self.files]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist() if self.files else []  # first docs
        self.n = int(sum(self.sizes))
        vocabs = [
            json.loads((f.parent / f"{f.name.split('.')[0]}.vocab.json").read_text(encoding="utf-8"))
            for f in self.files
        ]
        self.names = {c: sorted({x for v in vocabs for x in v[c]}) or [""] for c in ("domain", "lang")}
        code = {c: {x: i for i, x in enumerate(self.names[c])} for c in self.names}
        self._recode = [  # per rank: its own code → the shared one
            {c: np.array([code[c][x] for x in v[c]] or [0], dtype=np.uint16) for c in self.names}
            for v in vocabs
        ]

    def column(self, name: str, pos: np.ndarray | None = None) -> np.ndarray:
        """Field `name` of every document, ranks concatenated; with `pos`, document i's value goes to pos[i] (its
        place in reading order) instead."""
        out = np.empty(self.n, dtype=np.uint16 if name in self.names else META_DTYPE[name])
        for i, (f, first, size) in enumerate(zip(self.files, self.offsets, self.sizes)):
            for lo in range(0, size, META_CHUNK):
                rows = np.fromfile(f, dtype=META_DTYPE, count=min(META_CHUNK, size - lo), offset=lo * META_DTYPE.itemsize)  # fmt: skip
                vals = self._recode[i][name][rows[name]] if name in self.names else rows[name]
                at = slice(first + lo, first + lo + len(rows))
                if pos is None:
                    out[at] = vals
                else:
                    out[pos[at]] = vals
        return out


def _repeats(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, first) for every index i whose key (0 = none) an earlier index has too, `first` the earliest of them.

    A stable sort puts equal keys side by side in index order, so each run's first member is the earliest; the
    memory is the sort's indices and one sorted copy of the keys, and the answer is as long as the repeats."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    dup = ordered[1:] == ordered[:-1]  # sorted index k + 1 repeats sorted index k
    dup &= ordered[1:] != 0
    del ordered
    k = np.flatnonzero(dup)
    del dup
    if len(k) == 0:
        return k, k
    opens = np.ones(len(k), dtype=bool)  # a run of repeats opens: its first member is sorted index k
    opens[1:] = k[1:] != k[:-1] + 1
    first = k[np.maximum.accumulate(np.where(opens, np.arange(len(k)), 0))]
    return order[k + 1], order[first]


class _UnionFind:
    def __init__(self, n: int, dtype: Any = np.int64) -> None:
        self.parent = np.arange(n, dtype=dtype)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return int(x)

    def roots(self) -> np.ndarray:
        """Every element's root at once, by pointer jumping (no Python int per element)."""
        p = self.parent
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return q
            p = q

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (the first document seen) stays the root: it is the one kept
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def read_clusters(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank, doc, cluster id) of every document in datatrove's `<rank:06d>.clusters` files (MinhashDedupCluster
    with save_cluster_id): the documents that have near-duplicates, and which cluster each is in."""
    ranks, docs, cids = [], [], []
    for f in sorted(Path(folder).glob("*.clusters")):
        arr = np.fromfile(f, dtype="<u4")
        arr = arr[: len(arr) // 2 * 2].reshape(-1, 2)
        ranks.append(np.full(len(arr), int(f.name.split(".")[0]), dtype=np.int64))
        docs.append(arr[:, 0].astype(np.int64))
        cids.append(arr[:, 1].astype(np.int64))
    if not ranks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(ranks), np.concatenate(docs), np.concatenate(cids)


def _pair_count(folder: str | None) -> int:
    return (
        sum(f.stat().st_size // 16 for f in Path(folder).glob("*.dups"))
        if folder and Path(folder).is_dir()
        else 0
    )


class DedupPlan(PipelineStep):
    """One task: joins near-duplicate clusters, exact and URL duplicates, keeps the first of each cluster in reading
    order, and plans the mix: `plan/<rank>.npz`, datatrove `.remove` files in `remove/`, `plan/summary.json`.

    Documents are taken in their one-task reading order (`order` from DedupSignatures), not in the order the
    tasks' files happen to be concatenated, so which twin is kept and which documents the mix picks are the same
    whatever the number of tasks (a multi-task run's output equals a one-task run's).
    """

    type = "🫂 - DEDUP"

    def __init__(
        self,
        meta_folder: str,
        clusters_folder: str | None,
        plan_folder: str,
        remove_folder: str,
        cfg: DedupConfig,
        mix: MixConfig,
        pairs_folders: tuple[str, str] | None = None,
    ) -> None:
        self.name = "dedup:cluster"
        super().__init__()
        self.meta_folder, self.clusters_folder, self.plan_folder = meta_folder, clusters_folder, plan_folder
        self.remove_folder = remove_folder
        self.pairs_folders = pairs_folders  # (candidates, verified): counted for the summary
        self.cfg, self.mix = cfg, mix

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time():
            self._run()
        return
        yield  # a generator that yields nothing: datatrove pipes steps as generators

    def _run(self) -> None:
        # The one place that sees every document: ~60 bytes per document at the peak (positions, the union-find,
        # one column at a time, the plan), never a whole row or a string per document.
        meta = _Meta(self.meta_folder)
        ranks, sizes, offsets, n = meta.ranks, meta.sizes, meta.offsets, meta.n
        start = dict(zip(ranks, offsets))
        index = np.int32 if n < 2**31 else np.int64
        # position in reading order: pos[i] for document i (ranks concatenated); ties keep that order
        order = meta.column("order")
        pos = np.empty(n, dtype=index)
        pos[np.argsort(order, kind="stable")] = np.arange(n, dtype=index)
        del order
        uf = _UnionFind(n, index)  # over positions: the smaller position (read first) stays the root
        if self.clusters_folder and Path(self.clusters_folder).is_dir():
            c_rank, c_doc, c_id = read_clusters(self.clusters_folder)
            known = np.isin(c_rank, ranks)
            members = pos[np.array([start[r] for r in c_rank[known].tolist()], dtype=np.int64) + c_doc[known]]
            order = np.argsort(c_id[known], kind="stable")
            cid, mem = c_id[known][order], members[order]
            starts = (
                np.r_[0, np.flatnonzero(cid[1:] != cid[:-1]) + 1] if len(cid) else np.zeros(0, dtype=np.int64)
            )
            first = np.repeat(mem[starts], np.diff(np.r_[starts, len(mem)])) if len(mem) else mem
            for a, b in zip(mem.tolist(), first.tolist()):
                uf.union(a, b)

        def join_equal(field: str, uf: _UnionFind) -> np.ndarray:
            """Joins documents of equal `field` hashes; returns which positions repeat an earlier one."""
            repeat = np.zeros(n, dtype=bool)
            later, first = _repeats(meta.column(field, pos))
            for a, b in zip(later.tolist(), first.tolist()):
                uf.union(a, b)
            repeat[later] = True
            return repeat

        no = np.zeros(n, dtype=bool)
        exact_rep = join_equal("exact", uf) if self.cfg.exact and n else no
        url_rep = join_equal("url", uf) if self.cfg.url and n else no
        roots = uf.roots()
        del uf
        keep = roots == np.arange(n, dtype=roots.dtype)
        reason_p = np.zeros(n, dtype=np.uint8)
        reason_p[~keep] = 3
        reason_p[~keep & url_rep] = 2
        reason_p[~keep & exact_rep] = 1
        del exact_rep, url_rep, no
        copies_p, mix_report = plan_mix(
            meta.column("domain", pos),
            meta.column("lang", pos),
            meta.column("tokens", pos),
            meta.column("topic", pos),
            keep,
            self.mix,
            meta.names["domain"],
        )
        reason_p[keep & (copies_p == 0)] = 4
        del keep
        # each root's cluster size (0 for the documents removed)
        size_p = np.bincount(roots, minlength=n) if n else np.zeros(0, dtype=np.int64)
        clusters = []
        top = np.flatnonzero(size_p > 1)  # the roots of clusters, largest first, ties in reading order
        for r in top[np.argsort(-size_p[top], kind="stable")][: self.cfg.top_clusters].tolist():
            in_cluster = reason_p[roots == r]
            by = {REASONS[k]: int((in_cluster == k).sum()) for k in (1, 2, 3) if (in_cluster == k).any()}
            doc = int(np.flatnonzero(pos == r)[0])
            i = bisect.bisect_right(offsets, doc) - 1  # the rank holding concatenated document `doc`
            clusters.append({"size": int(size_p[r]), "rank": ranks[i], "index": doc - offsets[i], "removed_by": by})  # fmt: skip
        os.makedirs(self.plan_folder, exist_ok=True)
        os.makedirs(self.remove_folder, exist_ok=True)
        for rk, o, size in zip(ranks, offsets, sizes):
            p = pos[o : o + size]  # this rank's documents, in its own order again
            reason = reason_p[p]
            np.savez(
                os.path.join(self.plan_folder, f"{rk:05d}.npz"),
                reason=reason,
                copies=copies_p[p],
                cluster_size=size_p[p],
            )
            gone = np.flatnonzero((reason >= 1) & (reason <= 3))  # MinhashDedupFilter's `.remove` format
            gone.astype("<u4").tofile(os.path.join(self.remove_folder, f"{rk:06d}.remove"))
        candidates, verified = (_pair_count(f) for f in (self.pairs_folders or (None, None)))
        summary = {
            "documents": n,
            "minhash_pairs": verified,
            "minhash_pairs_below_threshold": candidates - verified,
            "removed": {REASONS[k]: int((reason_p == k).sum()) for k in range(1, len(REASONS))},
            "largest_clusters": clusters,
            "mix": mix_report,
        }
        tmp = os.path.join(self.plan_folder, "summary.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
        os.replace(tmp, os.path.join(self.plan_folder, "summary.json"))


class ApplyPlan(PipelineStep):
    """Applies the plan to this rank's documents: `dedup` labels duplicates with their reason and counts them (the
    datatrove MinhashDedupFilter after it drops them, by DedupPlan's `.remove` files); `mix` applies the copies."""

    type = "🫂 - DEDUP"

    def __init__(
        self,
        plan_folder: str,
        part: str,
        exclusion_writer: DiskWriter | None = None,
        top_ids: str | None = None,
    ) -> None:
        self.name = part
        super().__init__()
        self.plan_folder, self.part = plan_folder, part
        self.exclusion_writer = exclusion_writer
        self.top_ids = top_ids

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = os.path.join(self.plan_folder, f"{rank:05d}.npz")
        if not os.path.exists(path):  # this rank had no documents
            yield from data or []
            return
        plan = np.load(path)
        reason, copies, csize = plan["reason"], plan["copies"], plan["cluster_size"]
        examples = self._examples(rank)
        writer = self.exclusion_writer
        try:
            for idx, doc in enumerate(data):
                count_in(self, doc)
                r = int(reason[idx]) if idx < len(reason) else 0
                if self.part == "dedup":  # labels only: datatrove's MinhashDedupFilter after this step drops
                    if idx in examples:
                        examples[idx]["kept_id"] = doc.id
                        examples[idx]["preview"] = doc.text[:160].replace("\n", " ")
                    if 1 <= r <= 3:
                        self._reject(doc, REASONS[r], rank)
                    else:
                        if csize[idx] > 1:
                            doc.metadata["dup_cluster_size"] = int(csize[idx])
                        doc.metadata["_idx"] = idx  # the mix step after this one looks documents up by it
                        count_out(self, doc)
                    yield doc
                else:
                    idx = doc.metadata.pop("_idx", idx)
                    k = int(copies[idx]) if idx < len(copies) else 1
                    if k == 0:
                        self._reject(doc, REASONS[4], rank)
                        continue
                    for c in range(k):
                        if c == 0:
                            out = doc
                        else:
                            out = Document(text=doc.text, id=f"{doc.id}#{c + 1}", metadata=dict(doc.metadata))
                            out.metadata.pop("messages", None)  # conversations are written once
                        count_out(self, out)
                        yield out
        finally:
            flush_tally(self)
            if writer is not None:
                writer.close()
            if self.part == "dedup" and examples:
                tmp = os.path.join(self.plan_folder, f"examples_{rank:05d}.json")
                with open(tmp + ".tmp", "w", encoding="utf-8") as f:
                    json.dump(list(examples.values()), f, ensure_ascii=False)
                os.replace(tmp + ".tmp", tmp)

    def _examples(self, rank: int) -> dict[int, dict[str, Any]]:
        summary = os.path.join(self.plan_folder, "summary.json")
        if self.part != "dedup" or not os.path.exists(summary):
            return {}
        with open(summary, encoding="utf-8") as f:
            clusters = json.load(f)["largest_clusters"]
        return {c["index"]: {"size": c["size"]} for c in clusters if c["rank"] == rank}

    def _reject(self, doc: Document, why: str, rank: int) -> None:
        self.stat_update(f"removed:{why}")
        self.stat_update(f"removed_chars:{why}", value=len(doc.text))
        doc.metadata["filter_reason"] = why  # for the rejected/ row, written here or by MinhashDedupFilter
        doc.metadata["rejected_by"] = self.part
        if self.exclusion_writer is not None:
            doc.metadata["filter_reason"] = why
            doc.metadata["rejected_by"] = self.part
            self.exclusion_writer.write(doc, rank)


def read_dups(path: str | Path) -> list[tuple[int, int, int, int]]:
    """The (file, doc, file, doc) pairs of a datatrove `.dups` file (for tests and debugging)."""
    raw = Path(path).read_bytes()
    return [struct.unpack("<4I", raw[i : i + 16]) for i in range(0, len(raw) - 15, 16)]
