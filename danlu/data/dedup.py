"""Deduplication: exact (normalized text hash), URL, and MinHash near-duplicates through datatrove.

The flow, spread over the pipeline's stages (see danlu.data.pipeline):
1. `DedupSignatures` records per document (in the order the first stage writes them): a hash of the
   normalized text, a hash of the normalized URL, domain, language, token estimate and a topic key;
   datatrove's `MinhashDedupSignature` writes the MinHash signatures beside it, shingling with
   `MixedWordTokenizer` so Chinese is shingled by characters (datatrove's `language="zh"`/"cmn" needs spaCy and
   jieba, and plain whitespace splitting would make each Chinese sentence one "word").
2. datatrove's `MinhashDedupBuckets` finds candidate pairs per LSH bucket.
3. `DedupCluster` (one task) joins MinHash pairs, equal text hashes and equal URLs in one union-find whose root
   is the first document seen, so every cluster keeps exactly one document whatever mix of rules joined it
   (separate passes could each remove a different twin), and makes the mixing plan.
4. `ApplyPlan` removes the duplicates (reason exact_duplicate / url_duplicate / near_duplicate) and applies the
   mix (copies per document), writing what it removes to `rejected/`.
"""

from __future__ import annotations

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


def minhash_signature_step(folder: str, config: Any) -> PipelineStep:
    """datatrove's MinhashDedupSignature, shingling with MixedWordTokenizer, vectorized.

    Chinese is shingled by characters (see the module docstring), and shingles are hashed with numpy from
    cached word hashes (`ngram_hashes`) instead of one xxhash call on a joined string per n-gram, which also
    avoids datatrove 0.10's xxhash wrapper (it passes `str`, which xxhash ≥ 4 rejects). Signatures, buckets and
    file formats are datatrove's.
    """
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    class _Signature(MinhashDedupSignature):
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
            return [x.tolist() for x in np.split(mins, self.config.num_buckets)]

    _Signature.__name__ = _Signature.__qualname__ = "MinhashSignature"
    return _Signature(folder, config=config, language=MixedWordTokenizer())


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


class DedupSignatures(PipelineStep):
    """Stage 1 tail: records the per-document facts for dedup and mixing (`<folder>/<rank>.npz`)."""

    type = "🫂 - DEDUP"

    def __init__(self, folder: str, norm: Any = None) -> None:
        self.name = "dedup:signatures"
        super().__init__()
        self.folder = folder
        self.norm = norm  # the MinHash step's text normalization: both then share one word hashing per doc

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cols: dict[str, list[Any]] = {
            k: [] for k in ("exact", "url", "domain", "lang", "tokens", "chars", "topic")
        }
        for doc in data:
            with self.track_time():
                m = doc.metadata
                cols["exact"].append(text_hash(doc.text))
                cols["url"].append(url_hash(m.get("url") or ""))
                cols["domain"].append(str(m.get("domain") or ""))
                cols["lang"].append(str(m.get("lang") or ""))
                cols["tokens"].append(doc_tokens(doc))
                cols["chars"].append(len(doc.text))
                cols["topic"].append(topic_key(doc.text, self.norm))
            yield doc
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{rank:05d}.npz")
        tmp = path + ".tmp.npz"
        np.savez(
            tmp,
            exact=np.array(cols["exact"], dtype=np.uint64),
            url=np.array(cols["url"], dtype=np.uint64),
            domain=np.array(cols["domain"], dtype=str),
            lang=np.array(cols["lang"], dtype=str),
            tokens=np.array(cols["tokens"], dtype=np.int64),
            chars=np.array(cols["chars"], dtype=np.int64),
            topic=np.array(cols["topic"], dtype=np.uint64),
        )
        os.replace(tmp, path)


def _first_of_equal(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For keys (0 = none): (is a repeat of an earlier key, index of the first document with that key)."""
    n = len(keys)
    first = np.arange(n)
    repeat = np.zeros(n, dtype=bool)
    has = np.flatnonzero(keys != 0)
    if len(has) == 0:
        return repeat, first
    _, idx_first, inv = np.unique(keys[has], return_index=True, return_inverse=True)
    first[has] = has[idx_first[inv]]
    repeat[has] = first[has] != has
    return repeat, first


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (the first document seen) stays the root: it is the one kept
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


class DedupCluster(PipelineStep):
    """One task: joins duplicates into clusters, keeps the first of each, and plans the mix (`plan/<rank>.npz`)."""

    type = "🫂 - DEDUP"

    def __init__(
        self,
        meta_folder: str,
        dups_folder: str | None,
        plan_folder: str,
        cfg: DedupConfig,
        mix: MixConfig,
        sigs_folder: str | None = None,
    ) -> None:
        self.name = "dedup:cluster"
        super().__init__()
        self.meta_folder, self.dups_folder, self.plan_folder = meta_folder, dups_folder, plan_folder
        self.sigs_folder = sigs_folder
        self.cfg, self.mix = cfg, mix

    def _signatures(self, offsets: dict[int, int], n: int, mh: MinhashSettings | None) -> np.ndarray | None:
        if mh is None or not self.sigs_folder:
            return None
        return _load_signatures(self.sigs_folder, offsets, n, mh)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time():
            self._run()
        return
        yield  # a generator that yields nothing: datatrove pipes steps as generators

    def _run(self) -> None:
        files = sorted(Path(self.meta_folder).glob("*.npz"))
        ranks = [int(f.name.split(".")[0]) for f in files]
        metas = [dict(np.load(f)) for f in files]
        sizes = [len(m["tokens"]) for m in metas]
        offsets = dict(zip(ranks, np.cumsum([0] + sizes[:-1]).tolist()))
        cat = {k: np.concatenate([m[k] for m in metas]) if metas else np.array([]) for k in ("exact", "url", "domain", "lang", "tokens", "topic")}  # fmt: skip
        n = int(sum(sizes))
        uf = _UnionFind(n)
        reason = np.zeros(n, dtype=np.uint8)
        near_pairs = rejected_pairs = 0
        mh = self.cfg.minhash_settings()
        threshold = mh.threshold if mh else None
        sigs = self._signatures(offsets, n, mh) if threshold is not None else None
        if self.dups_folder and Path(self.dups_folder).is_dir():
            for f in sorted(Path(self.dups_folder).glob("*.dups")):
                raw = f.read_bytes()
                arr = np.frombuffer(raw[: len(raw) // 16 * 16], dtype="<u4").reshape(-1, 4)
                for f1, d1, f2, d2 in arr.tolist():
                    if f1 in offsets and f2 in offsets:
                        a, b = offsets[f1] + d1, offsets[f2] + d2
                        if sigs is not None and float(np.mean(sigs[a] == sigs[b])) < threshold:
                            rejected_pairs += 1
                            continue
                        uf.union(a, b)
                        near_pairs += 1
        exact_rep = url_rep = np.zeros(n, dtype=bool)
        if self.cfg.exact and n:
            exact_rep, first = _first_of_equal(cat["exact"].astype(np.uint64))
            for i in np.flatnonzero(exact_rep).tolist():
                uf.union(i, int(first[i]))
        if self.cfg.url and n:
            url_rep, first = _first_of_equal(cat["url"].astype(np.uint64))
            for i in np.flatnonzero(url_rep).tolist():
                uf.union(i, int(first[i]))
        roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
        removed = roots != np.arange(n)
        reason[removed] = 3
        reason[removed & url_rep] = 2
        reason[removed & exact_rep] = 1
        cluster_size = np.bincount(roots, minlength=n) if n else np.zeros(0, dtype=np.int64)
        keep = ~removed
        copies, mix_report = plan_mix(cat["domain"], cat["lang"], cat["tokens"], cat["topic"], keep, self.mix)
        reason[keep & (copies == 0)] = 4
        # the largest clusters, for stats
        top = np.argsort(-cluster_size, kind="stable")[: self.cfg.top_clusters] if n else []
        rank_of = np.repeat(ranks, sizes) if n else np.zeros(0, dtype=np.int64)
        clusters = []
        for r in top:
            size = int(cluster_size[r])
            if size < 2:
                break
            members = np.flatnonzero(roots == r)
            by = {
                REASONS[k]: int((reason[members] == k).sum())
                for k in (1, 2, 3)
                if (reason[members] == k).any()
            }
            clusters.append({"size": size, "rank": int(rank_of[r]), "index": int(r - offsets[int(rank_of[r])]), "removed_by": by})  # fmt: skip
        os.makedirs(self.plan_folder, exist_ok=True)
        for rk, size in zip(ranks, sizes):
            o = offsets[rk]
            np.savez(
                os.path.join(self.plan_folder, f"{rk:05d}.npz"),
                reason=reason[o : o + size],
                copies=copies[o : o + size],
                cluster_size=cluster_size[o : o + size],
            )
        summary = {
            "documents": n,
            "minhash_pairs": near_pairs,
            "minhash_pairs_below_threshold": rejected_pairs,
            "removed": {REASONS[k]: int((reason == k).sum()) for k in range(1, len(REASONS))},
            "largest_clusters": clusters,
            "mix": mix_report,
        }
        tmp = os.path.join(self.plan_folder, "summary.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
        os.replace(tmp, os.path.join(self.plan_folder, "summary.json"))


def _load_signatures(sigs_folder: str, offsets: dict[int, int], n: int, mh: MinhashSettings) -> np.ndarray:
    """Full MinHash signatures (n × buckets·hashes) from datatrove's sorted per-bucket signature files."""
    hpb = mh.hashes_per_bucket
    dtype = np.dtype([("h", "<u8", (hpb,)), ("doc", "<u4")])
    sigs = np.zeros((n, mh.num_buckets * hpb), dtype=np.uint64)
    for b in range(mh.num_buckets):
        for rank, off in offsets.items():
            path = Path(sigs_folder) / f"bucket_{b:03d}" / f"{rank:05d}.minhash.sig"
            if not path.exists():
                continue
            rec = np.fromfile(path, dtype=dtype)
            sigs[off + rec["doc"].astype(np.int64), b * hpb : (b + 1) * hpb] = rec["h"]
    return sigs


class ApplyPlan(PipelineStep):
    """Applies the plan to this rank's documents: drops duplicates (`dedup`) or applies the mix copies (`mix`)."""

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
                if self.part == "dedup":
                    if idx in examples:
                        examples[idx]["kept_id"] = doc.id
                        examples[idx]["preview"] = doc.text[:160].replace("\n", " ")
                    if 1 <= r <= 3:
                        self._reject(doc, REASONS[r], rank)
                        continue
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
        if self.exclusion_writer is not None:
            doc.metadata["filter_reason"] = why
            doc.metadata["rejected_by"] = self.part
            self.exclusion_writer.write(doc, rank)


def read_dups(path: str | Path) -> list[tuple[int, int, int, int]]:
    """The (file, doc, file, doc) pairs of a datatrove `.dups` file (for tests and debugging)."""
    raw = Path(path).read_bytes()
    return [struct.unpack("<4I", raw[i : i + 16]) for i in range(0, len(raw) - 15, 16)]
