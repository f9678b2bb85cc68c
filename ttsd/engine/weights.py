"""Piper ONNX export → (VitsArgs, state_dict) for ``ttsd.engine.vits.Vits``.

Most initializers keep their module names (``enc_p.*``, ``dp.*``, ``flow.*``, ``dec.*``).
The exceptions, each found through the graph rather than by name:

- the phoneme embedding: the Gather node that reads the ``input`` graph input;
- the speaker embedding: the Gather node that reads the ``sid`` graph input;
- weight-normed flow convolutions (``flow.flows.N.enc.in_layers.K`` …): anonymous
  ``onnx::Conv_*`` tensors, found through the Conv node that uses their named bias;
- the duration predictor's affine flow scale, folded to ``exp(-logs)``.

Hyper-parameters come from tensor shapes and Conv node attributes (dilations,
strides, pads), never from a quality name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttsd.engine.vits import Vits, VitsArgs
from ttsd.errors import VoiceError


class OnnxGraph:
    """Initializers and Conv nodes of one ONNX file, indexed for lookups."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
            raise VoiceError(f"{path}: not a readable ONNX file ({exc})") from None
        self.path = path
        g = model.graph
        self._raw = {t.name: t for t in g.initializer}
        self._to_array = numpy_helper.to_array
        self.inputs = {i.name for i in g.input}
        self.nodes = list(g.node)
        self.conv_by_weight: dict[str, Any] = {}
        self.conv_by_bias: dict[str, Any] = {}
        for n in self.nodes:
            if n.op_type in ("Conv", "ConvTranspose") and len(n.input) >= 2:
                self.conv_by_weight[n.input[1]] = n
                if len(n.input) >= 3:
                    self.conv_by_bias[n.input[2]] = n

    @property
    def names(self) -> list[str]:
        return list(self._raw)

    def has(self, name: str) -> bool:
        return name in self._raw

    def array(self, name: str) -> np.ndarray:
        if name not in self._raw:
            raise VoiceError(f"{self.path.name}: missing tensor {name!r}")
        return self._to_array(self._raw[name])

    def gather_table(self, index_input: str) -> str | None:
        """Name of the initializer that a Gather node indexes with ``index_input``."""
        for n in self.nodes:
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == index_input \
                    and n.input[0] in self._raw:
                return n.input[0]
        return None

    def attrs(self, node: Any) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def conv_attr(self, weight: str, key: str, default: Any) -> Any:
        node = self.conv_by_weight.get(weight)
        if node is None:
            raise VoiceError(f"{self.path.name}: no convolution uses tensor {weight!r}")
        return self.attrs(node).get(key, default)

    def weight_of_bias(self, bias: str) -> str:
        node = self.conv_by_bias.get(bias)
        if node is None:
            raise VoiceError(f"{self.path.name}: no convolution uses bias {bias!r}")
        return node.input[1]


def _indices(names: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.fullmatch(n))})


def read_args(g: OnnxGraph, num_speakers: int) -> VitsArgs:
    """Hyper-parameters from shapes and node attributes."""
    names = g.names
    emb = g.gather_table("input")
    if emb is None:
        raise VoiceError(f"{g.path.name}: no phoneme embedding (Gather on 'input') found")
    n_vocab, hidden = g.array(emb).shape
    inter = g.array("enc_p.proj.weight").shape[0] // 2
    n_layers = len(_indices(names, r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight"))
    if n_layers == 0:
        raise VoiceError(f"{g.path.name}: missing tensor 'enc_p.encoder.attn_layers.0.conv_q.weight'")
    rel = g.array("enc_p.encoder.attn_layers.0.emb_rel_k")
    ffn = g.array("enc_p.encoder.ffn_layers.0.conv_1.weight")
    use_sdp = g.has("dp.pre.weight")
    if use_sdp:
        sdp_flows = len(_indices(names, r"dp\.flows\.(\d+)\.pre\.weight"))
        dp_layers = len(_indices(names, r"dp\.convs\.convs_sep\.(\d+)\.weight"))
        dp_kernel = g.array("dp.convs.convs_sep.0.weight").shape[2]
        dp_filter = hidden
        first_flow = _indices(names, r"dp\.flows\.(\d+)\.proj\.weight")[0]
        proj = g.array(f"dp.flows.{first_flow}.proj.weight")
        num_bins = (proj.shape[0] + 1) // 3
    else:
        w = g.array("dp.conv_1.weight")
        dp_filter, _, dp_kernel = w.shape
        sdp_flows, dp_layers, num_bins = 0, 0, 10
    flows = _indices(names, r"flow\.flows\.(\d+)\.pre\.weight")
    wn_layers = _indices(names, r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.bias")
    wn_weights = [g.weight_of_bias(f"flow.flows.0.enc.in_layers.{i}.bias") for i in wn_layers]
    ups = _indices(names, r"dec\.ups\.(\d+)\.weight")
    n_rb = len(_indices(names, r"dec\.resblocks\.(\d+)\.(?:convs|convs1)\.0\.weight"))
    if not ups or not n_rb or n_rb % len(ups):
        raise VoiceError(f"{g.path.name}: decoder tensors 'dec.ups.*'/'dec.resblocks.*' missing or uneven")
    kind = "1" if g.has("dec.resblocks.0.convs1.0.weight") else "2"
    conv_key = "convs1" if kind == "1" else "convs"
    rb_kernels, rb_dils = [], []
    for j in range(n_rb // len(ups)):
        convs = _indices(names, rf"dec\.resblocks\.{j}\.{conv_key}\.(\d+)\.weight")
        first = f"dec.resblocks.{j}.{conv_key}.0.weight"
        rb_kernels.append(int(g.array(first).shape[2]))
        rb_dils.append(tuple(int(g.conv_attr(f"dec.resblocks.{j}.{conv_key}.{c}.weight",
                                             "dilations", [1])[0]) for c in convs))
    up_cfg = []
    for i in ups:
        wname = f"dec.ups.{i}.weight"
        k = int(g.array(wname).shape[2])
        stride = int(g.conv_attr(wname, "strides", [1])[0])
        pad = int(g.conv_attr(wname, "pads", [0, 0])[0])
        up_cfg.append((k, stride, pad))
    gin = 0
    if num_speakers > 1:
        table = g.gather_table("sid")
        if table is None:
            raise VoiceError(f"{g.path.name}: config says {num_speakers} speakers but no speaker "
                             "embedding (Gather on 'sid') is in the graph")
        gin = int(g.array(table).shape[1])
    return VitsArgs(
        n_vocab=int(n_vocab), hidden=int(hidden), inter=int(inter), filter=int(ffn.shape[0]),
        n_heads=int(hidden // rel.shape[2]), n_layers=n_layers, ffn_kernel=int(ffn.shape[2]),
        window=int((rel.shape[1] - 1) // 2), n_speakers=max(1, num_speakers), gin=gin,
        use_sdp=use_sdp, dp_kernel=int(dp_kernel), dp_layers=dp_layers,
        dp_filter=int(dp_filter), sdp_flows=sdp_flows, num_bins=int(num_bins),
        n_flows=len(flows), wn_kernel=int(g.array(wn_weights[0]).shape[2]),
        wn_dilations=tuple(int(g.conv_attr(w, "dilations", [1])[0]) for w in wn_weights),
        upsample_initial=int(g.array("dec.conv_pre.weight").shape[0]), ups=tuple(up_cfg),
        resblock=kind, rb_kernels=tuple(rb_kernels), rb_dilations=tuple(rb_dils))


def _source_name(g: OnnxGraph, key: str, a: VitsArgs) -> str | None:
    """Where in the ONNX file the tensor for our parameter ``key`` lives (None: derived)."""
    if key == "enc_p.emb.weight":
        return g.gather_table("input")
    if key == "emb_g.weight":
        return g.gather_table("sid")
    m = re.fullmatch(r"dp\.flows\.(\d+)\.(.*)", key)
    if m:  # our ConvFlows are listed in application order: highest ONNX index first
        onnx_idx = list(reversed(_indices(g.names, r"dp\.flows\.(\d+)\.pre\.weight")))
        return f"dp.flows.{onnx_idx[int(m.group(1))]}.{m.group(2)}"
    if key == "dp.affine_m":
        return "dp.flows.0.m"
    if key == "dp.affine_inv_scale":
        return None
    m = re.fullmatch(r"flow\.flows\.(\d+)\.(.*)", key)
    if m:  # the coupling layers sit at even indices (odd ones are parameter-free flips)
        name = f"flow.flows.{2 * int(m.group(1))}.{m.group(2)}"
        if re.search(r"\.enc\.(in_layers\.\d+|res_skip_layers\.\d+|cond_layer)\.weight$", name):
            return g.weight_of_bias(name[: -len("weight")] + "bias")
        return name
    return key


def _affine_inv_scale(g: OnnxGraph) -> np.ndarray:
    if g.has("dp.flows.0.logs"):
        return np.exp(-g.array("dp.flows.0.logs"))
    sub = next((n for n in g.nodes if n.op_type == "Sub" and "dp.flows.0.m" in n.input), None)
    if sub is not None:
        for n in g.nodes:
            if n.op_type == "Mul" and sub.output[0] in n.input:
                other = next(i for i in n.input if i != sub.output[0])
                value = _constant(g, other)
                if value is not None:
                    return value
    raise VoiceError(f"{g.path.name}: missing tensor 'dp.flows.0.logs' (the duration "
                     "predictor's affine flow scale)")


def _constant(g: OnnxGraph, name: str, depth: int = 0) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or Exp/Neg of one (exporters fold
    these differently: the published voices store exp(-logs), torch 2.13 keeps Exp)."""
    if g.has(name):
        return g.array(name)
    if depth > 3:
        return None
    node = next((n for n in g.nodes if name in n.output), None)
    if node is None or node.op_type not in ("Exp", "Neg") or not node.input:
        return None
    inner = _constant(g, node.input[0], depth + 1)
    if inner is None:
        return None
    return np.exp(inner) if node.op_type == "Exp" else -inner


def load_onnx(path: Path, num_speakers: int) -> tuple[VitsArgs, dict[str, torch.Tensor]]:
    """Read a Piper ONNX file into VitsArgs and a checked state_dict (float32, CPU)."""
    g = OnnxGraph(path)
    try:
        args = read_args(g, num_speakers)
    except (KeyError, IndexError, ValueError) as exc:
        raise VoiceError(f"{path.name}: does not look like a Piper VITS export ({exc})") from None
    with torch.no_grad():   # on the CPU, not the meta device: see ``build``
        expected = Vits(args).state_dict()
    sd: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        if key == "dp.affine_inv_scale":
            arr = _affine_inv_scale(g)
        else:
            src = _source_name(g, key, args)
            if src is None or not g.has(src):
                raise VoiceError(f"{path.name}: missing tensor {src or key!r} (for {key})")
            arr = g.array(src)
        if tuple(arr.shape) != tuple(ref.shape):
            raise VoiceError(f"{path.name}: tensor {src if key != 'dp.affine_inv_scale' else key!r}"
                             f" has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        t = torch.from_numpy(np.array(arr, dtype=np.float32))
        if not torch.isfinite(t).all():
            raise VoiceError(f"{path.name}: tensor {key!r} holds NaN or Inf values")
        sd[key] = t
    return args, sd


def build(args: VitsArgs, sd: Mapping[str, torch.Tensor]) -> Vits:
    """Instantiate on the CPU and assign the weights. Not on the meta device: there the
    initialisers run through PyTorch's Python decompositions, whose first use imports the
    compiler (1 s of a 2 s ``ttsd say``); the throw-away CPU initialisation costs 0.08 s."""
    with torch.no_grad():
        model = Vits(args)
    model.load_state_dict(dict(sd), assign=True, strict=True)
    return model.eval()
