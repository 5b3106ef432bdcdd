"""The artifact formats nextq writes, one registry entry each: its writer and `nextq export` command, its name in a
pipeline's output directory, the backend that runs and validates it, how it is recognised on disk, which files it
is, and the model card's lines for it. The export CLI, `nextq pipeline --formats`, `nextq publish --include` and
the backend inference of `nextq.load` all read this table; adding a format is one entry here.

    TARGETS["gguf"].writer()(graph, "model.gguf")   # the writer function, imported on first use
    infer_backend(Path("out/onnx"))                  # -> "ort"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BackendError, NextqError

PROMPT = "def fibonacci(n):"


# ---- where each kind lies in a directory, and which files it is --------------------------------------------------


def _ir_files(d: Path) -> list[Path]:
    """graph.json, its shards and its carried assets (nothing else that happens to lie in the directory), as
    `Graph.load` resolves them (inside the directory)."""
    from .graph import Graph

    g = Graph.load(d)
    shards = {Path(t.path) for t in g.tensors.values()}
    return sorted({d / "graph.json", *shards, *g.assets.values()})


def _all_files(d: Path) -> list[Path]:
    """Everything but directories and hidden names: a FIFO, socket or dangling link is listed, then refused."""
    return sorted(p for p in d.rglob("*")
                  if not p.is_dir() and not any(s.startswith(".") for s in p.relative_to(d).parts))


def _is_ir(p: Path) -> bool:
    return (p / "graph.json").is_file()


def _is_onnx(p: Path) -> bool:
    return (p / "model.onnx").is_file()


def _is_hf(p: Path) -> bool:
    return (p / "config.json").is_file() and not _is_ir(p) and not _is_onnx(p)


def _find_ir(d: Path) -> list[Path]:
    return [p for p in (d, d / "quantized", d / "ir") if _is_ir(p)][:1]


def _find_onnx(d: Path) -> list[Path]:
    return [p for p in (d, d / "onnx") if _is_onnx(p)][:1]


def _find_gguf(d: Path) -> list[Path]:
    return sorted(d.glob("*.gguf"))


def _find_hf(d: Path) -> list[Path]:
    return [p for p in (d, d / "hf") if _is_hf(p)][:1]


# ---- the model card's "how to run it" --------------------------------------------------------------------------


def _dl(repo: str, path: str) -> str:
    return f'hf download {repo} --include "{path}/*" --local-dir model' if path else \
        f"hf download {repo} --local-dir model"


def _run_gguf(repo: str, path: str) -> str:
    return (f"```sh\n# llama.cpp\nllama-cli --hf-repo {repo} --hf-file {path} -p \"{PROMPT}\"\n"
            f"# nextq (llama-cpp-python)\nhf download {repo} {path} --local-dir model\n"
            f"nextq run model/{path} --prompt \"{PROMPT}\"\n```\n"
            f"```python\nfrom llama_cpp import Llama\n"
            f"llm = Llama.from_pretrained(repo_id=\"{repo}\", filename=\"{path}\")\n"
            f"print(llm(\"{PROMPT}\", max_tokens=32)[\"choices\"][0][\"text\"])\n```")


def _run_onnx(repo: str, path: str) -> str:
    local = f"model/{path}" if path else "model"
    return (f"```sh\n{_dl(repo, path)}\n# ONNX Runtime through nextq (tokenizer, cache and decoding loop included)\n"
            f"nextq run {local} --prompt \"{PROMPT}\"\n```\n"
            f"```python\nimport onnxruntime as ort  # plain ONNX Runtime (inputs: ids, positions, per-layer state)\n"
            f"session = ort.InferenceSession(\"{local}/model.onnx\")\n"
            f"print([i.name for i in session.get_inputs()])\n```")


def _run_ir(repo: str, path: str) -> str:
    local = f"model/{path}" if path else "model"
    return (f"```sh\n{_dl(repo, path)}\nnextq run {local} --prompt \"{PROMPT}\"   # PyTorch, CPU or CUDA\n```\n"
            f"```python\nimport nextq\nmodel = nextq.load(\"{local}\")\n"
            f"ids = model.tokenizer(\"{PROMPT}\", return_tensors=\"np\")[\"input_ids\"]\n"
            f"print(model.tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))\n```")


def _run_hf(repo: str, path: str) -> str:
    where = f"{repo}  # files under {path}/: download them first ({_dl(repo, path)})" if path else repo
    return (f"```sh\n# vLLM (compressed-tensors / FP8 checkpoints load as they are)\nvllm serve {where} "
            f"--tensor-parallel-size 4\n```\n"
            f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer  # pip install compressed-tensors\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\"{', subfolder=' + repr(path) if path else ''})\n```")


# ---- the registry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One artifact format.

    writer:   "module:function" writing a Graph to a path, `fn(graph, out)`; None for the IR (written by convert /
              quantize, not exported)
    command:  "module:attr" of its `nextq export` click command, or None
    artifact: its name in a pipeline's output directory
    backend:  the `nextq.load` backend that runs it (and the candidate backend of its validation reports)
    engine, library, tag: the model card's engine name, library_name (when it is the first kind uploaded), tag
    detect:   whether a path is one; find: where it lies in a publish directory; files: the files it consists of
    run:      (repo id, path in repo) -> the card's Markdown on running it
    also_validated_by: other backend names a validation report of it may carry (the IR: nextq's layer-streamed
              executor, "stream", runs the same IR as the torch backend)
    """

    name: str
    writer: str | None
    command: str | None
    artifact: str
    backend: str
    engine: str
    library: str
    tag: str
    detect: Callable[[Path], bool]
    find: Callable[[Path], list[Path]]
    files: Callable[[Path], list[Path]]
    run: Callable[[str, str], str]
    also_validated_by: tuple[str, ...] = ()

    def validated_by(self, backend: str) -> bool:
        """Whether a report whose candidate ran on `backend` validates an artifact of this format."""
        return backend in (self.backend, *self.also_validated_by)

    def load(self, fmt: str | None = None) -> Callable[..., Any]:
        """The writer function, imported now; a clear error when its module (or what it needs) is missing."""
        module, function = (self.writer or ":").split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise NextqError(f"--formats {fmt or self.name}: its exporter {module} cannot be imported "
                             f"(missing module {e.name!r})") from None
        if not hasattr(mod, function):
            raise NextqError(f"--formats {fmt or self.name}: {module} has no {function}()")
        return getattr(mod, function)


TARGETS: dict[str, Target] = {t.name: t for t in (  # order = detection order, the card's order, library priority
    Target("gguf", "nextq.convert.gguf_export:export_gguf", "nextq.convert.gguf_export:gguf_cmd", "model.gguf",
           "llama.cpp", "llama.cpp", "gguf", "gguf", lambda p: p.suffix == ".gguf", _find_gguf, lambda p: [p],
           _run_gguf),
    Target("onnx", "nextq.convert.onnx_export:export_onnx", "nextq.convert.onnx_export:onnx_cmd", "onnx", "ort",
           "ONNX Runtime", "onnx", "onnx", _is_onnx, _find_onnx, _all_files, _run_onnx),
    Target("ir", None, None, "quantized", "torch", "nextq (PyTorch)", "nextq", "safetensors", _is_ir, _find_ir,
           _ir_files, _run_ir, also_validated_by=("stream",)),
    Target("hf", "nextq.convert.hf_export:export_hf", "nextq.convert.hf_export:hf_cmd", "hf", "transformers",
           "transformers / vLLM / SGLang", "transformers", "compressed-tensors", _is_hf, _find_hf, _all_files,
           _run_hf),
)}
EXPORT_TARGETS: dict[str, Target] = {n: t for n, t in TARGETS.items() if t.writer}


def export_commands() -> list[Any]:
    """The click commands of every export target, imported (for `nextq export`)."""
    out = []
    for t in EXPORT_TARGETS.values():
        module, attr = t.command.split(":")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def infer_backend(path: Path) -> str:
    """The backend a path implies (the first target that recognises it)."""
    path = Path(path)
    for t in TARGETS.values():
        if t.detect(path):
            return t.backend
    raise BackendError(
        f"{path}: cannot tell the model format (expected an IR directory with graph.json, a Hugging Face directory "
        f"with config.json, an ONNX directory with model.onnx, or a .gguf file)"
    )
