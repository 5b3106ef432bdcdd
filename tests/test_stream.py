"""Layer-streamed execution (runtime/stream.py) against the whole-model executor, and packed weights in the runtime.

The stream runs runtime/model.py's layer functions one layer at a time over a lazy Graph; TorchModel runs the same
functions over the whole model (and TorchModel is pinned to transformers by tests/test_parity.py).
"""

from __future__ import annotations

import pytest
import torch

import nextq
from nextq.convert.cli import convert
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.quant import QuantizedTensor, quantize
from nextq.runtime.model import Observer, TorchModel
from nextq.runtime.stream import LayerStream


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def streamed_logits(graph: Graph, ids: torch.Tensor, batch: int = 2) -> torch.Tensor:
    stream = LayerStream(graph, batch=batch)
    hidden = stream.hidden(ids)
    return torch.cat([stream.logits(hidden, s) for s in stream.windows(ids.shape[0])])


@pytest.mark.parametrize("name", ["base", "odd", "sparse_step", "wide"])
def test_streamed_logits_equal_the_whole_model(ckpt_factory, tmp_path, name):
    """Tiny configs straight from the Hugging Face source (the reader's lazy graph) and from the IR."""
    hf = ckpt_factory(name)
    ids = torch.randint(0, 96, (3, 37), generator=torch.Generator().manual_seed(5))  # odd T, batch not a multiple
    ref = torch.cat([TorchModel(nextq.read(str(hf))).forward(ids[i:i + 1]) for i in range(3)])
    assert rel(streamed_logits(nextq.read(str(hf)), ids), ref) <= 1e-6  # same functions, same order: ~0
    convert(str(hf), tmp_path / "ir")
    assert rel(streamed_logits(Graph.load(tmp_path / "ir"), ids), ref) <= 1e-6


def test_streamed_logits_embedded_model_and_packed_weights(tmp_path):
    """The embedded trained model (bf16 as stored), float and with int4 experts kept packed in both executors."""
    ir = tmp_path / "ir"
    convert(str(embedded_model()), ir)
    g = Graph.load(ir)
    ids = torch.randint(0, g.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(6))
    ref = TorchModel(g).forward(ids)
    assert rel(streamed_logits(g, ids), ref) <= 1e-6
    # MTP through the stream equals TorchModel's head
    stream = LayerStream(g)
    h = stream.hidden(ids)
    mtp = stream.logits(stream.mtp_hidden(h, ids), slice(None))
    assert rel(mtp, TorchModel(g).mtp_logits(h[:, :-1], ids[:, 1:])) <= 1e-6
    q = tmp_path / "q"
    g.save(q, cast=lambda n, t: quantize(t, "int4_sym_g32") if ".experts." in n else t)
    gq = Graph.load(q)
    m = TorchModel(gq)
    assert isinstance(m.w.stored["layers.0.ffn.experts.3.up.weight"], QuantizedTensor)  # held packed
    qref = m.forward(ids)
    assert rel(streamed_logits(gq, ids), qref) <= 1e-6
    # packed on use == dequantized at load: the same float32 weights
    dense = Graph(gq.config, {n: (t.dequantize() if isinstance(t, QuantizedTensor) else t)
                              for n, t in ((n, gq.get(n)) for n in gq.tensors)})
    assert rel(qref, TorchModel(dense).forward(ids)) <= 1e-6


def test_observer_sees_every_weight_routing_and_layer(ckpt_factory):
    class Record(Observer):
        def __init__(self):
            self.linear, self.routes, self.layers = {}, {}, []

        def on_linear(self, name, x):
            self.linear[name] = self.linear.get(name, 0) + x.shape[0]

        def on_route(self, prefix, x, ids, weights):
            assert ids.shape == weights.shape == (x.shape[0], 2)
            self.routes[prefix] = self.routes.get(prefix, 0) + x.shape[0]

        def on_layer(self, index, h):
            self.layers.append(index)

    g = nextq.read(str(ckpt_factory("base")))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(7))
    obs = Record()
    LayerStream(g, observer=obs).hidden(ids)
    assert obs.layers == list(range(g.config.num_hidden_layers))
    assert obs.routes == {f"layers.{i}.ffn": 18 for i in range(g.config.num_hidden_layers)}
    assert obs.linear["layers.0.mixer.q.weight"] == 18 and obs.linear["layers.3.mixer.o.weight"] == 18
    experts = sum(v for k, v in obs.linear.items() if k.startswith("layers.0.ffn.experts.") and k.endswith("down.weight"))
    assert experts == 18 * g.config.num_experts_per_tok  # every (token, slot) pair through its expert's down
