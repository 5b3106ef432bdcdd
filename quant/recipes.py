"""Quantization recipes: which scheme each class of tensor gets, with glob overrides by layer or expert.

A recipe names a scheme (a key of `schemes.SCHEMES`, or "keep" = store as the source has it) for each tensor
class below, then applies `overrides` in order (the last matching pattern wins):

    experts        routed experts' gate/up/down       layers.{i}.ffn.experts.{e}.{gate,up,down}.weight
    shared_expert  the shared expert's gate/up/down   layers.{i}.ffn.shared.{gate,up,down}.weight
    dense_mlp      dense-MLP layers' gate/up/down     layers.{i}.ffn.{gate,up,down}.weight
    deltanet       Gated DeltaNet q/k/v/z/out          layers.{i}.mixer.{q,k,v,z,out}.weight
    deltanet_ba    Gated DeltaNet b/a (in_proj_ba)     layers.{i}.mixer.{b,a}.weight
    attention      gated attention q/gate/k/v/o        layers.{i}.mixer.{q,gate,k,v,o}.weight
    router         router and shared-expert gate       layers.{i}.ffn.{router,shared_gate}.weight
    lm_head        the output projection               lm_head.weight
    embed          token embeddings                    embed.weight
    mtp            the MTP input projection            mtp.fc.weight
    norms          norms and small parameters          *norm*.weight, mixer.{A_log,dt_bias,conv.weight}

The MTP block's own layer is classified like any layer (its experts are `experts`, its attention `attention`):
a recipe that treats the whole MTP head differently says so with an override `mtp.*`.

Built-ins (`RECIPES`): int4 (experts Q4_0-compatible, the rest as stored), int4-g64 / int4-asym (other int4 grids
for the experts), fp8 (the layout of Qwen's official FP8 checkpoints), mixed (experts int4, attention, DeltaNet and
the shared expert fp8), int4-int8 (experts int4, every other matrix int8: the best drift per bit measured on the
embedded model, see scripts/bench_quant.py), int4-compact (every matrix int4 but lm_head: llama.cpp Q4_0's size),
int8 (every matrix Q8_0-compatible). User recipes are TOML files:

    name = "my-int4"            # optional, default: the file's stem
    base = "int4"               # optional, start from a built-in
    description = "..."
    [schemes]                   # tensor class -> scheme
    attention = "fp8_block128"
    [[overrides]]               # fnmatch globs over canonical tensor names
    pattern = "layers.0.ffn.experts.*"
    scheme = "int8_g32"

Ragged K: an int4/int8 group scheme needs K to be a multiple of its group size; `plan_schemes` refuses a tensor
that is not (one error listing every such tensor and the class or override responsible). Nothing is padded:
padded groups would not map onto GGUF Q4_0/Q8_0 or ONNX MatMulNBits blocks. Use an override with a scheme that
fits (e.g. `int8_channel` or `fp8_block128`, which take any K).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextq.errors import RecipeError
from nextq.untrusted import read_text
from nextq.graph import Block, ModelConfig, build_blocks, expected_tensors

from .int4 import GROUP_SIZES
from .llama_mix import DEFAULT_TYPE, llama_mix
from .schemes import FLOAT_DTYPES, SCHEMES

KEEP = "keep"  # store the tensor exactly as the source has it
TENSOR_CLASSES = ("experts", "shared_expert", "dense_mlp", "deltanet", "deltanet_ba", "attention", "router",
                  "lm_head", "embed", "mtp", "norms")
FLOAT_ONLY = {"norms"}  # 1-D vectors (and the tiny conv kernel): no quantized scheme makes sense

# Per block kind: (regex over the tensor name relative to the block, tensor class). Sub-blocks are walked first.
BLOCK_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "Embedding": (("weight", "embed"),),
    "LMHead": (("weight", "lm_head"),),
    "FinalNorm": (("weight", "norms"),),
    "Layer": ((r"(input|post)_norm\.weight", "norms"),),
    "GatedDeltaNet": ((r"(q|k|v|z|out)\.weight", "deltanet"), (r"(b|a)\.weight", "deltanet_ba"),
                      (r"conv\.weight|A_log|dt_bias|norm\.weight", "norms")),
    "GatedAttention": ((r"(q|gate|k|v|o)\.weight", "attention"), (r"(q|k)_norm\.weight", "norms")),
    "SparseMoE": ((r"experts\.\d+\.(gate|up|down)\.weight", "experts"),
                  (r"shared\.(gate|up|down)\.weight", "shared_expert"),
                  (r"router\.weight|shared_gate\.weight", "router")),
    "DenseMLP": ((r"(gate|up|down)\.weight", "dense_mlp"),),
    "MTP": ((r"fc\.weight", "mtp"), (r"(embed_norm|hidden_norm|norm)\.weight", "norms")),
}
CHILDREN: dict[str, Callable[[Any], tuple[Block, ...]]] = {
    "Layer": lambda b: (b.mixer, b.ffn),
    "MTP": lambda b: tuple(b.layers),
}


def _scheme_problem(scheme: str, allowed: tuple[str, ...] | None = None) -> str | None:
    """Why `scheme` cannot be used (None when it can)."""
    if allowed is not None and scheme not in allowed:
        return f"{scheme!r} is not allowed here; allowed: {', '.join(allowed)}"
    if scheme == KEEP or scheme in SCHEMES:
        return None
    m = re.fullmatch(r"(int4_(?:sym|asym))_g(\d+)", scheme)
    if m:
        return f"{scheme!r} has an impossible group size {m.group(2)}; int4 group sizes are {list(GROUP_SIZES)}"
    return f"unknown scheme {scheme!r}; supported: {KEEP}, {', '.join(SCHEMES)}"


@dataclass(frozen=True)
class Override:
    """Tensors whose canonical name matches the fnmatch `pattern` get `scheme` (e.g. "layers.3.ffn.experts.*")."""

    pattern: str
    scheme: str

    def __post_init__(self):
        if not self.pattern:
            raise RecipeError("recipe override: pattern must not be empty")
        if problem := _scheme_problem(self.scheme):
            raise RecipeError(f"recipe override {self.pattern!r}: scheme {problem}")


@dataclass(frozen=True)
class Recipe:
    """A scheme per tensor class (see the module docstring) plus ordered overrides; "keep" = as stored."""

    name: str
    experts: str = KEEP
    shared_expert: str = KEEP
    dense_mlp: str = KEEP
    deltanet: str = KEEP
    deltanet_ba: str = KEEP
    attention: str = KEEP
    router: str = KEEP
    lm_head: str = KEEP
    embed: str = KEEP
    mtp: str = KEEP
    norms: str = KEEP
    overrides: tuple[Override, ...] = ()
    description: str = ""
    mix: str = ""  # llama.cpp's per-tensor rules for a K-quant mix (quant/llama_mix.py), applied before overrides

    def __post_init__(self):
        for cls in TENSOR_CLASSES:
            allowed = (KEEP, *FLOAT_DTYPES) if cls in FLOAT_ONLY else None
            if problem := _scheme_problem(getattr(self, cls), allowed):
                raise RecipeError(f"recipe {self.name}: field {cls}: {problem}")
        if self.mix and self.mix not in DEFAULT_TYPE:
            raise RecipeError(f"recipe {self.name}: field mix: unknown {self.mix!r}; supported: "
                              f"{', '.join(DEFAULT_TYPE)}")

    def scheme_for(self, name: str, cls: str, mixed: Mapping[str, tuple[str, str]] | None = None) -> tuple[str, str]:
        """(scheme, where it came from: the class field, the mix rule or the override pattern) for tensor `name` of
        class `cls`; `mixed` = llama_mix(self.mix, config) when the recipe has a mix."""
        scheme, origin = getattr(self, cls), cls
        if mixed and name in mixed:
            scheme, origin = mixed[name]
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                scheme, origin = o.scheme, f"override {o.pattern!r}"
        return scheme, origin

    def classes(self) -> dict[str, str]:
        return {cls: getattr(self, cls) for cls in TENSOR_CLASSES}

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = [dataclasses.asdict(o) for o in self.overrides]
        return d


def _builtin(name: str, description: str, **classes: str) -> Recipe:
    return Recipe(name=name, description=description, **classes)


_FP8 = "fp8_block128"
_REST = ("shared_expert", "dense_mlp", "deltanet", "attention", "mtp", "embed", "lm_head")
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    _builtin("int4", "routed experts int4 g32 symmetric (= GGUF Q4_0), everything else as stored",
             experts="int4_sym_g32"),
    _builtin("int4-g64", "routed experts int4 g64 symmetric (smaller scales overhead), everything else as stored",
             experts="int4_sym_g64"),
    _builtin("int4-asym", "routed experts int4 g32 with zero points (= GGUF Q4_1), everything else as stored",
             experts="int4_asym_g32"),
    _builtin("fp8", "Qwen's official FP8 layout: e4m3 128x128 blocks everywhere except lm_head, embeddings, "
             "norms, A_log, dt_bias, conv1d, in_proj_ba, router, shared_expert_gate and mtp.fc (the MTP layer's "
             "attention and experts are fp8)",
             experts=_FP8, shared_expert=_FP8, dense_mlp=_FP8, deltanet=_FP8, attention=_FP8),
    _builtin("mixed", "routed experts int4 g32 (= Q4_0); attention, DeltaNet and the shared expert fp8 blocks",
             experts="int4_sym_g32", shared_expert=_FP8, dense_mlp=_FP8, deltanet=_FP8, attention=_FP8),
    _builtin("int4-int8", "routed experts int4 g32 (= Q4_0); every other matrix, embeddings and lm_head included, "
             "int8 g32 (= Q8_0); router, b/a, norms as stored",
             experts="int4_sym_g32", **{c: "int8_g32" for c in _REST}),
    _builtin("int4-compact", "every matrix int4 g32 (= Q4_0) except lm_head int8 g32 (= Q8_0); router, b/a, norms "
             "as stored: the size of llama.cpp's Q4_0",
             **{c: "int4_sym_g32" for c in ("experts", *_REST) if c != "lm_head"}, lm_head="int8_g32"),
    _builtin("int8", "every matrix int8 g32 (= GGUF Q8_0), embeddings and lm_head included; router, b/a, norms "
             "as stored", experts="int8_g32", **{c: "int8_g32" for c in _REST}),
    *(_builtin(mix, f"llama.cpp's {mix.upper()} type per tensor (its own rules for qwen3next, quant/llama_mix.py; "
               f"rows not a multiple of 256 fall back as llama.cpp does), then nextq's calibrated rounding",
               mix=mix, **{c: default for c in (*_REST, "experts", "deltanet_ba")}) for mix, default in DEFAULT_TYPE.items()),
)}


def get_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name, or a TOML recipe file by path."""
    if str(spec) in RECIPES:
        return RECIPES[str(spec)]
    path = Path(spec)
    if path.suffix == ".toml" or path.is_file():
        return load_recipe_file(path)
    raise RecipeError(f"recipe: unknown {str(spec)!r}; built-ins: {', '.join(RECIPES)} (or a .toml file)")


FILE_KEYS = ("name", "base", "description", "schemes", "overrides", "mix")


def recipe_from_dict(doc: Mapping[str, Any], default_name: str, where: str) -> Recipe:
    """Build a Recipe from a parsed TOML document; errors name the file and the field."""
    unknown = sorted(set(doc) - set(FILE_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; expected: {', '.join(FILE_KEYS)}")
    base = doc.get("base")
    if base is not None and (not isinstance(base, str) or base not in RECIPES):
        raise RecipeError(f"{where}: field base: unknown built-in {base!r}; built-ins: {', '.join(RECIPES)}")
    start = RECIPES[base].classes() if base else {}
    schemes = doc.get("schemes", {})
    if not isinstance(schemes, Mapping):
        raise RecipeError(f"{where}: field schemes must be a table of tensor class = scheme")
    bad = sorted(set(schemes) - set(TENSOR_CLASSES))
    if bad:
        raise RecipeError(f"{where}: [schemes] unknown tensor class {bad}; known: {', '.join(TENSOR_CLASSES)}")
    if not isinstance(doc.get("overrides", []), list):
        raise RecipeError(f"{where}: field overrides must be an array of tables {{pattern, scheme}}")
    overrides = []
    for i, o in enumerate(doc.get("overrides", [])):
        if not isinstance(o, Mapping) or set(o) != {"pattern", "scheme"}:
            raise RecipeError(f"{where}: overrides[{i}] must have exactly the keys pattern and scheme, got {o!r}")
        try:
            overrides.append(Override(str(o["pattern"]), str(o["scheme"])))
        except RecipeError as e:
            raise RecipeError(f"{where}: overrides[{i}]: {e}") from None
    try:
        mix = str(doc.get("mix", RECIPES[base].mix if base else ""))
        return Recipe(name=str(doc.get("name", default_name)), description=str(doc.get("description", "")),
                      overrides=tuple(overrides), mix=mix, **{**start, **{k: str(v) for k, v in schemes.items()}})
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


MAX_RECIPE_BYTES = 1 << 20


def load_recipe_file(path: Path) -> Recipe:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        doc = tomllib.loads(read_text(path, MAX_RECIPE_BYTES))
    except ValueError as e:  # tomllib.TOMLDecodeError, or an integer of more than 4300 digits
        raise RecipeError(f"{path}: invalid TOML ({e})") from None
    except RecursionError:
        raise RecipeError(f"{path}: invalid TOML (nested too deeply)") from None
    return recipe_from_dict(doc, path.stem, str(path))


# ---- applying a recipe to a model -----------------------------------------------------------------------------


def _walk(block: Block, c: ModelConfig) -> Iterator[tuple[str, str]]:
    """(canonical name, tensor class) for every tensor of `block`, sub-blocks first."""
    inner = set()
    for child in CHILDREN.get(block.kind, lambda b: ())(block):
        for name, cls in _walk(child, c):
            inner.add(name)
            yield name, cls
    for name in block.tensor_specs(c):
        if name in inner:
            continue
        local = name[len(block.prefix) + 1:]
        cls = next((cls for rx, cls in BLOCK_CLASSES[block.kind] if re.fullmatch(rx, local)), None)
        assert cls is not None, f"{name}: no tensor class for {block.kind} tensor {local!r}"
        yield name, cls


@functools.lru_cache(maxsize=8)
def tensor_classes(c: ModelConfig) -> dict[str, str]:
    """Canonical tensor name -> tensor class, for every tensor of a model with config `c`."""
    return {name: cls for b in build_blocks(c) for name, cls in _walk(b, c)}


@dataclass(frozen=True)
class PlanEntry:
    """What happens to one tensor."""

    cls: str
    scheme: str  # "keep" or a SCHEMES key
    origin: str  # the recipe field or override that decided it
    fallback: tuple[str, ...] = ()  # llama.cpp's fallbacks taken for its row length, each stated (fit_scheme)


def fit_scheme(scheme: str, k: int) -> tuple[str, list[str]]:
    """The scheme a row of length k gets: `scheme` itself when k is a multiple of its block, else its fallback
    chain as llama.cpp's (q4_k -> q5_0, q5_k -> q5_1, q6_k -> int8_g32, a 32-block type -> f16 when even that
    does not fit); returns (scheme, the fallbacks taken, each stated). Schemes without a fallback are returned as
    they are (plan_schemes refuses them)."""
    taken = []
    while k % SCHEMES[scheme].k_multiple and SCHEMES[scheme].fallback:
        nxt = SCHEMES[scheme].fallback
        taken.append(f"{scheme} -> {nxt} (K={k} is not a multiple of {SCHEMES[scheme].k_multiple})")
        scheme = nxt
    return scheme, taken


def fallback_counts(taken: Iterable[tuple[str, ...]]) -> dict[str, int]:
    """How many tensors took each of llama.cpp's row-length fallbacks (each tensor's PlanEntry.fallback), sorted."""
    return dict(sorted(Counter(f for fallbacks in taken for f in fallbacks).items()))


def fallback_lines(counts: Mapping[str, int]) -> list[str]:
    """The fallbacks stated for the console, one line each: never silent."""
    return [f"fallback as llama.cpp's: {n} tensor(s) {what}" for what, n in counts.items()]


def plan_schemes(recipe: Recipe, c: ModelConfig, shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> dict[str, PlanEntry]:
    """Scheme of every tensor. K-quants on rows that are not a multiple of 256 fall back as llama.cpp does (stated
    in the entry's origin). Refuses (one error listing them) quantized schemes on 1-D tensors and group schemes
    whose group size does not divide K."""
    shapes = shapes or {k: v.shape for k, v in expected_tensors(c).items()}
    plan: dict[str, PlanEntry] = {}
    problems: list[str] = []
    mixed = llama_mix(recipe.mix, c) if recipe.mix else None
    for name, cls in tensor_classes(c).items():
        scheme, origin = recipe.scheme_for(name, cls, mixed)
        taken: list[str] = []
        shape = tuple(shapes[name])
        if scheme != KEEP and scheme not in FLOAT_DTYPES:
            if len(shape) != 2:
                problems.append(f"{name} ({origin}): {scheme} needs a 2-D weight, got shape {list(shape)}")
            else:
                scheme, taken = fit_scheme(scheme, shape[1])
                g = SCHEMES[scheme].k_multiple
                if shape[1] % g:
                    problems.append(f"{name} ({origin}): {scheme} needs K to be a multiple of {g}, got K={shape[1]}")
        plan[name] = PlanEntry(cls, scheme, origin, tuple(taken))
    if problems:
        more = f" ... (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise RecipeError(f"recipe {recipe.name}: {len(problems)} tensor(s) cannot take their scheme: "
                          f"{'; '.join(problems[:4])}{more} (no padding: add an override with a scheme that fits, "
                          f"e.g. int8_channel or fp8_block128)")
    return plan


def nominal_bits(scheme: str, keep_bits: float) -> float:
    """Nominal bits per weight of a scheme ("keep" = `keep_bits`, the source dtype's width)."""
    return keep_bits if scheme == KEEP else SCHEMES[scheme].bits_per_weight


def estimate_bits_per_weight(recipe: Recipe, c: ModelConfig, keep_bits: float = 16.0,
                             shapes: Mapping[str, tuple[int, ...]] | None = None) -> float:
    """Parameter-weighted nominal bits per weight of `recipe` over every tensor of a model with config `c`."""
    shapes = shapes or {k: v.shape for k, v in expected_tensors(c).items()}
    total = bits = 0.0
    for name, entry in plan_schemes(recipe, c, shapes).items():
        n = 1
        for d in shapes[name]:
            n *= d
        total += n
        bits += n * nominal_bits(entry.scheme, keep_bits)
    return bits / total


def qwen3_next_80b() -> ModelConfig:
    """Shapes of Qwen/Qwen3-Next-80B-A3B (for `nextq recipes`' size estimates)."""
    return ModelConfig(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
        layer_types=tuple("linear_attention" if (i + 1) % 4 else "full_attention" for i in range(48)),
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        mtp_num_hidden_layers=1,
    )


__all__ = ["KEEP", "RECIPES", "TENSOR_CLASSES", "Override", "PlanEntry", "Recipe", "estimate_bits_per_weight",
           "get_recipe", "load_recipe_file", "plan_schemes", "qwen3_next_80b", "recipe_from_dict", "tensor_classes"]
