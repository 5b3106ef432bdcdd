"""Validation corpora and the fixed-length token windows the metrics are computed on.

A corpus spec (the CLI's `--corpus`, repeatable) is one of
    builtin / default     the embedded model's held-out text (nextq/assets/tiny/heldout.txt, never trained on)
    PATH                  a local text file, or a directory whose *.txt files are read in sorted order
    hf:REPO[:CONFIG[:SPLIT]]   a Hugging Face dataset (parquet files on the Hub, column "text", split "test"
                          unless named); `hf:` alone or `hf:wikitext-2` means wikitext-2 (Salesforce/wikitext,
                          wikitext-2-raw-v1, test).
                          Needs the Hub: offline, it fails with one line saying so.

Windows (perplexity the way llama.cpp and transformers' docs compute it, with a sliding stride):
the texts are joined with a blank line, tokenized once with the reference's tokenizer, and cut into windows of
`window` tokens starting every `stride` tokens (stride <= window). Window 0 scores every prediction (positions
0..T-2 predict tokens 1..T-1); each later window scores only its last min(stride, T-1) predictions. With
stride < window every token after the first is scored exactly once, with at least `window - stride` tokens of
context; with the default stride = window (disjoint windows, as in transformers' perplexity recipe) each
window's first token is context only. Tokens after the last whole window are dropped; a corpus shorter than one
window gives a single shorter window.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from nextq.errors import NextqError


class CorpusError(NextqError):
    """A corpus cannot be read (missing file, offline Hub, empty text, bad window settings)."""


HF_ALIASES = {"wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")}
DEFAULT_HF = "hf:wikitext-2"


@dataclass(frozen=True)
class Corpus:
    """Named text documents and a content hash (part of the reference-logits cache key)."""

    name: str
    texts: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.texts)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_text_path() -> Path:
    """The embedded model's held-out text (the default corpus)."""
    return Path(str(resources.files("nextq") / "assets" / "tiny" / "heldout.txt"))


def read_local(path: Path) -> Corpus:
    """A text file, or a directory's *.txt files in sorted order."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CorpusError(f"corpus {path}: directory has no *.txt files")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"corpus {path}: no such file or directory")
    return Corpus(str(path), tuple(f.read_text(encoding="utf-8", errors="replace") for f in files))


def read_hub(spec: str) -> Corpus:
    """`hf:REPO[:CONFIG[:SPLIT]]` -> the dataset's "text" column, from its parquet files on the Hub."""
    body = spec.removeprefix("hf:") or DEFAULT_HF.removeprefix("hf:")
    if body in HF_ALIASES:
        repo, config, split = HF_ALIASES[body]
    else:
        parts = body.split(":")
        repo, config, split = parts[0], (parts[1:2] or [None])[0], (parts[2:3] or ["test"])[0]
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    offline = (f"corpus {spec}: the Hugging Face Hub is unreachable (offline), so dataset {repo!r} cannot be "
               f"fetched; use --corpus builtin or --corpus PATH to a local text file")
    if HF_HUB_OFFLINE or not hub_reachable():
        raise CorpusError(offline)
    try:
        files = HfApi().list_repo_files(repo, repo_type="dataset")
    except Exception as e:  # connection refused / DNS failure / timeout all mean the same thing here
        if _is_network_error(e):
            raise CorpusError(offline) from None
        raise CorpusError(f"corpus {spec}: cannot list dataset {repo!r}: {e}") from None
    prefix = f"{config}/" if config else ""
    wanted = sorted(f for f in files if f.startswith(prefix) and f.endswith(".parquet")
                    and (split is None or Path(f).name.startswith(f"{split}-")))
    if not wanted:
        raise CorpusError(f"corpus {spec}: dataset {repo!r} has no parquet files for config={config!r} "
                          f"split={split!r}")
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise CorpusError(f"corpus {spec}: reading Hub datasets needs 'pyarrow', which is not installed") from None
    texts = []
    for f in wanted:
        table = pq.read_table(hf_hub_download(repo, f, repo_type="dataset"), columns=["text"])
        texts.append("".join(table.column("text").to_pylist()))
    return Corpus(spec, tuple(texts))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub's endpoint (huggingface_hub itself retries for ~30 s before failing)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _is_network_error(e: BaseException) -> bool:
    names = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "ConnectError", "OfflineModeIsEnabled",
             "LocalEntryNotFoundError", "gaierror", "TimeoutError", "OSError"}
    while e is not None:
        if type(e).__name__ in names or isinstance(e, (ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def read_corpus(spec: str | None) -> Corpus:
    """Resolve one corpus spec (see the module docstring)."""
    if spec in (None, "builtin", "default"):
        c = read_local(builtin_text_path())
        return Corpus("builtin", c.texts)
    if spec.startswith("hf:"):
        return read_hub(spec)
    return read_local(Path(spec))


def read_corpora(specs: tuple[str, ...] | list[str] | None) -> Corpus:
    """Several specs concatenated in order (none = the built-in default)."""
    parts = [read_corpus(s) for s in (specs or [None])]
    if len(parts) == 1:
        return parts[0]
    return Corpus("+".join(p.name for p in parts), tuple(t for p in parts for t in p.texts))


@dataclass(frozen=True)
class Windows:
    """Token windows over a corpus. ids: [W, T] int64; first_scored: [W] index of the first logit position
    scored in each window (logit position t predicts token t + 1, so positions first_scored..T-2 count)."""

    ids: np.ndarray
    first_scored: np.ndarray
    window: int
    stride: int
    corpus: str
    corpus_sha256: str
    total_tokens: int

    @property
    def mask(self) -> np.ndarray:
        """[W, T-1] bool: which logit positions are scored."""
        pos = np.arange(self.ids.shape[1] - 1)
        return pos[None, :] >= self.first_scored[:, None]

    @property
    def targets(self) -> np.ndarray:
        """[W, T-1] next-token targets."""
        return self.ids[:, 1:]

    @property
    def scored_tokens(self) -> int:
        return int(self.mask.sum())

    def settings(self) -> dict:
        """Everything the windows depend on besides the tokenizer (part of the cache key)."""
        return {"corpus_sha256": self.corpus_sha256, "window": self.window, "stride": self.stride,
                "windows": int(self.ids.shape[0]), "ids_sha256": hashlib.sha256(self.ids.tobytes()).hexdigest()}


def make_windows(tokens: np.ndarray, window: int, stride: int | None = None, max_windows: int | None = None,
                 corpus: Corpus | None = None) -> Windows:
    """Cut a token stream [N] into windows (see the module docstring for what each window scores)."""
    stride = stride or window
    if window < 2:
        raise CorpusError(f"window: expected >= 2 tokens, got {window}")
    if not 0 < stride <= window:
        raise CorpusError(f"stride: expected 1..window={window}, got {stride}")
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    if n < 2:
        raise CorpusError(f"corpus {corpus.name if corpus else ''}: {n} tokens, need at least 2")
    if n < window:
        window = n
    count = (n - window) // stride + 1
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count) * stride
    ids = np.stack([tokens[s:s + window] for s in starts])
    first = np.where(starts == 0, 0, max(window - 1 - stride, 0)).astype(np.int64)
    return Windows(ids, first, window, stride, corpus.name if corpus else "tokens",
                   corpus.sha256 if corpus else hashlib.sha256(tokens.tobytes()).hexdigest(), n)


def tokenize(corpus: Corpus, tokenizer) -> np.ndarray:
    """The corpus as one token stream [N] int64 (no special tokens added)."""
    if tokenizer is None:
        raise CorpusError(f"corpus {corpus.name}: the reference has no tokenizer files to tokenize it with")
    ids = tokenizer(corpus.text, add_special_tokens=False, verbose=False)["input_ids"]  # no max-length warning
    return np.asarray(ids, dtype=np.int64)


def windows_for(reference: str | Path, specs: tuple[str, ...] | list[str] | None, window: int = 256,
                stride: int | None = None, max_windows: int | None = None) -> Windows:
    """Read the corpora and cut them into windows with the reference's tokenizer (files beside a .gguf)."""
    from nextq.runtime.backends import load_tokenizer

    reference = Path(reference)
    tokenizer = load_tokenizer(reference if reference.is_dir() else reference.parent)
    corpus = read_corpora(specs)
    return make_windows(tokenize(corpus, tokenizer), window, stride, max_windows, corpus)
