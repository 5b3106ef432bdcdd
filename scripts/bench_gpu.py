"""Benchmark nextq's GPU runtime against transformers (+ flash-linear-attention) and llama.cpp's CUDA backend at
Qwen3-Next-80B layer dimensions.

    python scripts/bench_gpu.py --layers 4 [--full] [--llama-cpp SRC --tokenizer DIR] [--json out.json]
    python scripts/bench_gpu.py --pack-llama-cpp llama.cpp.tar.xz     # here: pack the sources to carry to the GPU

Builds the model with `--layers` layers (3 DeltaNet : 1 attention) and random weights generated on the device,
in three variants measured in the same run: transformers' Qwen3NextForCausalLM in bf16 (FLA kernels when
installed), nextq with int4_sym_g32 routed experts, nextq with fp8_block128 routed experts (everything else bf16
in all three). transformers' decode is timed two ways, a loop over forward() with its cache and generate(), and
the faster counts. Measures prefill latency at T = 512, 4096, 32768 (batch 1, last-position logits) and greedy decode
tokens/s at batch 1 and 8 (after a 512-token prompt), plus the decode roofline at batch 1: bytes a token must read
from HBM (all weights it touches, the top-k experts, recurrent state read + write, KV cache) over the measured
device-to-device copy bandwidth. `--full` then builds the 48-layer model with int4 experts alone and reports its
decode tokens/s and memory.

`--llama-cpp SRC` (the llama.cpp tree of the pinned llama-cpp-python sdist, or the pack `--pack-llama-cpp` makes of
it without models/, docs/ and media/): builds `llama-bench` with the CUDA backend for this device's architecture in
the background (cached in SRC's folder, next to it for a pack), writes a GGUF of the same `--layers` model
meanwhile (nextq's GGUF export of random weights: int4_sym_g32 experts = Q4_0, bf16 elsewhere, so the weights
llama.cpp reads are nextq-int4's; the vocabulary from `--tokenizer`), and after nextq's runs times llama-bench
-ngl 99 on it: prefill at the same T (batch 1) and 128 decode tokens after a 512-token prompt (-d 512).
Prints one table: the device, the measured bandwidth, every engine's rows with ratios, and the decode rows (4 and
48 layers) against their rooflines.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import torch

from nextq.graph import ModelConfig, expected_tensors

PREFILL_T = (512, 4096, 32768)
DECODE_B = (1, 8)
PROMPT = 512
DECODE_STEPS = 128


def qwen3_next_80b(layers: int) -> ModelConfig:
    """Qwen3-Next-80B-A3B dimensions with `layers` layers (every 4th full attention)."""
    types = tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers))
    return ModelConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers, layer_types=types,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=256, rope_theta=10_000_000.0,
                       partial_rotary_factor=0.25, max_position_embeddings=262144, linear_num_key_heads=16,
                       linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                       linear_conv_kernel_dim=4, intermediate_size=5120, num_experts=512, num_experts_per_tok=10,
                       moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True,
                       rms_norm_eps=1e-6)


def gib(n: float) -> float:
    return n / 2 ** 30


# ---- measurement helpers ---------------------------------------------------------------------------------------


def time_cuda(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events), after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (4 GiB buffers)."""
    n = 2 ** 31
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps=10, warmup=3)
    del src, dst
    return 2 * n / (ms / 1e3)


def guarded(fn):
    """Run fn(); an out-of-memory error becomes the string 'OOM' (reported, not fatal)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return "OOM"


# ---- nextq -----------------------------------------------------------------------------------------------------


def random_source(config: ModelConfig, experts: str, seed: int = 0):
    """A TensorSource for GpuModel: random bf16 weights (std 1/sqrt(fan_in)) made on the device, experts stacked and
    stored as random int4_sym_g32 codes + fp16 scales, or fp8 e4m3 codes + fp32 128x128 tile scales."""
    from nextq.runtime.triton.moe_fp8 import float_experts
    from nextq.runtime.triton.moe_int4 import int4_experts

    specs = expected_tensors(config)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size

    def stacked(n: int, k: int):
        if experts == "int4":
            codes = torch.randint(0, 256, (e, n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
            scales = torch.full((e, n, k // 32), 2.0 / 8 / math.sqrt(k), device="cuda", dtype=torch.float16)
            return int4_experts(codes, scales)
        codes = torch.randn(e, n, k, generator=gen, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        scales = torch.full((e, -(-n // 128), -(-k // 128)), 1 / math.sqrt(k), device="cuda")
        return float_experts(codes, scales)

    def get(name: str):
        if ".experts." in name:
            part = name.rsplit(".", 1)[1]
            return stacked(h, i) if part == "down" else stacked(i, h)
        spec = specs[name]
        if spec.norm_offset is not None:
            return torch.randn(spec.shape, generator=gen, device="cuda") * 0.05 + (1 - spec.norm_offset)
        if name.endswith("A_log"):
            return torch.rand(spec.shape, generator=gen, device="cuda") * 2
        if name.endswith("dt_bias"):
            return torch.randn(spec.shape, generator=gen, device="cuda") * 0.5
        fan_in = spec.shape[-1]
        return torch.randn(spec.shape, generator=gen, device="cuda", dtype=torch.bfloat16) / math.sqrt(fan_in)

    return get


def decode_bytes(model, context: int) -> int:
    """HBM bytes one batch-1 decode token must move: every non-expert weight, top-k experts per MoE layer,
    recurrent + conv state read and written, the KV cache read (and one row written), one embedding row."""
    c = model.config
    total = model.lm_head.numel() * model.lm_head.element_size() + c.hidden_size * model.embed.element_size()
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    for lw, st in zip(model.layers, model.cache):
        total += sum(nb(t) for t in (lw.input_norm, lw.post_norm, lw.w_in, lw.out, *lw.mixer.values()))
        for name, w in lw.ffn.items():
            if name in ("gate", "up", "down"):
                total += w.nbytes * c.num_experts_per_tok // c.num_experts
            else:
                total += w.nbytes if name == "shared" else nb(w)  # SharedExpert: its two matrices
        if lw.kind == "deltanet":
            total += 2 * (nb(st["rec"][:1]) + nb(st["conv"][:1]))
        else:
            total += 2 * c.num_key_value_heads * c.head_dim * st["k"].element_size() * (context + 1)
    return total


def profile(model, path: str) -> None:
    """Kernel time per name (torch.profiler) for 5 eager decode steps at batch 1 and one 4096-token prefill."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    ids = torch.randint(0, model.config.vocab_size, (1, 4096), device="cuda")
    model.prefill(ids[:, :PROMPT])
    with open(path, "a") as f:
        for what, fn in (("decode x5 (eager)", lambda: [model._step(1, 1024, True) for _ in range(5)]),
                         ("prefill 4096", lambda: model.prefill(ids))):
            fn()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                fn()
                torch.cuda.synchronize()
            f.write(f"== {what}\n{p.key_averages().table(sort_by='cuda_time_total', row_limit=30)}\n")


def repeated(fn, runs: int) -> dict:
    """fn() `runs` times (each a fresh model): numbers are the median over the runs, "spread" lists each run's."""
    out = [fn() for _ in range(runs)]
    if runs == 1:
        return out[0]
    merged = dict(out[0])
    merged["spread"] = {}
    for key, v in out[0].items():
        vals = [r.get(key) for r in out]
        if all(isinstance(x, float) for x in vals):
            merged[key] = statistics.median(vals)
            merged["spread"][key] = vals
    return merged


def bench_nextq(config: ModelConfig, experts: str, prefill_t, decode_b, max_seq: int, profile_path=None) -> dict:
    from nextq.runtime.gpu import GpuModel

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = GpuModel(config, random_source(config, experts), max_batch=max(decode_b), max_seq=max_seq)
    torch.cuda.synchronize()
    res: dict = {"build_s": time.time() - t0, "weights_gib": gib(torch.cuda.memory_allocated())}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for t in prefill_t:
        ids = torch.randint(0, config.vocab_size, (1, t), generator=gen, device="cuda")
        res[f"prefill_{t}_ms"] = guarded(lambda: time_cuda(lambda: model.prefill(ids), reps=3 if t > 4096 else 5))
    for b in decode_b:
        ids = torch.randint(0, config.vocab_size, (b, PROMPT), generator=gen, device="cuda")

        def run():
            first = model.prefill(ids).argmax(-1, keepdim=True)
            model.generate_greedy(8, first=first)  # captures the graphs of this span (warm-up)
            torch.cuda.synchronize()
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            toks = model.generate_greedy(DECODE_STEPS)
            e.record()
            e.synchronize()
            assert toks.shape == (b, DECODE_STEPS)
            return a.elapsed_time(e)

        ms = guarded(run)
        res[f"decode_b{b}_tok_s"] = ms if isinstance(ms, str) else b * DECODE_STEPS / (ms / 1e3)
        if b == 1 and not isinstance(ms, str):
            res["decode_b1_ms_per_token"] = ms / DECODE_STEPS
            res["decode_bytes_per_token"] = decode_bytes(model, PROMPT + DECODE_STEPS // 2)
    res["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    if profile_path:
        profile(model, profile_path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ---- transformers + FLA ------------------------------------------------------------------------------------------


def hf_config(config: ModelConfig):
    from transformers import Qwen3NextConfig

    c = config
    return Qwen3NextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        layer_types=list(c.layer_types), num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                         "partial_rotary_factor": c.partial_rotary_factor},
        linear_num_key_heads=c.linear_num_key_heads, linear_num_value_heads=c.linear_num_value_heads,
        linear_key_head_dim=c.linear_key_head_dim, linear_value_head_dim=c.linear_value_head_dim,
        linear_conv_kernel_dim=c.linear_conv_kernel_dim, intermediate_size=c.intermediate_size,
        num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, shared_expert_intermediate_size=c.shared_expert_intermediate_size,
        norm_topk_prob=c.norm_topk_prob, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
    )


def bench_transformers(config: ModelConfig, prefill_t, decode_b, profile_path=None) -> dict:
    import transformers
    from transformers import Qwen3NextForCausalLM
    from transformers.utils.import_utils import is_flash_linear_attention_available

    res: dict = {"transformers": transformers.__version__, "fla": bool(is_flash_linear_attention_available())}
    try:
        import fla

        res["fla_version"] = getattr(fla, "__version__", "?")
    except ImportError:
        pass
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.time()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3NextForCausalLM(hf_config(config)).eval()
    finally:
        torch.set_default_dtype(old)
    # what from_pretrained would pick (grouped_mm where torch supports it); a bare constructor leaves None (eager loop)
    model.config._experts_implementation = model.get_correct_experts_implementation(None)
    res["experts_implementation"] = model.config._experts_implementation
    torch.cuda.synchronize()
    res["build_s"] = time.time() - t0
    res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    mixer = model.model.layers[0].linear_attn
    res["gdr_kernel"] = getattr(getattr(mixer, "chunk_gated_delta_rule", None), "__module__", "?")
    gen = torch.Generator(device="cuda").manual_seed(1)

    @torch.no_grad()
    def forward(ids, cache=None):
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    for t in prefill_t:
        ids = torch.randint(0, config.vocab_size, (1, t), generator=gen, device="cuda")
        res[f"prefill_{t}_ms"] = guarded(lambda: time_cuda(lambda: forward(ids), reps=3 if t > 4096 else 5))
    steps, warm = 64, 16  # warm-up: the first steps after a prefill run several times slower (seen on an H100)
    for b in decode_b:
        ids = torch.randint(0, config.vocab_size, (b, PROMPT), generator=gen, device="cuda")

        def run():  # our own loop over forward() with the DynamicCache
            out = forward(ids)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(warm):
                out = forward(nxt, cache)
                nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                out = forward(nxt, cache)
                nxt = out.logits[:, -1:].argmax(-1)
            e.record()
            e.synchronize()
            return a.elapsed_time(e)

        def generate(n: int) -> float:  # what users call: wall ms of generate() with n new tokens
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3

        def generate_steps() -> float:  # ms of `steps` decode steps: 1 + steps new tokens minus 1 (the prefill)
            generate(1 + warm)  # warm-up
            return generate(1 + steps) - generate(1)

        ms = guarded(run)
        res[f"decode_b{b}_loop_tok_s"] = ms if isinstance(ms, str) else b * steps / (ms / 1e3)
        gms = guarded(generate_steps)
        res[f"decode_b{b}_generate_tok_s"] = gms if isinstance(gms, str) else b * steps / (gms / 1e3)
        rates = [r for r in (res[f"decode_b{b}_loop_tok_s"], res[f"decode_b{b}_generate_tok_s"])
                 if not isinstance(r, str)]
        res[f"decode_b{b}_tok_s"] = max(rates) if rates else "OOM"  # the anchor: the faster of the two
    res["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    if profile_path:  # where a decode step's time goes (host and device)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        out = forward(ids[:1])
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        forward(nxt, cache)
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                nxt = forward(nxt, cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        with open(profile_path, "w") as f:
            for key in ("self_cpu_time_total", "cuda_time_total"):
                f.write(f"== decode x3 by {key}\n{p.key_averages().table(sort_by=key, row_limit=25)}\n")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ---- llama.cpp (CUDA backend) ------------------------------------------------------------------------------------

LLAMA_BENCH = "llama-bench"
LLAMA_PACK_EXCLUDE = ("models", "docs", "media")  # not needed to build; the rest packs to about 9 MB (xz)


def llama_cmake_options(arch: str) -> list[str]:
    """CMake options for a llama-bench with the CUDA backend for compute capability `arch` (e.g. "90")."""
    return ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
            "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"]


def pack_llama_cpp(out: Path) -> Path:
    """Pack the llama.cpp tree of the pinned sdist (scripts/llama_cpp_tools.py's cache, fetched on first use) without
    LLAMA_PACK_EXCLUDE as `out` (.tar.xz), to carry to a GPU machine that cannot download it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llama_cpp_converter
    import llama_cpp_tools

    root = llama_cpp_converter.source_root(llama_cpp_tools.cache_dir() / "src")
    skip = {f"{root.name}/{d}" for d in LLAMA_PACK_EXCLUDE}
    with tarfile.open(out, "w:xz") as tf:
        tf.add(root, arcname=root.name, filter=lambda ti: None if ti.name in skip else ti)
    return out


class LlamaCpp:
    """llama-bench built with the CUDA backend from a source tree or pack, and the synthetic GGUF it runs, both made
    once per folder (`work`, beside the sources): a later run on the same machine reuses them.

    `prepare()` builds (at low priority) and meanwhile writes the GGUF in a subprocess, under a file lock, so a
    preparing process started earlier (`--prepare-llama-cpp`, say in the background while tests run) is waited
    for, not repeated. `start()` runs it in a thread; `wait()` returns (binary, gguf) or raises RuntimeError."""

    def __init__(self, src: Path, layers: int, tokenizer: Path, jobs: int, arch: str):
        self.src, self.layers, self.tokenizer, self.jobs, self.arch = Path(src), layers, Path(tokenizer), jobs, arch
        self.work = (self.src if self.src.is_dir() else self.src.parent) / f"llama-cuda-sm{arch}"
        self.binary = self.work / "build" / "bin" / LLAMA_BENCH
        self.gguf = self.work / f"synthetic-{layers}-layers.gguf"
        self.log = self.work / "build.log"
        self.error: str | None = None
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._prepare, daemon=True)

    def _run(self, cmd: list[str]) -> None:
        with self.log.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19))
        if r.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {self.log.read_text(errors='replace')[-2000:]}")

    def _build(self) -> None:
        root = self.src
        if not root.is_dir():  # a pack: one top folder
            shutil.rmtree(self.work / "src", ignore_errors=True)
            (self.work / "src").mkdir()
            self._run(["tar", "-xf", str(self.src), "-C", str(self.work / "src")])
            root = next((self.work / "src").iterdir())
        build = self.work / "build"
        self._run(["cmake", "-S", str(root), "-B", str(build), *llama_cmake_options(self.arch)])
        self._run(["cmake", "--build", str(build), "-j", str(self.jobs), "--target", LLAMA_BENCH])

    def prepare(self) -> tuple[Path, Path]:
        import fcntl

        t0 = time.time()
        self.work.mkdir(parents=True, exist_ok=True)
        with (self.work / "prepare.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            job = None
            if not self.gguf.is_file():  # written beside the build: the GIL and the timed process stay free
                cmd = [sys.executable, __file__, "--layers", str(self.layers), "--write-gguf", str(self.gguf),
                       "--tokenizer", str(self.tokenizer)]
                job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       preexec_fn=lambda: os.nice(10))
            if not self.binary.is_file():
                self._build()
            if job is not None:
                out, _ = job.communicate()
                if job.returncode:
                    raise RuntimeError(f"synthetic GGUF failed: {out[-1500:]}")
        self.seconds = time.time() - t0
        return self.binary, self.gguf

    def _prepare(self) -> None:
        try:
            self.prepare()
        except Exception as e:  # noqa: BLE001  (reported by wait(), in the main thread)
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> LlamaCpp:
        self._thread.start()
        return self

    def wait(self) -> tuple[Path, Path]:
        self._thread.join()
        if self.error:
            raise RuntimeError(f"llama.cpp: {self.error}")
        return self.binary, self.gguf


class RandomWeight:
    """A graph tensor made when read (the GGUF writer reads each once): random bf16 / fp32, or random int4_sym_g32
    codes with fp16 scales; deterministic per name."""

    def __init__(self, name: str, shape: tuple[int, ...], kind: str):
        self.name, self.shape, self.kind = name, tuple(shape), kind
        self.dtype = torch.float32 if kind == "f32" else torch.bfloat16
        self.scheme = "int4_sym_g32" if kind == "int4" else None

    def load(self):
        from nextq.quant import QuantizedTensor

        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        if self.kind == "int4":
            n, k = self.shape
            codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
            scales = torch.full((n, k // 32), 2.0 / 8 / math.sqrt(k), dtype=torch.float16)
            return QuantizedTensor("int4_sym_g32", (n, k), codes, scales, block_size=32, nibble_order="low_even")
        if self.kind == "f32":
            return torch.randn(self.shape, generator=g) * 0.05
        return (torch.randn(self.shape, generator=g) / math.sqrt(self.shape[-1])).to(torch.bfloat16)


def write_synthetic_gguf(config: ModelConfig, out: Path, tokenizer: Path) -> Path:
    """The GGUF (nextq's exporter) of `config` with random weights as bench_nextq's int4 variant holds them:
    int4_sym_g32 routed experts (written as Q4_0 unchanged), bf16 matrices, fp32 vectors; the vocabulary of
    tokenizer/tokenizer.json."""
    from nextq.convert.gguf_export import export_gguf
    from nextq.graph import Graph

    def kind(name: str, shape) -> str:
        return "int4" if ".experts." in name else "f32" if len(shape) == 1 else "bf16"

    tensors = {n: RandomWeight(n, s.shape, kind(n, s.shape)) for n, s in expected_tensors(config).items()}
    graph = Graph(config, tensors, {"source": f"synthetic-{config.num_hidden_layers}-layers"},
                  {"tokenizer.json": Path(tokenizer) / "tokenizer.json"})
    export_gguf(graph, out, force=True)
    return out


def llama_bench(binary: Path, gguf: Path, *args: str) -> list[dict]:
    """llama-bench's JSON records for one invocation (-ngl 99: every layer on the GPU)."""
    cmd = [str(binary), "-m", str(gguf), "-ngl", "99", "-o", "json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-1500:]}")
    return json.loads(r.stdout)


def bench_llama_cpp(llama: LlamaCpp, prefill_t) -> dict:
    """llama.cpp's CUDA rows: prefill ms at each T (avg of 3 after its warm-up) and decode tokens/s of 128 tokens
    after a 512-token prompt."""
    res: dict = {}
    try:
        binary, gguf = llama.wait()
        res["prepare_s"] = llama.seconds  # build + GGUF (waited for here: what nextq's runs did not cover)
        res["gguf_gib"] = gib(gguf.stat().st_size)
        if prefill_t:
            for rec in llama_bench(binary, gguf, "-p", ",".join(map(str, prefill_t)), "-n", "0", "-r", "3"):
                res[f"prefill_{rec['n_prompt']}_ms"] = rec["avg_ns"] / 1e6
        rec = llama_bench(binary, gguf, "-p", "0", "-n", str(DECODE_STEPS), "-d", str(PROMPT), "-r", "3")[0]
        res["decode_b1_tok_s"] = rec["avg_ts"]
        res["decode_b1_stddev_tok_s"] = rec["stddev_ts"]
        res["build_info"] = " ".join(str(rec.get(f, "?")) for f in ("build_commit", "build_number", "gpu_info"))
    except (RuntimeError, OSError, json.JSONDecodeError, KeyError, IndexError) as e:
        res["error"] = f"{type(e).__name__}: {str(e)[:800]}"
    return res


# ---- report -------------------------------------------------------------------------------------------------------


def fmt(v, unit: str = "") -> str:
    if isinstance(v, str) or v is None:
        return v or "-"
    return f"{v:,.1f}{unit}"


def ratio(ours, theirs, lower_is_better: bool) -> str:
    if not isinstance(ours, float) or not isinstance(theirs, float):
        return "-"
    return f"{(theirs / ours if lower_is_better else ours / theirs):.2f}x"


ENGINES = {"transformers+fla": ("transformers+FLA bf16", "vs HF"),  # results key -> (column, ratio column)
           "llama.cpp": ("llama.cpp CUDA (Q4_0 experts)", "vs llama.cpp")}
NEXTQ = ("nextq-int4", "nextq-fp8")
FULL = "nextq-int4-48-layers"  # shown in nextq-int4's column


def roofline_cell(r: dict, bandwidth: float) -> str:
    """'47% of 4,176': achieved batch-1 decode over bandwidth / bytes per token (also stored in r)."""
    if "decode_bytes_per_token" not in r or isinstance(r.get("decode_b1_tok_s"), str):
        return "-"
    r["roofline_tok_s"] = bandwidth / r["decode_bytes_per_token"]
    r["roofline_fraction"] = r["decode_b1_tok_s"] / r["roofline_tok_s"]
    return f"{100 * r['roofline_fraction']:.0f}% of {r['roofline_tok_s']:,.0f}"


def table(results: dict, bandwidth: float, prefill_t, decode_b) -> str:
    """The device line, then one row per metric: each anchor, each nextq variant (median, with the range over
    --runs in parentheses) with its ratio to every anchor (> 1: nextq faster) and, on batch-1 decode rows, its
    fraction of the HBM roofline."""
    anchors = [k for k in ENGINES if k in results]
    variants = [k for k in NEXTQ if k in results]
    layers = results["layers"]
    head = ["metric", *(ENGINES[a][0] for a in anchors)]
    for v in variants:
        head += [v, *(ENGINES[a][1] for a in anchors), "of roofline"]
    specs = [(f"prefill T={t} (ms)", f"prefill_{t}_ms", True, False) for t in prefill_t]
    specs += [(f"decode B={b}, {layers} layers (tok/s)", f"decode_b{b}_tok_s", False, False) for b in decode_b]
    if FULL in results:
        specs.append(("decode B=1, 48 layers (tok/s)", "decode_b1_tok_s", False, True))
    rows = []
    for label, key, lower, full in specs:
        row = [label, *(fmt(None if full else results[a].get(key)) for a in anchors)]
        for v in variants:
            r = results[FULL] if full and v == "nextq-int4" else ({} if full else results[v])
            ours = r.get(key)
            spread = r.get("spread", {}).get(key)
            cell = fmt(ours) + (f" ({min(spread):,.0f}-{max(spread):,.0f})" if spread else "")
            row += [cell, *(ratio(ours, None if full else results[a].get(key), lower) for a in anchors),
                    roofline_cell(r, bandwidth) if key == "decode_b1_tok_s" else ""]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    title = (f"{results['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write, measured); "
             f"{results['date']}; torch {results['torch']}")
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", type=int, nargs="*", default=list(PREFILL_T))
    ap.add_argument("--decode-batch", type=int, nargs="*", default=list(DECODE_B))
    ap.add_argument("--variants", nargs="*", default=["transformers+fla", "nextq-int4", "nextq-fp8"])
    ap.add_argument("--full", action="store_true", help="also the 48-layer model with int4 experts (decode only)")
    ap.add_argument("--runs", type=int, default=1,
                    help="measure each nextq model this many times (fresh builds): medians, with the spread")
    ap.add_argument("--llama-cpp", type=Path, metavar="SRC",
                    help="llama.cpp sources (tree or --pack-llama-cpp pack): build llama-bench (CUDA) and add its rows")
    ap.add_argument("--llama-cpp-jobs", type=int, default=max(1, (os.cpu_count() or 4) - 2))
    ap.add_argument("--tokenizer", type=Path, help="folder with the tokenizer.json of the GGUF llama.cpp runs")
    ap.add_argument("--write-gguf", type=Path, help="only write the synthetic --layers GGUF here (needs --tokenizer)")
    ap.add_argument("--pack-llama-cpp", type=Path, metavar="OUT", help="only pack the pinned llama.cpp sources")
    ap.add_argument("--prepare-llama-cpp", action="store_true",
                    help="only build llama-bench and write the GGUF of --llama-cpp (e.g. in the background first)")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--profile", help="append per-kernel times of nextq's decode and prefill here")
    args = ap.parse_args(argv)
    if args.pack_llama_cpp:
        print(pack_llama_cpp(args.pack_llama_cpp))
        return {}
    if (args.write_gguf or args.llama_cpp) and not (args.tokenizer and (args.tokenizer / "tokenizer.json").is_file()):
        raise SystemExit("error: --llama-cpp / --write-gguf need --tokenizer DIR holding tokenizer.json")
    if args.prepare_llama_cpp and not args.llama_cpp:
        raise SystemExit("error: --prepare-llama-cpp needs --llama-cpp SRC")
    if args.write_gguf:
        print(write_synthetic_gguf(qwen3_next_80b(args.layers), args.write_gguf, args.tokenizer))
        return {}
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_gpu needs a CUDA device")
    dev = torch.cuda.get_device_properties(0)
    config = qwen3_next_80b(args.layers)
    llama = None
    if args.llama_cpp:  # started first: the build and the GGUF run while nextq is measured
        llama = LlamaCpp(args.llama_cpp, args.layers, args.tokenizer, args.llama_cpp_jobs, f"{dev.major}{dev.minor}")
        if args.prepare_llama_cpp:
            print(*llama.prepare(), f"({llama.seconds:.0f} s)")
            return {}
        llama.start()
    max_seq = max([*args.prefill, PROMPT + 16 + DECODE_STEPS]) + 64
    bandwidth = copy_bandwidth()
    results: dict = {"device": dev.name, "memory_gib": gib(dev.total_memory), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": args.layers,
                     "copy_bandwidth_tb_s": bandwidth / 1e12}
    print(f"device {dev.name}, {gib(dev.total_memory):.0f} GiB; copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"(read + write); {args.layers} layers", flush=True)
    for v in args.variants:
        t0 = time.time()
        if v == "transformers+fla":
            results[v] = bench_transformers(config, args.prefill, args.decode_batch,
                                            f"{args.profile}.hf" if args.profile else None)
        else:
            results[v] = repeated(lambda: bench_nextq(config, v.split("-")[1], args.prefill, args.decode_batch,
                                                      max_seq, f"{args.profile}.{v}" if args.profile else None),
                                  args.runs)
        print(f"{v}: {json.dumps(results[v], default=str)} ({time.time() - t0:.0f} s)", flush=True)
    if args.full:
        t0 = time.time()
        results[FULL] = r = repeated(lambda: bench_nextq(qwen3_next_80b(48), "int4", [], [1],
                                                         PROMPT + 16 + DECODE_STEPS + 64), args.runs)
        print(f"48 layers int4: {json.dumps(r, default=str)} ({time.time() - t0:.0f} s)", flush=True)
    if llama is not None:
        t0 = time.time()
        results["llama.cpp"] = bench_llama_cpp(llama, args.prefill)
        print(f"llama.cpp: {json.dumps(results['llama.cpp'], default=str)} ({time.time() - t0:.0f} s)", flush=True)
    print()
    print(table(results, bandwidth, args.prefill, args.decode_batch))
    if args.full:
        r = results[FULL]
        print(f"48 layers, int4 experts: weights {r['weights_gib']:.1f} GiB, peak {r['peak_gib']:.1f} GiB, "
              f"{r['decode_bytes_per_token'] / 1e9:.2f} GB/token")
    if "error" in results.get("llama.cpp", {}):
        print(f"llama.cpp: {results['llama.cpp']['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
