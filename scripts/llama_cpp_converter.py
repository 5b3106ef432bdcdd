"""llama.cpp's own converter (`convert_hf_to_gguf.py`), taken from the llama-cpp-python sdist we pin, as the
anchor that tests and benchmarks compare nextq with.

    root = source_root(cache_dir)                          # pip download + unpack once, cached
    subprocess.run(converter_command(root, hf_dir, "--outtype", "f32", "--outfile", "ref.gguf"))

The converter names the pre-tokenizer by hashing the token ids of a fixed text and knows only published
vocabularies; our tokenizers (the embedded model's BPE, test fixtures) use Qwen2's split regex but have no
registered hash, so the run pins that one lookup to "qwen2" and touches nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"

RUNNER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def source_root(cache: Path) -> Path:
    """The vendored llama.cpp tree of the pinned sdist under `cache` (downloaded with pip on first use).

    Raises RuntimeError with pip's message when the download fails.
    """
    root = cache / SDIST.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / SDIST).is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            LLAMA_CPP_PYTHON, "-d", str(cache)], capture_output=True, text=True)
        if not (cache / SDIST).is_file():
            raise RuntimeError(f"cannot download the {LLAMA_CPP_PYTHON} sdist: {r.stderr.strip()[-200:]}")
    with tarfile.open(cache / SDIST) as tf:
        tf.extractall(cache, filter="data")
    return root


def converter_command(root: Path, *args: str) -> list[str]:
    """argv running `convert_hf_to_gguf.py *args` from `root` with the pre-tokenizer pinned to qwen2."""
    return [sys.executable, "-c", RUNNER, str(root), *map(str, args)]
