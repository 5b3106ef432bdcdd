"""A real Qwen BPE tokenizer (151,643 ranks + 3 specials) for tests and benchmarks, without the Hub.

    python scripts/qwen_tokenizer.py OUT_DIR        # writes tokenizer.json + tokenizer_config.json

The ranks are `qwen.tiktoken`, shipped inside the PyPI wheel `dashscope` (fetched once with `pip download` into a
cache). tokenizer.json is Qwen2-style (byte-level BPE with the qwen2 pre-tokenizer regex, as the embedded tiny
model's), its merges recovered from the ranks as llama.cpp's converter does for tiktoken vocabularies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nextq.errors import NextqError
from nextq.pipeline import embedded_model

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "nextq-dashscope"


def fetch_tiktoken(out: Path, cache: Path = DEFAULT_CACHE) -> Path:
    """Extract qwen.tiktoken from the dashscope wheel (downloaded into `cache` once) into `out`."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("dashscope-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "dashscope", "-d", str(cache)],
                           capture_output=True, text=True)
        wheels = sorted(cache.glob("dashscope-*.whl"))
        if not wheels:
            raise NextqError(f"cannot download dashscope (ships qwen.tiktoken): {r.stderr.strip()[-200:]}")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        (out / "qwen.tiktoken").write_bytes(z.read("dashscope/resources/qwen.tiktoken"))
    return out / "qwen.tiktoken"


def tokenizer_json(ranks_file: Path, out: Path) -> int:
    """A Qwen2-style tokenizer.json from qwen.tiktoken (real Qwen BPE ranks): merges recovered by re-running BPE
    on each token up to its own rank, as llama.cpp's converter does for tiktoken vocabularies."""
    import base64

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = {}
    for line in ranks_file.read_text().splitlines():
        if line:
            b64, r = line.split()
            ranks[base64.b64decode(b64)] = int(r)
    b2u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    def split(token: bytes, rank: int) -> list[bytes]:
        parts = [bytes([x]) for x in token]
        while True:
            best = min(((ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                        if ranks.get(a + b) is not None), default=None)
            if best is None or best[0] >= rank:
                return parts
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    vocab = {text(b): r for b, r in ranks.items()}
    merges = []
    for b, r in sorted(ranks.items(), key=lambda x: x[1]):
        if len(b) > 1:
            p = split(b, r)
            assert len(p) == 2, b
            merges.append([text(p[0]), text(p[1])])
    n = len(ranks)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tj = json.loads((embedded_model() / "tokenizer.json").read_text())  # Qwen2-style skeleton
    tj["model"]["vocab"], tj["model"]["merges"] = vocab, merges
    tj["added_tokens"] = [{"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": True} for i, s in enumerate(specials)]
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return n + len(specials)


def build(out: Path, cache: Path = DEFAULT_CACHE) -> int:
    """Write tokenizer.json + tokenizer_config.json into `out`; returns the token count (ids 0..n-1)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        return tokenizer_json(fetch_tiktoken(Path(tmp), cache), Path(out))


if __name__ == "__main__":
    print(f"{sys.argv[1]}: {build(Path(sys.argv[1]))} tokens")
