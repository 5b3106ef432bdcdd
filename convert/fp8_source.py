"""FP8 checkpoints (Qwen's official `-FP8` releases) read exactly, for every family: e4m3 weights with their
`weight_scale_inv` 128x128 tiles become fp8 IR tensors holding the same codes and the same scales.

    tensors = pair_scales(config_json, ckpt.tensors)   # `<m>.weight` + `<m>.weight_scale_inv` -> one Fp8Stored
    src = fp8_stored.source(shape, transform)          # a lazy canonical tensor (the reader's row split applied)

Layout (notes/fp8-and-yarn.md): `quantization_config` {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
weight_block_size: [128, 128], modules_to_not_convert}; `<m>.weight` F8_E4M3 [N, K] and `<m>.weight_scale_inv`
[ceil(N/128), ceil(K/128)] (bf16 or fp32), w = q * s of the tile (multiply despite the name; ragged edge tiles).

The tiles lie on the *stored* (fused) tensors. A reader's split (q / k / v / z out of in_proj_qkvz, q / gate out
of q_proj) selects rows, so each canonical row keeps its source row's scales: when every 128-row block of the
canonical tensor comes from one source tile (always so on the real models, whose head dims are multiples of 128)
the tensor is `fp8_block128` with the tiles' scales; otherwise (a tile straddling two canonical tensors) it is
`fp8_g128`, one scale per row and 128 columns. Either way the codes are the stored bytes and dequantization
gives exactly the source's q * s: nothing is re-quantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.quant import QuantizedTensor
from nextq.storage import StoredTensor

from .quant_source import QuantizedSource, QuantizedStored, register_layout

FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # `<m>.weight` -> `<m>.weight_scale_inv`
# quantization_config keys nextq implements, with the one value each may take
SUPPORTED = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "scale_fmt": "float"}
SCALE_DTYPES = ("BF16", "F16", "F32")


def check_fp8_config(config: Mapping[str, Any]) -> bool:
    """Whether config.json declares an FP8 checkpoint nextq reads; a clear error for one it cannot."""
    qc = config.get("quantization_config")
    if not qc:
        return False
    for key, want in SUPPORTED.items():
        got = qc.get(key, want if key in ("fmt", "scale_fmt") else None)  # transformers' defaults: e4m3, float
        if got != want:
            raise UnsupportedModelError(f"config: quantization_config.{key}={got!r}, supported: [{want!r}] "
                                        f"(Qwen's FP8 layout: {SUPPORTED})")
    return True


class Fp8Source(QuantizedSource):
    """A canonical fp8 tensor read on demand: the stored codes through the reader's row transform, with the scales
    of the source rows each canonical row came from (see the module docstring). Loads as a QuantizedTensor."""

    dtype = torch.float8_e4m3fn

    @property
    def scheme(self) -> str:
        """fp8_block128 when each 128-row block of the canonical tensor lies in one source row tile, else fp8_g128."""
        rm = self.row_map
        if rm is None:
            return "fp8_block128"
        tiles = rm // FP8_BLOCK
        firsts = tiles[::FP8_BLOCK].repeat_interleave(FP8_BLOCK)[:len(tiles)]
        return "fp8_block128" if bool((tiles == firsts).all()) else "fp8_g128"

    def load(self) -> QuantizedTensor:
        codes = self.stored.weight.read()  # float8_e4m3fn [N, K]
        scales = self.stored.scale.read().to(torch.float32)  # [ceil(N/128), ceil(K/128)], exact upcast
        rm = self.row_map
        if rm is not None:
            codes = self.transform(codes)
            scales = scales[rm // FP8_BLOCK]  # one row of tile scales per canonical row [N', ceil(K/128)]
        scheme = self.scheme
        if rm is not None and scheme == "fp8_block128":
            scales = scales[::FP8_BLOCK].contiguous()  # uniform per 128-row block: the tile rows themselves
        block = (FP8_BLOCK, FP8_BLOCK) if scheme == "fp8_block128" else (1, FP8_BLOCK)
        return self.checked(QuantizedTensor(scheme=scheme, shape=tuple(codes.shape), data=codes.contiguous(),
                                            scales=scales.contiguous(), block_size=block))


@dataclass(frozen=True)
class Fp8Stored(QuantizedStored):
    """An e4m3 weight and its tile scales in a checkpoint (a QuantizedStored: the family tables map it like any
    stored tensor); `source` builds its canonical tensors."""

    weight: StoredTensor
    scale: StoredTensor

    dtype = property(lambda self: self.weight.dtype)
    shape = property(lambda self: self.weight.shape)

    source_class = Fp8Source


def fp8_pair(key: str, w: StoredTensor, scale: StoredTensor | None, scale_key: str) -> Fp8Stored:
    """An e4m3 weight [N, K] and its 128x128 tile scales `scale_key` [ceil(N/128), ceil(K/128)], checked (one error
    naming the tensor) and merged; the pairing of Qwen's layout and of compressed-tensors' float-quantized blocks."""
    if scale is None:
        raise CheckpointError(f"{key}: F8_E4M3 weight without {scale_key}")
    if w.dtype != "F8_E4M3" or len(w.shape) != 2:
        raise CheckpointError(f"{key}: FP8 weight {w.dtype} {list(w.shape)}, expected F8_E4M3 2-D [N, K]")
    want = [-(-d // FP8_BLOCK) for d in w.shape]
    if list(scale.shape) != want:
        raise CheckpointError(f"{scale_key}: shape {list(scale.shape)}, expected {want} "
                              f"(128x128 tiles of {list(w.shape)})")
    if scale.dtype not in SCALE_DTYPES:
        raise CheckpointError(f"{scale_key}: dtype {scale.dtype}, supported: {list(SCALE_DTYPES)}")
    return Fp8Stored(w, scale)


def pair_scales(config: Mapping[str, Any], tensors: Mapping[str, StoredTensor]) -> dict[str, Any]:
    """The stored tensors with each FP8 weight and its `weight_scale_inv` merged into one Fp8Stored.

    Errors (one line, naming the tensor): an F8_E4M3 tensor without a declared FP8 quantization_config, a weight
    without its scale or a scale without its weight, a scale of the wrong shape or dtype, a weight that is not 2-D,
    static activation scales.
    """
    fp8 = sorted(k for k, st in tensors.items() if st.dtype == "F8_E4M3")
    if not check_fp8_config(config):
        if fp8:
            raise CheckpointError(f"{fp8[0]}: F8_E4M3 tensor ({len(fp8)} in all) but config.json declares no "
                                  "quantization_config with quant_method fp8")
        return dict(tensors)
    out = {k: st for k, st in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    for key, st in tensors.items():
        if key.endswith(("activation_scale", "input_scale")):
            raise UnsupportedModelError(f"{key}: static activation scales; supported: activation_scheme 'dynamic' "
                                        "(no stored activation scales)")
        if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) not in tensors:
            raise CheckpointError(f"{key}: scale without its weight {key.removesuffix(SCALE_SUFFIX)}")
    for key in fp8:
        out[key] = fp8_pair(key, tensors[key], tensors.get(key + SCALE_SUFFIX), key + SCALE_SUFFIX)
    for key in tensors:
        if key.endswith(SCALE_SUFFIX) and (w := tensors[key.removesuffix(SCALE_SUFFIX)]).dtype != "F8_E4M3":
            raise CheckpointError(f"{key}: scale of a weight stored as {w.dtype}, expected F8_E4M3")
    return out


register_layout("fp8")(pair_scales)
register_layout(None)(pair_scales)  # no quantization_config: refuses stray F8_E4M3 tensors


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.is_floating_point() else t


def write_dequantized_checkpoint(src: str | Path, out: Path) -> Path:
    """A Hugging Face checkpoint at `out` with `src`'s FP8 weights as float32 q * s, its scales dropped, its other
    float tensors upcast to float32 (exact), the quantization_config removed and every other file as it is: the
    validation reference for an FP8 source (transformers runs it; its own FP8 loading needs accelerate and, in
    5.24, dequantizes ragged tiles wrongly). Holds one shard's tensors at a time."""
    import json
    import shutil

    from nextq.storage import write_safetensors

    from .hf import open_checkpoint

    ckpt = open_checkpoint(str(src))
    paired = pair_scales(ckpt.config, ckpt.tensors)
    out.mkdir(parents=True, exist_ok=True)
    for shard in ckpt.shards:
        tensors = {k: (st.source(st.shape, None).load().dequantize() if isinstance(st, Fp8Stored)
                       else _float32(st.read())) for k, st in paired.items() if st.path == str(shard)}
        write_safetensors(out / shard.name, tensors, {"format": "pt"})
    for f in ckpt.root.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, out / f.name)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = ckpt.root / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if k in paired}
        (out / index.name).write_text(json.dumps(doc, indent=2))
    return out
