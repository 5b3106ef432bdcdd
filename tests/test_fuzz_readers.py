"""Seeded, bounded fuzzing of every reader (scripts/fuzz_readers.py; the long run is `--n 10000` there): each
mutant of the embedded model's GGUF, IR (float and quantized), Hugging Face checkpoint, a validation report and a
recipe, and the ONNX export directory's entry check, ends in a clean nextq error or reads fine; none raises
anything else, opens or lists a file outside its directory, or hangs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_readers  # noqa: E402  (scripts/fuzz_readers.py)

# mutants per reader: the cheap parsers get 300, the whole-model readers fewer (a GGUF import dequantizes the model)
N = {"report": 300, "recipe": 300, "hf": 150, "onnx": 150, "ir": 100, "ir-quant": 100, "gguf": 100}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("readers", [("report", "recipe", "hf", "onnx"), ("ir", "ir-quant", "gguf")])
def test_fuzzed_readers_fail_cleanly(work: Path, readers: tuple[str, ...], capsys):
    n = max(N[r] for r in readers)
    args = fuzz_readers.parse_args(["--n", str(n), "--readers", ",".join(readers), "--work", str(work),
                                    "--seed", "15", "--workers", "2"])
    counts = fuzz_readers.run(args, n_per_reader={r: N[r] for r in readers})
    report = capsys.readouterr()
    for r in readers:
        c = counts[r]
        assert sum(c.values()) == N[r], (r, c)
        assert c["raw"] == c["escape"] == c["hang"] == 0, (r, dict(c), report.err[-3000:])
        assert c["clean"] > 0, (r, dict(c))  # the mutants do reach the checks
