"""Layer-streamed execution: a batch of windows `[N, T]` through the model one layer at a time.

    stream = LayerStream(Graph.load(ir) or nextq.read(hf_source), device="cuda")
    hidden = stream.hidden(ids)                      # [N, T] int64 -> final-normed [N, T, H]
    logits = stream.logits(hidden, slice(0, 4))      # lm_head on windows 0..3: [4, T, V]

Only the running layer's tensors are held: read from the lazy Graph (an IR, or a Hugging Face source through its
reader), moved to `device` (host -> GPU per layer with device="cuda"), freed after the layer ran. Between layers
the stream holds the windows' hidden states. Peak memory is one layer's tensors (as stored: quantized ones stay
packed and are dequantized per routed expert when used) plus activations, flat in the number of layers. The math
is runtime/model.py's `LayerMath`, the functions TorchModel runs, so streamed logits equal TorchModel.forward; an
`Observer` sees it run (calibration statistics, per-layer drift).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nextq.console import trim_heap
from nextq.graph import Block, Graph, Layer

from .model import LayerMath, LayerState, Observer, Weights


@dataclass
class LayerStep:
    """One decoder layer of a stream: its input hidden states x [N, T, H]; `out` [N, T, H] once it ran."""

    layer: Layer
    x: torch.Tensor
    out: torch.Tensor | None = None


class LayerStream:
    """Runs windows through a lazy Graph one layer at a time (see the module docstring).

    `batch` windows go through a layer together (each window from an empty state: whole-sequence evaluation).
    """

    def __init__(self, graph: Graph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 observer: Observer | None = None, batch: int = 4):
        self.graph, self.config, self.batch = graph, graph.config, batch
        self.math = LayerMath(graph.config, Weights(graph.config, device, dtype), observer)
        self.head_math: LayerMath | None = None  # the LM head, loaded by the first `logits` call and kept
        blocks = graph.blocks
        self.layers: list[Layer] = [b for b in blocks if isinstance(b, Layer)]
        self.mtp = next((b for b in blocks if b.kind == "MTP"), None)

    @property
    def device(self) -> torch.device:
        return self.math.device

    @property
    def observer(self) -> Observer:
        return self.math.observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self.math.observer = observer or Observer()

    def names(self, block: Block) -> list[str]:
        """The IR tensor names of a block (a decoder layer: its norms, mixer and feed-forward)."""
        return list(block.tensor_specs(self.config))

    @contextmanager
    def holding(self, names: Iterable[str], values: Mapping[str, Any] | None = None) -> Iterator[LayerMath]:
        """The tensors `names` loaded on the device while inside; `values` overrides the graph's for some names
        (e.g. a layer's quantized tensors). Everything held is freed on exit."""
        try:
            for n in names:
                self.math.w.put(n, values[n] if values is not None and n in values else self.graph.get(n))
            yield self.math
        finally:
            self.math.w.clear()
            trim_heap()

    def windows(self, n: int) -> list[slice]:
        return [slice(s, min(s + self.batch, n)) for s in range(0, n, self.batch)]

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, T, H] of ids [N, T]."""
        with self.holding(["embed.weight"]) as m:
            return m.embed(ids)

    @torch.no_grad()
    def run_layer(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, H] through `layer`, whose tensors must be held (`holding`), `batch` windows at a time."""
        positions = torch.arange(x.shape[1], device=self.device)
        out = torch.empty_like(x)
        for s in self.windows(x.shape[0]):
            out[s] = self.math.layer(x[s], layer, LayerState(), positions)
        return out

    def per_layer(self, ids: torch.Tensor, progress: Callable | None = None) -> Iterator[LayerStep]:
        """Each decoder layer in turn, held while the consumer has its step; when the consumer moves on, the stream
        runs the held layer on `step.x` (a consumer may replace held tensors first, `self.math.w.put`) and feeds
        `step.out` to the next layer."""
        x = self.embed(ids)
        for layer in progress(self.layers) if progress else self.layers:
            with self.holding(self.names(layer)):
                step = LayerStep(layer, x)
                yield step
                step.out = x = self.run_layer(layer, step.x)

    @torch.no_grad()
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of the last layer's output [N, T, H]."""
        with self.holding(["norm.weight"]) as m:
            return m.norm(x, "norm.weight")

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, progress: Callable | None = None) -> torch.Tensor:
        """Final-normed hidden states [N, T, H] of windows ids [N, T] (int64), computed layer by layer."""
        step = None
        for step in self.per_layer(ids, progress):
            pass
        return self.final_norm(step.out if step is not None else self.embed(ids))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        """The LM head on windows `rows` of final-normed hidden states [N, T, H] -> [n, T, V] (compute dtype).

        The head's weight is loaded by the first call and kept for the next ones (`release_head` frees it)."""
        if self.head_math is None:
            w = Weights(self.config, self.device, self.math.dtype)
            w.put(self.math.head_name, self.graph.get(self.math.head_name))
            self.head_math = LayerMath(self.config, w, self.math.observer)
        return self.head_math.head(hidden[rows].to(self.device))

    def release_head(self) -> None:
        self.head_math = None

    @torch.no_grad()
    def mtp_hidden(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The MTP head's normed output [N, T-1, H] (before the LM head) from the main model's final-normed
        hidden states [N, T, H] and the windows' ids [N, T]: pairs (h_t, x_{t+1}), whole sequences."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head")
        with self.holding(["embed.weight", *self.names(self.mtp)]) as m:
            x = torch.cat([m.mtp_input(hidden[s, :-1], ids[s, 1:]) for s in self.windows(ids.shape[0])])
            for layer in self.mtp.layers:
                x = self.run_layer(layer, x)
            return m.norm(x, "mtp.norm.weight")
