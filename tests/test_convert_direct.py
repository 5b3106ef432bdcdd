"""The direct path `nextq convert SOURCE --recipe R --to gguf|onnx|ir` writes exactly what the step-by-step path
(convert -> quantize --no-calibrate -> export) writes, read back with gguf-py's GGUFReader and onnx; and the
prefetcher behind it stays bounded whatever order its consumer reads in."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_checkpoint

from nextq.cli import main
from nextq.convert.cli import convert
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.quant.apply import Prefetcher, quantize_graph
from nextq.quant.recipes import get_recipe

gguf = pytest.importorskip("gguf")

# K = 64 / 32 everywhere so int4/int8 g32 recipes apply to every matrix; the embedded model's byte-level BPE
# tokenizer (vocab 2048, Qwen2 pre-tokenizer) so the GGUF carries a real vocabulary; bf16 like the Hub's.
DIMS = dict(hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=64,
            vocab_size=2048)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("direct") / "hf"
    build_checkpoint(out, "base", mtp=True, dtype=torch.bfloat16, **DIMS)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(embedded_model() / f, out / f)
    return out


def stepwise(ckpt: Path, recipe: str, root: Path) -> Graph:
    """convert -> quantize (RTN, as `nextq quantize --no-calibrate`) -> the quantized IR, loaded."""
    ir, qir = root / f"ir-{recipe}", root / f"qir-{recipe}"
    if not qir.exists():
        convert(str(ckpt), ir)
        quantize_graph(Graph.load(ir), get_recipe(recipe), qir)
    return Graph.load(qir)


def run_cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output + repr(r.exception)


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type, shape, data bytes)) of a GGUF file."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), bytes(np.asarray(t.data).tobytes()))
               for t in r.tensors}
    return meta, tensors


@pytest.fixture(params=[False, True], ids=["whole", "row-blocks"])
def row_blocks(request, monkeypatch):
    """With True, weights above 128 x 64 elements (embeddings, lm_head: 2048 x 64) are read, computed and streamed
    in blocks of 128 rows, as an 80B model's 151936 x 2048 ones are; checks afterwards that they were."""
    reads = []
    if request.param:
        from nextq.graph import SourceTensor
        from nextq.quant import schemes

        load_rows = SourceTensor.load_rows
        monkeypatch.setattr(schemes, "CHUNK_ELEMENTS", 128 * DIMS["hidden_size"])
        monkeypatch.setattr(SourceTensor, "load_rows", lambda t, a, b: reads.append(b - a) or load_rows(t, a, b))
    yield request.param
    assert set(reads) == ({128} if request.param else set())  # 2048 rows: 16 blocks of 128 per weight


@pytest.mark.parametrize("recipe", ["int4", "int4-int8", "int4-compact"])
def test_direct_gguf_identical_to_stepwise(ckpt, tmp_path_factory, recipe, row_blocks):
    from nextq.convert.gguf_export import export_gguf

    root = tmp_path_factory.getbasetemp() / "direct"
    ref = root / f"stepwise-{recipe}.gguf"
    if not ref.exists():
        export_gguf(stepwise(ckpt, recipe, root), ref)
    direct = root / f"direct-{recipe}-{row_blocks}.gguf"
    run_cli("convert", str(ckpt), "--recipe", recipe, "--to", "gguf", "-o", str(direct))
    meta_d, tensors_d = gguf_contents(direct)
    meta_r, tensors_r = gguf_contents(ref)
    assert meta_d == meta_r  # every key and value, general.name and the tokenizer included
    assert list(tensors_d) == list(tensors_r)
    types = {t for t, _, _ in tensors_d.values()}
    assert "Q4_0" in types and (recipe != "int4-int8" or "Q8_0" in types)  # the recipe reached the file
    for name in tensors_r:
        assert tensors_d[name] == tensors_r[name], name  # exact: same type, shape and bytes
    assert direct.read_bytes() == ref.read_bytes()  # and nothing else differs (padding, order, header)


@pytest.mark.parametrize("recipe", ["int4", "int4-compact"])
def test_direct_ir_identical_to_stepwise(ckpt, tmp_path_factory, recipe, row_blocks):
    root = tmp_path_factory.getbasetemp() / "direct"
    ref = stepwise(ckpt, recipe, root)
    out = root / f"direct-ir-{recipe}-{row_blocks}"
    run_cli("convert", str(ckpt), "--recipe", recipe, "-o", str(out))
    got = Graph.load(out)
    assert list(got.tensors) == list(ref.tensors)
    for name in ref.tensors:
        a, b = got.get(name), ref.get(name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name  # exact: the same function ran on the same bytes
        else:
            assert a.meta() == b.meta(), name
            for k, v in b.to_tensors(name).items():
                assert torch.equal(a.to_tensors(name)[k], v), k
    report = [json.loads((d / "quantization.json").read_text()) for d in (out, root / f"qir-{recipe}")]
    assert report[0] == report[1]  # per tensor and per class: a weight's row blocks make one record


def test_direct_onnx_identical_to_stepwise(ckpt, tmp_path_factory, row_blocks):
    onnx = pytest.importorskip("onnx")
    from nextq.convert.onnx_export import export_onnx

    root = tmp_path_factory.getbasetemp() / "direct"
    ref = root / "stepwise-onnx"
    if not ref.exists():
        export_onnx(stepwise(ckpt, "int4", root), ref)
    out = root / f"direct-onnx-{row_blocks}"
    run_cli("convert", str(ckpt), "--recipe", "int4", "--to", "onnx", "-o", str(out))
    # the step-by-step IR carries its quantization report into the ONNX directory; the direct path has no IR
    assert {p.name for p in ref.iterdir()} - {p.name for p in out.iterdir()} == {"quantization.json"}
    assert {p.name for p in out.iterdir()} <= {p.name for p in ref.iterdir()}
    for fname in ("model.onnx", "mtp.onnx"):
        a, b = (onnx.load(str(d / fname)) for d in (out, ref))
        inits_a = {t.name: onnx.numpy_helper.to_array(t, str(out)) for t in a.graph.initializer}
        inits_b = {t.name: onnx.numpy_helper.to_array(t, str(ref)) for t in b.graph.initializer}
        assert list(inits_a) == list(inits_b)
        for name, arr in inits_b.items():
            assert inits_a[name].dtype == arr.dtype and np.array_equal(inits_a[name], arr), name  # exact
        assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert (out / "model.onnx.data").read_bytes() == (ref / "model.onnx.data").read_bytes()


def test_direct_refuses_without_recipe_and_existing_output(ckpt, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(ckpt), "--to", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code != 0 and "--recipe" in r.output
    (tmp_path / "m.gguf").write_bytes(b"x")
    r = CliRunner().invoke(main, ["convert", str(ckpt), "--recipe", "int4", "--to", "gguf",
                                 "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code != 0 and "exists" in r.output
    assert (tmp_path / "m.gguf").read_bytes() == b"x"


def test_prefetcher_bounded_in_any_order():
    """In order: jobs run ahead within window and byte budget. Out of order or repeated: still right, still bounded."""
    names = [f"t{i}" for i in range(40)]
    sizes = {n: 10 for n in names} | {"t20": 1000}  # t20 exceeds the budget: never run ahead
    live, peak, ran = set(), [0], []
    lock = threading.Lock()

    def job(n):
        with lock:
            ran.append(n)
            live.add(n)
            peak[0] = max(peak[0], len(live))
        return n.upper()

    pre = Prefetcher(names, job, workers=2, window=8, sizes=sizes, budget=50)
    try:
        for n in names[:25]:
            assert pre.result(n) == n.upper()
            with lock:
                live.discard(n)
            assert sum(sizes[m] for m in pre.futures) <= 50  # in flight: within the budget
        assert len(pre.futures) <= 5  # budget 50 / 10 bytes each
        for n in ["t3", "t39", "t30", "t30"]:  # back, jump ahead, repeat: computed on demand, right values
            assert pre.result(n) == n.upper()
        assert all(pre.pos[m] > pre.pos["t30"] for m in pre.futures)  # jobs left behind were dropped
    finally:
        pre.close()
    assert ran.count("t20") == 1  # the big one ran once, on demand
    assert peak[0] <= 1 + 5 + 2  # consumer's + budget's + a couple finishing between the checks
