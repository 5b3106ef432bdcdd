"""GGUF export/import judged by llama.cpp itself (llama-cpp-python 0.3.36) and by llama.cpp's own converter.

Fixture tokenizer: the tiny random checkpoints have 96 token ids, so they get a 96-token byte-level BPE vocabulary
with Qwen2's pre-tokenizer (printable ASCII + a few merges + <|endoftext|>, <|im_start|>, <|im_end|>).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_checkpoint, hf_logits, write_fixture_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py: llama.cpp's own converter, pinned)
import qwen_tokenizer  # noqa: E402  (scripts/qwen_tokenizer.py: the real Qwen vocabulary from dashscope)

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from nextq.convert.gguf_export import GGUFOptions, decode, describe, export_gguf, plan  # noqa: E402
from nextq.convert.gguf_import import read_gguf  # noqa: E402
from nextq.errors import NextqError, UnsupportedModelError  # noqa: E402
from nextq.graph import Graph  # noqa: E402
from nextq.pipeline import embedded_model  # noqa: E402
from nextq.quant import quantize  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TINY = embedded_model()


def make_ckpt(root: Path, name: str, **kw) -> Path:
    out = root / f"hf-{name}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
    out.mkdir()
    build_checkpoint(out, name, **kw)
    write_fixture_tokenizer(out, 96)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF checkpoint, IR, our F32 GGUF) for the representable tiny configs, built once."""
    from nextq.convert.cli import convert

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for key, name, kw in (("base", "base", {}), ("wide", "wide", {}), ("mtp", "base", {"mtp": True})):
        ck = make_ckpt(root, name, **kw)
        ir = root / f"ir-{key}"
        convert(str(ck), ir)
        gg = root / f"{key}.gguf"
        export_gguf(Graph.load(ir), gg)
        out[key] = (ck, ir, gg)
    return out


IDS = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(0))  # batch > 1, odd T


def stepwise(model, row: np.ndarray) -> np.ndarray:
    """Token-by-token logits [T, V] through prefill + decode."""
    out = [model.prefill(row[None, :1])]
    out += [model.decode(row[None, t:t + 1]) for t in range(1, len(row))]
    return np.concatenate(out)


@pytest.mark.parametrize("key", ["base", "wide", "mtp"])
def test_llama_cpp_matches_transformers_f32(models, key):
    import nextq

    ck, _, gg = models[key]
    ref = hf_logits(ck, IDS).numpy()
    scale = np.abs(ref).max()
    m = nextq.load(gg)
    assert m.name == "llama.cpp"
    batch = m.logits(IDS.numpy())
    # acceptance bound: F32 weights + f32 KV cache leave only float32 summation-order noise (~1e-6 relative)
    assert np.abs(batch - ref).max() / scale <= 1e-5
    assert (batch.argmax(-1) == ref.argmax(-1)).all()
    step = stepwise(m, IDS[0].numpy())
    # Token by token llama.cpp runs the recurrent form of the delta rule; transformers' own cached decode drifts
    # from its whole-sequence forward by ~1.05e-5 on one ill-conditioned position of "wide" (seed 0), so the bound
    # is 1e-5 or 1.5x the reference's own decode drift, whichever is larger.
    hf = nextq.load(ck)
    hf_step = stepwise(hf, IDS[0].numpy())
    hf_drift = np.abs(hf_step - ref[0]).max() / scale
    assert np.abs(step - ref[0]).max() / scale <= max(1e-5, 1.5 * hf_drift)
    # like with like, both engines token by token: the acceptance bound holds outright (wide: 3.5e-6)
    assert np.abs(step - hf_step).max() / scale <= 1e-5
    assert (step.argmax(-1) == ref[0].argmax(-1)).all()


@pytest.mark.parametrize("name,field", [("odd", "mlp_only_layers"), ("odd", "linear_key_head_dim"),
                                        ("sparse_step", "decoder_sparse_step"), ("sparse_step", "norm_topk_prob")])
def test_refuses_what_llama_cpp_cannot_represent(tmp_path, name, field):
    from nextq.convert.hf import read_hf

    ck = tmp_path / "hf"
    ck.mkdir()
    build_checkpoint(ck, name)
    write_fixture_tokenizer(ck, 96)
    out = tmp_path / "m.gguf"
    with pytest.raises(UnsupportedModelError, match=field):
        export_gguf(read_hf(str(ck)), out)
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))  # nothing half-written


def test_refuses_existing_output_without_force(models, tmp_path):
    from nextq.errors import OutputExistsError

    _, ir, gg = models["base"]
    with pytest.raises(OutputExistsError):
        export_gguf(Graph.load(ir), gg)


def _quantized_ir(ir: Path, out: Path, shared_scheme: str, experts: str = "int4_sym_g32") -> Path:
    def q(t, scheme, g=32):
        return quantize(t, scheme) if t.dim() == 2 and t.shape[1] % g == 0 else t

    def cast(name, t):
        if ".experts." in name:
            return q(t, experts)
        if name.endswith("mixer.out.weight"):
            return q(t, "int4_asym_g32")
        if ".mixer." in name and "conv" not in name:
            return q(t, "int8_g32")
        if ".shared." in name:
            return q(t, shared_scheme, 128 if "128" in shared_scheme else 32)
        return t

    return Graph.load(ir).save(out, cast=cast)


def _expected(graph: Graph, e) -> np.ndarray:
    """What the GGUF tensor must dequantize to: the IR's dequantized weights in llama.cpp's layout."""
    parts = []
    for s in e.pt.sources:
        t = graph.get(s)
        t = t.dequantize() if hasattr(t, "scheme") else t.float()
        parts.append((t + graph.norm_offset(s) if e.pt.rule.norm else t).numpy())
    out = e.pt.rule.pack(graph.config, parts)
    return e.pt.rule.value[0](out) if e.pt.rule.value else out


def test_quantized_ir_maps_without_requantizing(models, tmp_path):
    _, ir, _ = models["base"]
    graph = Graph.load(_quantized_ir(ir, tmp_path / "ir-q", "int4_sym_g32"))
    gg = tmp_path / "q.gguf"
    export_gguf(graph, gg)
    tensors = {t.name: t for t in gguf.GGUFReader(gg).tensors}
    types = {t.tensor_type.name for t in tensors.values()}
    assert {"Q4_0", "Q4_1", "Q8_0"} <= types
    for e in plan(graph, GGUFOptions()):
        t = tensors[e.pt.name]
        got = decode(t.data, t.tensor_type.name.lower()).reshape(e.shape)
        # exact: the blocks are the IR's own codes and fp16 scales re-laid, never re-quantized
        np.testing.assert_array_equal(got, _expected(graph, e), err_msg=e.pt.name)


def test_fp8_is_refused_then_requantized_with_measured_error(models, tmp_path, capsys):
    from nextq.console import console

    _, ir, _ = models["base"]
    graph = Graph.load(_quantized_ir(ir, tmp_path / "ir-fp8", "fp8_channel"))
    with pytest.raises(UnsupportedModelError, match="no fp8 type.*--fallback q8_0.*bf16"):
        export_gguf(graph, tmp_path / "a.gguf")
    with console.capture() as cap:
        export_gguf(graph, tmp_path / "b.gguf", GGUFOptions(requantize="q8_0"))
    text = cap.get()
    assert "re-quantized" in text and "fp8_channel" in text and "Q8_0" in text and "relative RMS" in text
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert types["blk.0.ffn_gate_shexp.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_0"  # natively mapped tensors are left alone


def test_fallback_touches_only_what_gguf_cannot_hold(models, tmp_path):
    """An fp8 shared expert beside int8-per-channel experts (no identical GGUF type, nearest Q8_0; the fixture's
    32-wide rows leave int4 g64 no room, the rule is the same): `--fallback bf16` writes only the fp8 tensors as
    BF16, as `nextq pipeline` does with Q8_0; `--requantize bf16` re-quantizes the experts too, as its help says."""
    from click.testing import CliRunner

    from nextq.cli import main

    _, ir, _ = models["base"]
    qir = _quantized_ir(ir, tmp_path / "ir-fp8-int8", "fp8_channel", experts="int8_channel")
    assert {"int8_channel", "fp8_channel"} <= {describe(t)[1] for t in Graph.load(qir).tensors.values()}
    types = {}
    for flag in ("--fallback", "--requantize"):
        out = tmp_path / f"{flag[2:]}.gguf"
        r = CliRunner().invoke(main, ["export", "gguf", str(qir), "-o", str(out), flag, "bf16"])
        assert r.exit_code == 0, r.output
        types[flag] = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["--fallback"]["blk.0.ffn_gate_shexp.weight"] == "BF16"
    assert types["--fallback"]["blk.0.ffn_gate_exps.weight"] == "Q8_0"  # its nearest type, as without the flag
    assert types["--requantize"]["blk.0.ffn_gate_shexp.weight"] == "BF16"
    assert types["--requantize"]["blk.0.ffn_gate_exps.weight"] == "BF16"


def test_float_types(models, tmp_path):
    _, ir, _ = models["base"]
    for t in ("f16", "bf16", "q8_0"):
        gg = tmp_path / f"{t}.gguf"
        export_gguf(Graph.load(ir), gg, GGUFOptions(type=t))
        types = {x.name: x.tensor_type.name for x in gguf.GGUFReader(gg).tensors}
        assert types["blk.0.attn_qkv.weight"] == t.upper()
        assert types["blk.0.ssm_conv1d.weight"] == "F32" and types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_import_round_trip(models, tmp_path):
    _, ir, gg = models["mtp"]
    src, back = Graph.load(ir), read_gguf(gg)
    assert back.config.layer_types == src.config.layer_types
    assert back.config.mtp_num_hidden_layers == 1
    for name in src.tensors:
        a, b = src.get(name).float(), back.get(name)
        if src.norm_offset(name) == 1.0:
            # stored as fl(1 + w): w comes back within half an ulp of 1.0
            assert (a - b).abs().max() <= 2.0 ** -24, name
        else:
            assert torch.equal(a, b), name  # exact for f32
    again = tmp_path / "again.gguf"
    export_gguf(back, again)
    r1, r2 = gguf.GGUFReader(gg), gguf.GGUFReader(again)
    for t1, t2 in zip(r1.tensors, r2.tensors):
        assert t1.name == t2.name and np.array_equal(t1.data, t2.data), t1.name  # GGUF -> IR -> GGUF bit-exact


# ---- llama.cpp's own converter --------------------------------------------------------------------------------



# Intentional metadata differences: general.name (llama.cpp derives it from the directory name, nextq from the
# IR's source) and general.size_label (llama.cpp's "6x45K"-style parameter label; nextq does not write it).
INTENTIONAL = {"general.name", "general.size_label"}


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("key", ["base", "mtp", "mtp-only"])
def test_same_file_as_llama_cpp_converter(models, llama_converter, tmp_path, key):
    ck, ir, ours = models[key.removesuffix("-only")]
    if key == "mtp-only":  # the MTP draft GGUF (llama.cpp's --mtp): embeddings, output norm, LM head, nextn block
        ours = tmp_path / "ours-mtp.gguf"
        export_gguf(Graph.load(ir), ours, mtp_only=True)
    ref = tmp_path / "ref.gguf"
    args = llama_cpp_converter.converter_command(llama_converter, ck, "--outtype", "f32", "--outfile", ref,
                                                 *{"base": ["--no-mtp"], "mtp": [], "mtp-only": ["--mtp"]}[key])
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    fa, fb = _fields(a), _fields(b)
    diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
    assert diff <= INTENTIONAL, {k: (fa.get(k), fb.get(k)) for k in diff - INTENTIONAL}
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    if key.startswith("mtp"):
        assert fa["qwen3next.nextn_predict_layers"] == 1 and "blk.4.nextn.eh_proj.weight" in ta
    assert ("blk.0.attn_norm.weight" in ta) == (key != "mtp-only")  # how llama.cpp tells the draft file apart
    for name, t in ta.items():
        u = tb[name]
        assert t.tensor_type == u.tensor_type and list(t.shape) == list(u.shape), name
        # <= 1e-6: only ssm_a = -exp(A_log) may differ, by float32 rounding of exp
        assert np.abs(np.asarray(t.data, np.float32) - np.asarray(u.data, np.float32)).max() <= 1e-6, name
    if key != "mtp-only":  # a llama.cpp-made file imports too
        assert read_gguf(ref).config.num_hidden_layers == 4


def test_same_metadata_as_llama_cpp_converter_with_qwen_tokenizer_files(models, llama_converter, tmp_path):
    """Qwen's own tokenizer.json has a ByteLevel post-processor and its tokenizer_config.json says
    add_bos_token false: llama.cpp's converter then writes add_bos_token and add_eos_token false, and so must nextq
    (the gguf package's SpecialVocab alone would leave add_eos_token out)."""
    import shutil

    from nextq.convert.cli import convert

    ck = shutil.copytree(models["base"][0], tmp_path / "hf")
    tj = json.loads((ck / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (ck / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((ck / "tokenizer_config.json").read_text())
    (ck / "tokenizer_config.json").write_text(json.dumps({**tc, "add_bos_token": False}))
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(str(ck), tmp_path / "ir")
    export_gguf(Graph.load(tmp_path / "ir"), ours)
    r = subprocess.run(llama_cpp_converter.converter_command(llama_converter, ck, "--outtype", "f32", "--outfile",
                                                             ref, "--no-mtp"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    fa, fb = _fields(gguf.GGUFReader(ours)), _fields(gguf.GGUFReader(ref))
    diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
    assert diff <= INTENTIONAL, {k: (fa.get(k), fb.get(k)) for k in diff - INTENTIONAL}
    assert fa["tokenizer.ggml.add_eos_token"] is False and fa["tokenizer.ggml.add_bos_token"] is False


# ---- tokenizers -----------------------------------------------------------------------------------------------

SAMPLE = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Größere Äpfel, café, naïve — ¿qué tal? Ça va très bien.",
    "Привет, как дела? Всё хорошо.",
    "我想在apple工作1314151天～ 你好，世界！",
    "こんにちは世界。カタカナとひらがな。",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "🚀 (normal) 😶‍🌫️ ✅ 🦙🦙 3 33 333 3333 3.3 3..3",
    "   leading spaces\t\ttabs\n\n\nnewlines  trailing  ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
]


def _vocab_only_gguf(tok_dir: Path, vocab_size: int, out: Path) -> Path:
    from nextq.convert.qwen3_next import read_config
    from conftest import hf_config

    config = read_config({**hf_config(vocab_size=vocab_size).to_dict(), "architectures": ["x"]})
    assets = {f: tok_dir / f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
              if (tok_dir / f).is_file()}
    export_gguf(Graph(config, {}, assets=assets), out, vocab_only=True)
    return out


def _assert_same_tokens(tok_dir: Path, gg: Path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    llm = Llama(str(gg), vocab_only=True, verbose=False)
    for text in SAMPLE:
        want = hf(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == want, text


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="embedded tokenizer not present")
def test_tokenizer_parity_embedded(tmp_path):
    vocab = len(json.loads((TINY / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    _assert_same_tokens(TINY, _vocab_only_gguf(TINY, vocab, tmp_path / "v.gguf"))


@pytest.fixture(scope="module")
def qwen_vocab(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen-vocab")
    try:
        return out, qwen_tokenizer.build(out, Path(tmp_path_factory.getbasetemp()).parent / "nextq-dashscope")
    except NextqError as e:
        pytest.skip(str(e))


def test_tokenizer_parity_real_qwen_vocab(qwen_vocab, tmp_path):
    tok_dir, n = qwen_vocab
    gg = _vocab_only_gguf(tok_dir, n, tmp_path / "qwen-vocab.gguf")
    pre = gguf.GGUFReader(gg).fields["tokenizer.ggml.pre"].contents()
    assert pre == "qwen2"
    _assert_same_tokens(tok_dir, gg)


# ---- the backend through the CLI, and the trained model ---------------------------------------------------------

def test_nextq_run_gguf(models):
    from click.testing import CliRunner

    from nextq.cli import main

    _, _, gg = models["base"]
    r = CliRunner().invoke(main, ["run", str(gg), "--prompt", "the cat", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    text = r.output.split("the cat", 1)[1].split("\nllama.cpp:")[0]  # echo, generated text, then the timing line
    assert len(text) > 0


@pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="embedded trained model not built yet")
@pytest.mark.parametrize("scheme", ["int4_sym_g32", "int8_g32"])
def test_trained_model_quantized_kld(tmp_path, scheme):
    import nextq
    from nextq.convert.cli import convert
    from nextq.validate.metrics import kl_divergence, top1_agreement

    ir = tmp_path / "ir"
    convert(str(TINY), ir, dtype="float32")

    def cast(name, t):
        return quantize(t, scheme) if t.dim() == 2 and t.shape[1] % 32 == 0 and "norm" not in name else t

    qir = Graph.load(ir).save(tmp_path / "qir", cast=cast)
    gg = tmp_path / "q.gguf"
    export_gguf(Graph.load(qir), gg)
    torch_model = nextq.load(qir)
    text = (TINY / "heldout.txt").read_text()[:4000]
    ids = np.array([torch_model.tokenizer(text)["input_ids"][:256]], dtype=np.int64)
    ref, got = torch_model.logits(ids), nextq.load(gg).logits(ids)
    # llama.cpp rounds activations to 8 bits inside quantized dot products: bit parity is not expected
    assert float(np.mean(kl_divergence(ref, got))) <= 1e-3
    assert top1_agreement(ref, got) >= 0.98
    from click.testing import CliRunner

    from nextq.cli import main

    r = CliRunner().invoke(main, ["run", str(gg), "--prompt", "def ", "--max-new-tokens", "16"])
    assert r.exit_code == 0 and len(r.output) > len("def "), r.output
