"""The `ort` backend: an ONNX export directory (model.onnx [+ mtp.onnx]) run by ONNX Runtime.

The decoder graph takes `input_ids`, `position_ids` and the state `past.*`, and returns `logits`, `hidden` and
`present.*` (see convert/onnx_export.py and docs/onnx.md). This backend keeps the present state between
`prefill` and `decode`; generation comes from the base class, speculative decoding over `mtp.onnx` from
`OrtDrafter` (runtime/speculative.py).

Precision: MatMulNBits / QMoE nodes carry accuracy_level=0, and the session option
`session.qdq_matmulnbits_accuracy_level=0` stops ORT from fusing DequantizeLinear + MatMul into an int8-activation
MatMulNBits; activations are never quantized silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nextq.errors import BackendError

from .backends import Model, register_backend
from .speculative import Drafter

# Session options that keep activations in float (ORT would otherwise pick accuracy_level 4 = int8 activations
# for the MatMulNBits it fuses out of DequantizeLinear + MatMul).
PRECISION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
DEVICE_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def make_session(path: Path, device: str):
    """An InferenceSession on `path`; CUDA when asked for (or "auto") and available, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device not in DEVICE_PROVIDERS:
        raise BackendError(f"device {device!r} is not supported by the ort backend; supported: "
                           f"{sorted(DEVICE_PROVIDERS)} or 'auto'")
    providers = [p for p in DEVICE_PROVIDERS[device] if p in available]
    if device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise BackendError(f"device 'cuda': onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"(available: {available}); install onnxruntime-gpu with CUDA or use device='cpu'")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in PRECISION_CONFIG.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=providers)


class StatefulGraph:
    """One ONNX graph with `past.*` inputs mirrored by `present.*` outputs; runs a chunk and advances the state."""

    def __init__(self, session):
        self.session = session
        self.state_inputs = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past.")}
        self.outputs = [o.name for o in session.get_outputs()]
        self.state: dict[str, np.ndarray] | None = None
        self.position = 0

    def reset(self, batch: int) -> None:
        """Zero state for `batch` rows: empty KV caches, zero conv and recurrent states."""
        def dim(d):
            return batch if d == "batch" else 0 if isinstance(d, str) else int(d)

        self.state = {n: np.zeros([dim(d) for d in shape], np.float32) for n, shape in self.state_inputs.items()}
        self.position = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feed ids [B, T] (+ extra inputs) after what was seen; returns every output, keeps the present state."""
        ids = np.ascontiguousarray(feeds["input_ids"], dtype=np.int64)
        b, t = ids.shape
        if self.state is None:
            self.reset(b)
        pos = np.broadcast_to(np.arange(self.position, self.position + t, dtype=np.int64), (b, t))
        outs = dict(zip(self.outputs, self.session.run(
            self.outputs, {**feeds, "input_ids": ids, "position_ids": np.ascontiguousarray(pos), **self.state})))
        self.state = {n: outs["present." + n.removeprefix("past.")] for n in self.state_inputs}
        self.position += t
        return outs

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every KV cache (`past.*.key/value` [B, Hkv, P, D]); graphs with
        recurrent state cannot be cut back (BackendError)."""
        if any(not n.endswith((".key", ".value")) for n in self.state):
            raise BackendError("only KV caches can be truncated; recurrent state needs a snapshot")
        self.state = {n: a[:, :, :length] for n, a in self.state.items()}
        self.position = length


@register_backend("ort")
class OrtBackend(Model):
    """An ONNX export directory run by ONNX Runtime. device: "cpu", "cuda" or "auto" (CUDA when available)."""

    def __init__(self, path: Path, device: str = "auto"):
        super().__init__(path, device)
        model = path / "model.onnx"
        if not model.is_file():
            raise BackendError(f"{path}: no model.onnx (expected an ONNX export directory from `nextq export onnx`)")
        self.session = make_session(model, device)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.decoder = StatefulGraph(self.session)
        self.mtp_path = path / "mtp.onnx"
        self._mtp = None

    def _run(self, ids: np.ndarray, fresh: bool) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise BackendError(f"ids: expected [B, T] int64, got shape {ids.shape}")
        if fresh:
            self.decoder.reset(ids.shape[0])
        elif self.decoder.state is None:
            raise BackendError("decode before prefill")
        return self.decoder.run({"input_ids": ids})

    def logits(self, ids):
        return self._run(ids, fresh=True)["logits"]

    def prefill(self, ids):
        return self._run(ids, fresh=True)["logits"][:, -1]

    def decode(self, ids):
        return self._run(ids, fresh=False)["logits"][:, -1]

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        """Final-normed hidden states [B, T, H] of a whole sequence (the MTP head's input)."""
        return self._run(ids, fresh=True)["hidden"]

    def mtp_logits(self, hidden: np.ndarray, next_ids: np.ndarray) -> np.ndarray:
        """The MTP draft graph's logits [B, T, V] for token t+2 from hidden h_t [B, T, H] and token t+1 ids [B, T]
        (whole sequence, fresh MTP KV state)."""
        if not self.mtp_path.is_file():
            raise BackendError(f"{self.path}: no mtp.onnx (the IR had no MTP head)")
        if self._mtp is None:
            self._mtp = StatefulGraph(make_session(self.mtp_path, self.device))
        ids = np.asarray(next_ids, dtype=np.int64)
        self._mtp.reset(ids.shape[0])
        return self._mtp.run({"input_ids": ids, "hidden": np.asarray(hidden, np.float32)})["logits"]

    def drafter(self, method):
        if not self.mtp_path.is_file():
            raise BackendError(f"{self.path}: no mtp.onnx (the model has no MTP head); --speculative {method} "
                               f"needs one")
        return OrtDrafter(self)

    def describe(self):
        return {**super().describe(), "providers": self.session.get_providers()}


class OrtDrafter(Drafter):
    """Speculative decoding over model.onnx + mtp.onnx. The decoder's LinearAttention returns only the final
    recurrent state, so `keep` of fewer tokens than verified restores the state from before the verify pass and
    feeds the kept tokens again (exact; llama.cpp's checkpoint-and-replay). The MTP graph's KV cache is cut back."""

    def __init__(self, backend: OrtBackend):
        self.decoder = StatefulGraph(backend.session)
        self.mtp = StatefulGraph(make_session(backend.mtp_path, backend.device))
        if "mtp_hidden" not in self.mtp.outputs:
            raise BackendError(f"{backend.mtp_path}: no `mtp_hidden` output (exported before speculative decoding); "
                               f"re-run `nextq export onnx`")
        self.saved: tuple[dict[str, np.ndarray], int, np.ndarray] | None = None

    def prefill(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        self.decoder.reset(ids.shape[0])
        outs = self.decoder.run({"input_ids": ids})
        return outs["logits"][:, -1], outs["hidden"]

    def verify(self, ids):
        self.saved = (self.decoder.state, self.decoder.position, ids)  # run() replaces the arrays, never mutates
        outs = self.decoder.run({"input_ids": ids})
        return outs["logits"], outs["hidden"]

    def keep(self, n):
        state, position, ids = self.saved
        if n < ids.shape[1]:
            self.decoder.state, self.decoder.position = state, position
            self.decoder.run({"input_ids": ids[:, :n]})

    def draft(self, hidden, ids, start):
        if start == 0:
            self.mtp.reset(ids.shape[0])
        else:
            self.mtp.truncate(start)
        outs = self.mtp.run({"input_ids": ids, "hidden": np.asarray(hidden, np.float32)})
        return outs["logits"], outs["mtp_hidden"]
