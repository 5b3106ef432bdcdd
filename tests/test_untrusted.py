"""Untrusted input (nextq/untrusted.py): names never leave their directory, headers are checked before any
allocation, publish uploads only regular files inside DIR, the CLI answers bad input with one error line."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

import nextq
from nextq.cli import main
from nextq.errors import InputError, NextqError, UnsafePathError
from nextq.graph import Graph
from nextq.pipeline import embedded_model


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> Path:
    """The embedded model as an IR directory (float, one shard)."""
    out = tmp_path_factory.mktemp("untrusted") / "seed-ir"
    nextq.read(embedded_model()).save(out)
    return out


@pytest.fixture
def evil(ir: Path, tmp_path: Path) -> Path:
    """A fresh copy of the IR at tmp/evil, with a valid shard copy beside it (what `../` names would find)."""
    d = tmp_path / "evil"
    shutil.copytree(ir, d)
    shutil.copyfile(d / "shard-00001.safetensors", tmp_path / "outside.safetensors")
    return d


def edit_graph(d: Path, fn) -> None:
    doc = json.loads((d / "graph.json").read_text())
    fn(doc)
    (d / "graph.json").write_text(json.dumps(doc))


def one_error_line(*argv) -> str:
    """Run the CLI; expect a non-zero exit and exactly one output line, `error: ...` (no traceback)."""
    res = CliRunner().invoke(main, [str(a) for a in argv])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code not in (0, None) and res.exception is None or isinstance(res.exception, SystemExit), \
        res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


# ---- the three escapes and a symlink --------------------------------------------------------------------------


def test_asset_outside_the_directory_is_refused_and_never_published(evil: Path):
    edit_graph(evil, lambda doc: doc["assets"].append("../../../etc/hostname"))
    with pytest.raises(UnsafePathError, match=r"asset '\.\./\.\./\.\./etc/hostname' is not a plain relative path"):
        Graph.load(evil)
    from nextq.publish import make_plan

    with pytest.raises(UnsafePathError):
        make_plan(evil, "me/model", allow_unvalidated=True)
    line = one_error_line("publish", evil, "--repo-id", "me/model", "--dry-run", "--allow-unvalidated")
    assert "etc/hostname" in line and "not a plain relative path" in line


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_shard_outside_the_directory_is_refused(evil: Path, how: str):
    outside = evil.parent / "outside.safetensors"  # a valid shard: only the path check can refuse it
    if how == "symlink":
        (evil / "shard-00001.safetensors").unlink()
        (evil / "shard-00001.safetensors").symlink_to(outside)
        expect = r"resolves to .*outside\.safetensors, outside"
    else:
        name = str(outside) if how == "absolute" else "../outside.safetensors"
        edit_graph(evil, lambda doc: doc["tensors"]["embed.weight"].update(shard=name))
        expect = r"shard '.*outside\.safetensors' is not a plain relative path inside the directory"
    with pytest.raises(UnsafePathError, match=expect):
        Graph.load(evil)
    assert "error: " in one_error_line("inspect", evil)


@pytest.mark.parametrize("name", [".", "./", "sub/.."])
def test_shard_naming_the_directory_itself_is_a_clean_error(evil: Path, name: str):
    edit_graph(evil, lambda doc: doc["tensors"]["embed.weight"].update(shard=name))
    with pytest.raises(InputError):  # no path component: once a raw ValueError (max() of nothing)
        Graph.load(evil).get("embed.weight")


def test_symlink_inside_the_directory_is_fine(evil: Path):
    (evil / "sub").mkdir()
    (evil / "shard-00001.safetensors").rename(evil / "sub" / "real.safetensors")
    (evil / "shard-00001.safetensors").symlink_to("sub/real.safetensors")
    g = Graph.load(evil)
    assert g.get("embed.weight").shape == (g.config.vocab_size, g.config.hidden_size)


def test_hf_index_shard_outside_is_refused(tmp_path: Path):
    src = tmp_path / "hf"
    shutil.copytree(embedded_model(), src)
    shutil.copyfile(src / "model.safetensors", tmp_path / "elsewhere.safetensors")
    from nextq.storage import read_header

    keys = read_header(src / "model.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}))
    with pytest.raises(UnsafePathError, match=r"shard '\.\./elsewhere\.safetensors'"):
        nextq.read(src)


def test_hub_cache_snapshot_may_point_into_its_blobs(tmp_path: Path):
    """A Hub cache snapshot's files are symlinks to ../../blobs: inside the repo's cache folder, so accepted."""
    repo = tmp_path / "models--o--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in embedded_model().iterdir():
        shutil.copyfile(p, repo / "blobs" / p.name)
        (snap / p.name).symlink_to(Path("../../blobs") / p.name)
    assert len(nextq.read(snap).tensors) > 0


# ---- allow-lists and bounds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("edit,expect", [
    (lambda d: d["tensors"]["embed.weight"].update(dtype="Tensor"), r"dtype 'Tensor', supported: float64"),
    (lambda d: d["tensors"]["norm.weight"].update(shape=[2 ** 40, 2 ** 40]),
     r"graph.json says \w+ \[1099511627776, 1099511627776\], shard-00001.safetensors stores"),
    (lambda d: d["config"].update(hidden_size="32"), r"field hidden_size: expected int, got '32'"),
    (lambda d: d["config"].update(linear_num_key_heads=0), r"field linear_num_key_heads: expected integers >= 1"),
    (lambda d: d["config"].pop("vocab_size"), r"missing field\(s\) \['vocab_size'\]"),
    (lambda d: d["tensors"]["embed.weight"].update(extra=1), r"unknown field\(s\) \['extra'\]"),
    (lambda d: d.update(tensors=[]), r"tensors: expected a JSON dict"),
])
def test_graph_json_schema(evil: Path, edit, expect):
    edit_graph(evil, edit)
    with pytest.raises(NextqError, match=expect):
        Graph.load(evil)


def test_safetensors_header_claiming_2_40_elements_is_refused_before_allocation(tmp_path: Path):
    from nextq.storage import read_header

    header = json.dumps({"w": {"dtype": "F32", "shape": [2 ** 20, 2 ** 20], "data_offsets": [0, 16]}}).encode()
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    tracemalloc.start()
    with pytest.raises(InputError, match=r"shape \[1048576, 1048576\] of F32 is 4398046511104 bytes"):
        read_header(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # nothing near the claimed 4 TiB was allocated (bound: 1 MiB of Python objects)


def gguf_bytes(dims: list[int], data: int, strings: dict[str, str] | None = None) -> bytes:
    """A minimal GGUF v3: general.architecture = qwen3next (+ `strings`), one F32 tensor token_embd.weight of
    `dims`."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kvs = {"general.architecture": "qwen3next", **(strings or {})}
    kv = b"".join(s(k) + struct.pack("<I", 8) + s(v) for k, v in kvs.items())
    info = s("token_embd.weight") + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
    info += struct.pack("<IQ", 0, 0)  # F32, offset 0
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + kv + info
    return head + b"\0" * (-len(head) % 32) + b"\0" * data


def test_gguf_header_claiming_2_40_elements_is_refused_before_allocation(tmp_path: Path):
    import nextq.convert.gguf_import  # noqa: F401  (imported outside the measurement)

    p = tmp_path / "big.gguf"
    p.write_bytes(gguf_bytes([2 ** 20, 2 ** 20], 64))
    tracemalloc.start()
    with pytest.raises(InputError, match=r"tensor 'token_embd.weight': dims \[1048576, 1048576\] need 4398046511104"):
        nextq.read(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert "token_embd.weight" in one_error_line("inspect", p)


def test_gguf_zero_dim_beside_a_huge_one_is_refused(tmp_path: Path):
    """dims [~2^63, 0] need 0 bytes, so the size check alone let them through to gguf-py's reshape (a raw numpy
    ValueError; fuzz_readers gguf mutant 8279 of seed 0)."""
    p = tmp_path / "zero.gguf"
    p.write_bytes(gguf_bytes([9151314442816848000, 0], 64))
    with pytest.raises(InputError, match=r"dims \[9151314442816848000, 0\], expected every dim >= 1"):
        nextq.read(p)
    assert "expected every dim >= 1" in one_error_line("inspect", p)


def test_gguf_tokenizer_without_vocabulary_is_refused(tmp_path: Path):
    p = tmp_path / "tok.gguf"
    p.write_bytes(gguf_bytes([4, 4], 64, {"tokenizer.ggml.model": "gpt2"}))
    with pytest.raises(InputError, match=r"tokenizer.ggml.model is set but \['tokenizer.ggml.tokens', "):
        nextq.read(p)


@pytest.mark.parametrize("cut", [0, 3, 20, 60])
def test_truncated_gguf_is_one_clean_error(tmp_path: Path, cut: int):
    p = tmp_path / "cut.gguf"
    p.write_bytes(gguf_bytes([4, 4], 64)[:cut])
    with pytest.raises(InputError):
        nextq.read(p)


@pytest.fixture(scope="module")
def seed_gguf(tmp_path_factory) -> Path:
    """The embedded model as a GGUF (nextq's export, with its tokenizer)."""
    from nextq.convert.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("untrusted-gguf") / "tiny.gguf"
    export_gguf(nextq.read(embedded_model()), out)
    return out


def test_gguf_import_leaves_no_temporary_directory(seed_gguf: Path, tmp_path: Path, monkeypatch):
    """The tokenizer files an import writes live while the graph (or a copy of its assets) does, then go; a
    tokenizer refused halfway leaves nothing either."""
    import gc
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    g = nextq.read(seed_gguf)
    assert [p.name for p in tmp.iterdir()] and all(p.is_file() for p in g.assets.values())
    g.save(tmp_path / "ir")  # the assets are read after read_gguf returned
    assert (tmp_path / "ir" / "tokenizer.json").is_file()
    del g
    gc.collect()
    assert list(tmp.iterdir()) == []
    assert CliRunner().invoke(main, ["inspect", str(seed_gguf)]).exit_code == 0
    gc.collect()
    assert list(tmp.iterdir()) == []

    raw = bytearray(seed_gguf.read_bytes())  # tokenizer.ggml.pre = "qwen2" -> "xwen2": refused inside the writer
    at = raw.index(b"tokenizer.ggml.pre") + len("tokenizer.ggml.pre") + 4 + 8
    raw[at:at + 1] = b"x"
    bad = tmp_path / "bad-tok.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(NextqError, match=r"tokenizer.ggml.pre='xwen"):
        nextq.read(bad)
    assert list(tmp.iterdir()) == []


# ---- engine inputs: what llama.cpp and ONNX Runtime get is checked first ---------------------------------------


def test_run_gguf_claiming_2_40_elements_never_reaches_llama_cpp(tmp_path: Path):
    p = tmp_path / "big.gguf"
    p.write_bytes(gguf_bytes([2 ** 20, 2 ** 20], 64))
    line = one_error_line("run", p, "--prompt", "hi")
    assert "big.gguf: tensor 'token_embd.weight': dims [1048576, 1048576] need 4398046511104 bytes" in line, line
    p.write_bytes(gguf_bytes([4, 4], 64, {"qwen3next.context_length": "long"}))  # read before llama.cpp loads
    assert "qwen3next.context_length: expected int, got type 8" in one_error_line("run", p, "--prompt", "hi")


def small_onnx_dir(d: Path) -> Path:
    """An ONNX dir whose model.onnx (y = x + w) keeps w, 64 floats, in model.onnx.data."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], [w])
    d.mkdir()
    onnx.save_model(helper.make_model(graph), d / "model.onnx", save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    return d


def set_external(model: Path, **entries: str) -> None:
    """Rewrite the external_data entries (location / offset / length) of every tensor of `model`."""
    import onnx

    m = onnx.load_model(str(model), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            e.value = entries.get(e.key, e.value)
    model.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("how,expect", [
    ("dotdot", r"external data '\.\./secret\.bin' is not a plain relative path"),
    ("absolute", r"external data .*secret\.bin is not inside the directory"),
    ("data symlink", r"external data 'model\.onnx\.data' resolves to .*secret\.bin, outside"),
    ("model symlink", r"model file 'model\.onnx' resolves to .*evil\.onnx, outside"),
    ("past the end", r"tensor 'w' external_data: bytes \[1000, 1256\) of 'model\.onnx\.data', which has 256"),
    ("not onnx", r"model\.onnx: not a valid ONNX model"),
    ("not utf-8", r"tensor 'w' external_data: an entry is not UTF-8 text"),  # found by fuzz_readers, onnx #241
])
def test_run_onnx_dir_leaving_its_directory_never_reaches_onnxruntime(tmp_path: Path, how: str, expect: str):
    from nextq.runtime.backends import check_onnx_input

    d = small_onnx_dir(tmp_path / "onnx")
    check_onnx_input(d)  # the seed passes
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    if how in ("dotdot", "absolute"):
        set_external(d / "model.onnx", location="../secret.bin" if how == "dotdot" else str(secret))
    elif how == "data symlink":
        (d / "model.onnx.data").unlink()
        (d / "model.onnx.data").symlink_to(secret)
    elif how == "model symlink":
        (d / "model.onnx").rename(tmp_path / "evil.onnx")
        (d / "model.onnx").symlink_to(tmp_path / "evil.onnx")
    elif how == "past the end":
        set_external(d / "model.onnx", offset="1000")
    elif how == "not utf-8":
        set_external(d / "model.onnx", offset="7777")
        (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes().replace(b"7777", b"77\xda7"))
    else:
        (d / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match=expect):
        check_onnx_input(d)
    line = one_error_line("run", d, "--prompt", "hi")
    assert re.search(expect, line), line


# ---- publish: regular files inside DIR only -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["symlink", "fifo"])
def test_publish_refuses_anything_but_regular_files_inside(ir: Path, tmp_path: Path, how: str):
    from nextq.publish import make_plan

    d = tmp_path / "out"
    shutil.copytree(ir, d)
    (d / "onnx").mkdir()
    (d / "onnx" / "model.onnx").write_bytes(b"\0" * 16)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    if how == "symlink":
        (d / "onnx" / "model.onnx.data").symlink_to(secret)
        expect = r"upload 'onnx/model.onnx.data' resolves to .*secret\.txt, outside"
    else:
        os.mkfifo(d / "onnx" / "model.onnx.data")
        expect = r"model\.onnx\.data: upload is not a regular file"
    with pytest.raises(UnsafePathError, match=expect):
        make_plan(d, "me/model", allow_unvalidated=True)
    assert make_plan(d, "me/model", include=["ir"], allow_unvalidated=True).files  # the IR alone is fine


# ---- the CLI: one line, non-zero exit, nothing written --------------------------------------------------------


def test_cli_bad_ir_is_one_line_and_writes_nothing(evil: Path, tmp_path: Path):
    (evil / "graph.json").write_bytes(b'{"format": "nextq-ir", "version": 1, "config": {"vocab_size": [')
    line = one_error_line("export", "gguf", evil, "-o", tmp_path / "out.gguf")
    assert "graph.json: not valid JSON" in line
    assert not (tmp_path / "out.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil", "outside.safetensors"]  # no temporary left


def test_cli_unreadable_input_is_one_line(tmp_path: Path):
    d = tmp_path / "ir"
    d.mkdir()
    (d / "graph.json").mkdir()  # a directory where a file is expected
    assert one_error_line("inspect", d).startswith("error: ")
