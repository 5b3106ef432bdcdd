"""Recipes, per-expert quantization of whole models, calibration (GPTQ / awmse) and the quantize / recipes CLI.

Models: a tiny random checkpoint with widths that every built-in's group size divides (hidden 64, experts 64) and
the tokenizer of the embedded model (so calibration text can be tokenized), built once for the module; the
`base` config (experts of width 16) for the ragged-K refusal; the embedded trained model when it is present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nextq.cli import main
from nextq.convert.cli import convert
from nextq.errors import RecipeError
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.quant import QuantizedTensor, dequantize, quantize, to_gguf_q4_0_blocks
from nextq.quant import calibrate
from nextq.quant.schemes import GPU_DEQUANT, SCHEMES
from nextq.quant.apply import REPORT_JSON, REPORT_MD, quantize_graph
from nextq.quant.recipes import (
    RECIPES,
    Override,
    Recipe,
    get_recipe,
    plan_schemes,
    recipe_from_dict,
    tensor_classes,
)
from nextq.runtime.model import TorchModel
from nextq.validate.metrics import kl_divergence

from conftest import build_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WIDE = dict(vocab_size=2048, hidden_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64)


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> Path:
    """A float IR (bf16, with MTP and tokenizer files) of a random tiny model whose widths fit every built-in."""
    root = tmp_path_factory.mktemp("quant-recipes")
    hf = build_checkpoint(root / "hf", "base", mtp=True, dtype=torch.bfloat16, **WIDE)
    for f in TOKENIZER_FILES:
        shutil.copy(embedded_model() / f, hf / f)
    convert(str(hf), root / "ir")
    return root / "ir"


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(ir, ids) -> np.ndarray:
    return TorchModel(Graph.load(ir)).forward(ids).numpy()


@pytest.fixture(scope="module")
def stats(ir) -> calibrate.CalibrationStats:
    windows = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(2))
    return calibrate.collect_stats(Graph.load(ir), windows)


def dequantized_logits(qir: Path, ids: torch.Tensor) -> np.ndarray:
    """Logits of the runtime fed float32 weights dequantized here, tensor by tensor (the runtime's own
    dequantization at load is what is under test)."""
    g = Graph.load(qir)
    g.tensors = {n: (t.dequantize() if isinstance(t, QuantizedTensor) else t)
                 for n, t in ((n, g.get(n)) for n in g.tensors)}
    return TorchModel(g).forward(ids).numpy()


# ---- built-in recipes end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RECIPES))
def test_builtin_round_trip(name, ir, ids, reference, tmp_path):
    recipe = RECIPES[name]
    graph = Graph.load(ir)
    report = quantize_graph(graph, recipe, tmp_path / "q")
    q = Graph.load(tmp_path / "q")
    plan = plan_schemes(recipe, graph.config)
    for n, entry in plan.items():
        t = q.get(n)
        if entry.scheme in ("keep", "bf16", "f16", "f32"):
            assert isinstance(t, torch.Tensor), n
            if entry.scheme == "keep":  # bit-exact pass-through
                assert torch.equal(t, graph.get(n)), n
        else:
            assert isinstance(t, QuantizedTensor) and t.scheme == entry.scheme, n
            # per-expert scales: RTN output is exactly the scheme's quantize of that one tensor
            assert torch.equal(t.data.view(torch.uint8), quantize(graph.get(n), entry.scheme).data.view(torch.uint8)), n
    stored = json.loads((tmp_path / "q" / REPORT_JSON).read_text())
    assert stored["bits_per_weight"] == pytest.approx(report["bits_per_weight"])
    assert json.loads((tmp_path / "q" / "graph.json").read_text())["provenance"]["quantization"]["recipe"]["name"] == name
    logits = TorchModel(q).forward(ids).numpy()
    assert np.isfinite(logits).all()
    # the runtime's dequantize-at-load path equals dequantizing by hand: same float32 weights, same math
    np.testing.assert_allclose(logits, dequantized_logits(tmp_path / "q", ids), rtol=0, atol=1e-5)
    assert kl_divergence(reference, logits).mean() > 0  # something was quantized


def test_precision_ordering(ir, ids, reference, tmp_path):
    """Q8_0-style int8 drifts less than fp8 e4m3, which drifts less than int4 (errors ~0.3%, ~2%, ~8% of |w|:
    the ordering holds with margins far wider than the randomness of one tiny model)."""
    graph = Graph.load(ir)
    kld = {}
    for name in ("int8", "fp8"):
        quantize_graph(graph, RECIPES[name], tmp_path / name)
        kld[name] = kl_divergence(reference, TorchModel(Graph.load(tmp_path / name)).forward(ids).numpy()).mean()
    all4 = Recipe("all-int4", **{c: "int4_sym_g32" for c in ("experts", "shared_expert", "deltanet", "attention",
                                                             "mtp")})
    quantize_graph(graph, all4, tmp_path / "int4")
    kld["int4"] = kl_divergence(reference, TorchModel(Graph.load(tmp_path / "int4")).forward(ids).numpy()).mean()
    assert kld["int8"] < kld["fp8"] < kld["int4"], kld


@pytest.mark.slow
def test_embedded_model_round_trip(tmp_path):
    from nextq.runtime.backends import load_tokenizer

    src = embedded_model()
    if not (src / "model.safetensors").is_file():
        pytest.skip("the embedded trained model is not present yet")
    convert(str(src), tmp_path / "ir")
    graph = Graph.load(tmp_path / "ir")
    tok = load_tokenizer(tmp_path / "ir")
    tok.model_max_length = 1 << 62  # long texts cut into windows below
    heldout = (src / "heldout.txt").read_text()
    ids = calibrate.token_windows(tok(heldout[:20000])["input_ids"], 1, 128)
    calib = calibrate.token_windows(tok(calibrate.default_calibration_text(60000, heldout))["input_ids"], 4, 256)
    stats = calibrate.collect_stats(graph, calib)
    ref = TorchModel(graph).forward(ids).numpy()
    for name in RECIPES:  # every built-in round-trips; the calibrated path once (GPTQ costs ~5 s per recipe here)
        quantize_graph(graph, RECIPES[name], tmp_path / name, stats=stats if name == "int4" else None)
        logits = TorchModel(Graph.load(tmp_path / name)).forward(ids).numpy()
        # a trained model: 8-bit recipes stay within 0.01 nats, int4 within 0.1 (bench figures are ~5x lower)
        bound = 0.01 if name in ("fp8", "int8") else 0.1
        assert kl_divergence(ref, logits).mean() < bound, name


# ---- ragged K -------------------------------------------------------------------------------------------------


def test_ragged_k_is_refused_with_the_tensor_named(ckpt_factory, tmp_path):
    convert(str(ckpt_factory("base")), tmp_path / "ir")  # experts: moe_intermediate_size 16, down has K = 16
    graph = Graph.load(tmp_path / "ir")
    with pytest.raises(RecipeError, match=r"experts\.0\.down\.weight \(experts\): int4_sym_g32 needs K to be a "
                                          r"multiple of 32, got K=16"):
        quantize_graph(graph, RECIPES["int4"], tmp_path / "q")
    assert not (tmp_path / "q").exists()  # refused before anything was written
    fixed = Recipe("int4-ragged", experts="int4_sym_g32",
                   overrides=(Override("layers.*.ffn.experts.*.down.weight", "int8_channel"),))
    quantize_graph(graph, fixed, tmp_path / "q")
    q = Graph.load(tmp_path / "q")
    assert q.get("layers.0.ffn.experts.3.down.weight").scheme == "int8_channel"
    assert q.get("layers.0.ffn.experts.3.up.weight").scheme == "int4_sym_g32"


# ---- recipe validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, message", [
    ({"schemes": {"expert": "int4_sym_g32"}}, r"unknown tensor class \['expert'\]"),
    ({"schemes": {"experts": "int3_sym_g32"}}, r"field experts: unknown scheme 'int3_sym_g32'"),
    ({"schemes": {"experts": "int4_sym_g48"}}, r"field experts: 'int4_sym_g48' has an impossible group size 48"),
    ({"schemes": {"norms": "int4_sym_g32"}}, r"field norms: 'int4_sym_g32' is not allowed here"),
    ({"base": "int5"}, r"field base: unknown built-in 'int5'"),
    ({"precision": "low"}, r"unknown field\(s\) \['precision'\]"),
    ({"overrides": [{"pattern": "layers.0.*"}]}, r"overrides\[0\] must have exactly the keys pattern and scheme"),
    ({"overrides": [{"pattern": "layers.0.*", "scheme": "fp4"}]}, r"overrides\[0\]: .*unknown scheme 'fp4'"),
])
def test_recipe_errors_name_the_field(doc, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(doc, "bad", "bad.toml")


def test_recipe_file_with_base_and_overrides(tmp_path, ir):
    path = tmp_path / "mine.toml"
    path.write_text('base = "int4"\n[schemes]\nattention = "fp8_block128"\n'
                    '[[overrides]]\npattern = "layers.*.ffn.experts.*"\nscheme = "int8_g32"\n'
                    '[[overrides]]\npattern = "layers.1.ffn.experts.2.*"\nscheme = "int4_asym_g32"\n')
    recipe = get_recipe(path)
    assert recipe.name == "mine" and recipe.experts == "int4_sym_g32" and recipe.attention == "fp8_block128"
    plan = plan_schemes(recipe, Graph.load(ir).config)
    assert plan["layers.0.ffn.experts.1.up.weight"].scheme == "int8_g32"  # first override
    assert plan["layers.1.ffn.experts.2.up.weight"].scheme == "int4_asym_g32"  # the last matching override wins
    assert plan["mtp.layers.0.ffn.experts.2.up.weight"].scheme == "int4_sym_g32"  # MTP experts: class experts
    assert plan["layers.3.mixer.gate.weight"].scheme == "fp8_block128"
    with pytest.raises(RecipeError, match="unknown 'nope'"):
        get_recipe("nope")


def test_tensor_classes_cover_every_tensor(ir):
    config = Graph.load(ir).config
    classes = tensor_classes(config)
    assert classes["layers.0.mixer.b.weight"] == "deltanet_ba"
    assert classes["layers.0.mixer.conv.weight"] == "norms"
    assert classes["layers.3.mixer.q.weight"] == "attention"  # same local name as DeltaNet's q: the block decides
    assert classes["layers.0.mixer.q.weight"] == "deltanet"
    assert classes["layers.0.ffn.shared_gate.weight"] == "router"
    assert classes["mtp.fc.weight"] == "mtp"
    assert set(classes) == set(Graph.load(ir).tensors)


# ---- calibration ----------------------------------------------------------------------------------------------


def outlier_layer(seed: int = 0):
    """A [64, 256] weight and 2048 inputs whose 8 outlier channels are 20x louder (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * 0.05
    scale = torch.ones(256)
    scale[torch.randperm(256, generator=g)[:8]] = 20.0
    x = torch.randn(2048, 256, generator=g) * scale
    return w, x


@pytest.mark.parametrize("scheme", ["int4_sym_g32", "int4_asym_g32", "int4_sym_g128"])
@pytest.mark.parametrize("method", list(calibrate.QUANTIZERS))
def test_data_aware_beats_rtn_on_outlier_channels(scheme, method):
    w, x = outlier_layer()
    h = (x.T @ x).double()

    def out_err(qt):  # relative output error on the calibration inputs
        y = x @ w.T
        return float(((y - x @ dequantize(qt).T) ** 2).mean() / (y ** 2).mean())

    rtn, aware = out_err(quantize(w, scheme)), out_err(calibrate.QUANTIZERS[method](w, h, scheme))
    assert aware < 0.5 * rtn, (rtn, aware)  # measured 0.22-0.37x: RTN spends the grid on quiet channels


@pytest.mark.parametrize("scheme,k", [("int4_sym_g32", 256), ("int4_asym_g64", 256), ("q4_k", 512), ("q6_k", 256)])
def test_batched_gptq_is_gptq_of_each_weight(scheme, k):
    """A chunk of experts quantized at once (each on its own Hessian and factor) equals each one quantized alone:
    bit-identical on CPU (the same float operations, batched), whatever its neighbours in the batch."""
    from nextq.quant.gptq import gptq_factor, quantize_gptq, quantize_gptq_batch

    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 40, k, generator=g) * 0.05
    x = torch.randn(3, 400, k, generator=g) * (torch.rand(k, generator=g) * 4)
    h = x.transpose(1, 2) @ x
    h[1, :, 7] = h[1, 7, :] = 0  # a column expert 1 never saw
    batch = quantize_gptq_batch(w, h, scheme)
    for i in range(3):
        alone = quantize_gptq(w[i], h[i], scheme, factor=gptq_factor(h[i]))
        for f in ("data", "scales", "zero_points"):
            if getattr(alone, f) is not None:
                assert torch.equal(getattr(batch[i], f), getattr(alone, f)), (i, f)


def test_gptq_factor_is_the_upper_cholesky_of_the_inverse():
    """U^T U = (H + damping)^-1, U upper triangular (one Cholesky of the reversed H and one triangular inverse)."""
    from nextq.quant.gptq import DAMP, gptq_factor

    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    h = x.T @ x
    u = gptq_factor(h).double()
    damped = h + DAMP * h.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)  # float32 factor


def test_calibrated_int4_is_still_q4_0(stats, ir):
    """GPTQ's output is an ordinary int4_sym_g32 tensor: gguf-py dequantizes its Q4_0 blocks to our values."""
    import gguf

    graph = Graph.load(ir)
    name = "layers.1.ffn.experts.3.up.weight"
    qt, how, tokens = calibrate.quantize_calibrated(graph.get(name), "int4_sym_g32", stats, name, "gptq")
    assert how == "gptq" and tokens > 0
    alone = calibrate.quantize_gptq(graph.get(name), stats.hessian(name)[1], "int4_sym_g32")
    assert torch.equal(qt.data, alone.data) and torch.equal(qt.scales, alone.scales)  # its chunk's batch = alone
    blocks = to_gguf_q4_0_blocks(qt)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(ref.reshape(qt.shape), dequantize(qt).numpy())  # bit-exact, same formula


def test_coverage_and_explicit_fallback(ir, stats, tmp_path):
    graph = Graph.load(ir)
    stats.hessian("layers.0.ffn.experts.0.gate.weight")  # the stream reaches layer 0
    counts = stats.expert_tokens["layers.0.ffn"].tolist()
    min_tokens = sorted(counts)[len(counts) // 2]  # half the experts of layer 0 fall below
    report = quantize_graph(graph, RECIPES["int4"], tmp_path / "q", stats=stats, min_tokens=min_tokens)
    layer0 = next(r for r in report["calibration"]["layers"] if r["ffn"] == "layers.0.ffn")
    expected = [e for e, c in enumerate(counts) if c < min_tokens]
    assert expected and layer0["fallback_rtn"] == expected
    assert layer0["calibrated"] == len(counts) - len(expected)
    q = Graph.load(tmp_path / "q")
    for e in range(len(counts)):
        name = f"layers.0.ffn.experts.{e}.gate.weight"
        rtn = quantize(graph.get(name), "int4_sym_g32")
        same = torch.equal(q.get(name).data, rtn.data) and torch.equal(q.get(name).scales, rtn.scales)
        assert report["tensors"][name]["method"] == ("rtn" if e in expected else "gptq")
        assert same == (e in expected), e  # fallback experts are exactly RTN; calibrated ones differ
    assert "| layers.0.ffn |" in (tmp_path / "q" / REPORT_MD).read_text()
    # an expert no calibration token reached: RTN, no division by zero
    class NoTokens:  # the statistics' interface, with no token for any expert of layer 0
        tokens, expert_tokens = 0, {"layers.0.ffn": torch.zeros(6, dtype=torch.int64)}

        def hessian(self, name):
            return 0, torch.zeros(64, 64)

    name = "layers.0.ffn.experts.0.down.weight"
    qt, how, tokens = calibrate.quantize_calibrated(graph.get(name), "int4_sym_g32", NoTokens(), name, "gptq")
    assert (how, tokens) == ("rtn", 0) and torch.isfinite(qt.dequantize()).all()
    cov = calibrate.coverage_report(NoTokens(), {name}, 16, "gptq")
    assert cov["coverage"] == 0.0 and cov["layers"][0]["fallback_rtn"] == [0]


def test_routing_statistics_match_the_runtime(stats, ir):
    """Every token reaches top-k experts: per-layer counts sum to tokens x top-k; the shared expert sees all; and
    the layer-streamed Gram matrices equal X^T X of the inputs the whole-model runtime feeds each weight."""
    from nextq.runtime.model import Observer

    graph = Graph.load(ir)
    config = graph.config
    blocks = [f"layers.{i}.ffn" for i in range(config.num_hidden_layers)] + ["mtp.layers.0.ffn"]
    for p in blocks:
        n = 4 * 64 if not p.startswith("mtp") else 4 * 63  # the MTP head runs on T - 1 positions
        tokens, h = stats.hessian(f"{p}.shared.gate.weight")
        assert tokens == n and stats.hessian(f"{p}.shared.up.weight")[1] is h, p  # one input, one accumulator
        assert int(stats.expert_tokens[p].sum()) == n * config.num_experts_per_tok, p
    assert stats.hessian("layers.3.mixer.o.weight")[0] == 4 * 64  # attention output projection
    assert stats.hessian("embed.weight") is None

    class Inputs(Observer):
        def __init__(self, names):
            self.names, self.x = names, {n: [] for n in names}

        def on_linear(self, name, x):
            if name in self.names:
                self.x[name].append(x)

    names = ["layers.2.ffn.experts.3.down.weight", "layers.1.mixer.q.weight", "lm_head.weight", "mtp.fc.weight"]
    obs = Inputs(names)
    windows = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(2))  # the fixture's windows
    m = TorchModel(graph, observer=obs)
    for w in windows.split(4):
        h = m.hidden(w, m.new_state())
        m.head(h)
        m.mtp_logits(h[:, :-1], w[:, 1:])
    for name in names:
        x = torch.cat(obs.x[name])
        if name == "lm_head.weight":
            x = x[: 4 * 64]  # then the MTP head's output went through the head too
        tokens, h = stats.hessian(name)
        assert tokens == x.shape[0], name
        torch.testing.assert_close(h, x.T @ x, rtol=1e-4, atol=1e-3)  # fp32 sums in another order


def test_the_stream_waits_for_the_layer_in_use(ir):
    """A worker asking for the next layer's statistics waits until no other thread computes with this layer's
    (`using`): the two layers' working sets are never held at once."""
    import threading

    stats = calibrate.collect_stats(Graph.load(ir), torch.randint(0, 2048, (2, 32), generator=torch.Generator()
                                                                  .manual_seed(4)))
    this, after = "layers.0.ffn.experts.0.gate.weight", "layers.1.ffn.experts.0.gate.weight"
    done = threading.Event()
    with stats.using(this):
        assert stats.pos == 0
        worker = threading.Thread(target=lambda: (stats.hessian(after), done.set()))
        worker.start()
        assert not done.wait(0.5) and stats.pos == 0  # blocked: layer 0 is in use (a wait, not a timed claim)
        with stats.using(this):  # the same layer again, from the thread in use: no wait
            assert stats.hessian(this)[0] > 0
    worker.join(30)
    assert done.is_set() and stats.pos == 1 and not stats.users


def test_calibration_modes_and_bad_input(ir, tmp_path):
    """Sequential (layer i+1 on the quantized layer i's outputs) and original statistics: the same for the first
    layer, different after it; short text and windows no token reaches a layer with are one clear error."""
    from nextq.errors import CalibrationError

    graph = Graph.load(ir)
    windows = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in calibrate.MODES:
        stats = calibrate.collect_stats(graph, windows, mode=mode)
        quantize_graph(graph, RECIPES["int4"], tmp_path / mode, stats=stats)
        out[mode] = Graph.load(tmp_path / mode)
    first, later = "layers.0.ffn.experts.1.up.weight", "layers.3.ffn.experts.1.up.weight"
    assert torch.equal(out["sequential"].get(first).data, out["original"].get(first).data)
    assert not torch.equal(out["sequential"].get(later).data, out["original"].get(later).data)
    with pytest.raises(CalibrationError, match="need at least one window of 256"):
        calibrate.token_windows(list(range(100)), 4, 256)
    one = calibrate.collect_stats(graph, windows[:, :1])  # the MTP head sees T - 1 = 0 positions
    with pytest.raises(CalibrationError, match="mtp: 0 calibration tokens"):
        one.hessian("mtp.fc.weight")


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_quantize_recipes_inspect(ir, tmp_path):
    runner = CliRunner()
    calib = tmp_path / "calib.txt"
    calib.write_text((embedded_model() / "heldout.txt").read_text()[:30000])
    args = ["quantize", str(ir), "-o", str(tmp_path / "q"), "--recipe", "mixed", "--calib-text", str(calib),
            "--calib-tokens", "512"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "calibrated" in res.output and (tmp_path / "q" / REPORT_MD).is_file()
    report = json.loads((tmp_path / "q" / REPORT_JSON).read_text())
    assert report["methods"]["gptq"] > 0 and report["classes"]["attention"]["schemes"] == ["fp8_block128"]
    res = runner.invoke(main, args)
    assert res.exit_code != 0 and "output exists" in res.output
    res = runner.invoke(main, ["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "qq"), "--recipe", "int4"])
    assert res.exit_code != 0 and "already quantized" in res.output
    res = runner.invoke(main, ["recipes", "--model", str(ir)])
    assert res.exit_code == 0 and all(name in res.output for name in RECIPES)
    res = runner.invoke(main, ["inspect", str(tmp_path / "q")])
    assert res.exit_code == 0 and "int4_sym_g32" in res.output and "fp8_block128" in res.output


def test_quantize_function_is_not_shadowed_by_a_submodule():
    """`from nextq.quant import quantize` is the scheme function even after every quant submodule is imported
    (a submodule named `quantize` once replaced it on the package)."""
    import importlib
    import pkgutil

    import nextq.quant

    for m in pkgutil.iter_modules(nextq.quant.__path__):
        importlib.import_module(f"nextq.quant.{m.name}")
    from nextq.quant import quantize

    assert callable(quantize) and quantize.__module__ == "nextq.quant.schemes"


def test_recipe_target_matrix(ir):
    """`nextq recipes --targets`: every built-in exports to ONNX (on the 80B's shapes and on rows of 64, where the
    K-quant recipes fall back to Q5_0 / Q5_1 / Q8_0); every empty cell comes with its reason."""
    from nextq.quant.cli import TARGETS, target_cell
    from nextq.quant.recipes import qwen3_next_80b

    from nextq.graph import expected_tensors

    for config in (qwen3_next_80b(), Graph.load(ir).config):
        shapes = {n: s.shape for n, s in expected_tensors(config).items()}
        for name, recipe in RECIPES.items():
            plan, reasons = plan_schemes(recipe, config, shapes), {}
            assert target_cell(plan, "onnx", reasons) == "yes", (name, reasons)
            cells = [target_cell(plan, t, reasons) for t in TARGETS]
            assert all(c == "yes" or reasons for c in cells) and all(len(why) > 10 for why in reasons.values())
    res = CliRunner().invoke(main, ["recipes", "--targets", "--model", str(ir)])
    assert res.exit_code == 0 and "no packed GPU kernel" in res.output


@pytest.mark.parametrize("scheme", [s for s, e in SCHEMES.items() if e.gpu == GPU_DEQUANT])
def test_gpu_packer_dequantizes_experts_without_a_kernel(scheme):
    """runtime/gpu.py's packer for integer experts with no packed kernel: each expert's exact dequantization, cast
    to the compute dtype, as float experts (the layout the float MoE kernels run; built on CPU here, where Triton is
    installed: runtime/gpu.py imports it, and CPU-only installs do not have it)."""
    pytest.importorskip("triton", reason="runtime/gpu.py imports Triton, which CPU-only installs do not have")
    from nextq.runtime.gpu import pack_experts

    experts = [quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(e)), scheme) for e in range(3)]
    packed = pack_experts(experts, "layers.0.ffn.experts.*.down", "cpu", torch.bfloat16)
    assert packed.fmt == "float" and packed.shape == (3, 64, 256)
    assert torch.equal(packed.data, torch.stack([q.dequantize() for q in experts]).to(torch.bfloat16))
