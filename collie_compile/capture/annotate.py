"""Annotate a captured graph: what each node computes, owns and keeps for backward.

Per node: op, output shape and dtype, FLOPs, bytes moved, owning module path (from
``nn_module_stack``), parameters used, which decoder block it belongs to, and whether
it lies in the tensor-parallel *sharded region* of its block (between a column-parallel
linear and the row-parallel linear that closes it, where activations split by tp).

Decoder blocks are detected as the children of the module list that repeats (e.g.
``model.layers.<i>``); their op sequences are compared so later stages may plan one
block and reuse it. Saved-for-backward bytes are measured exactly by interpreting the
graph under FakeTensorMode with saved-tensor hooks, each saved storage attributed to
the node that produced it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram

from collie_compile.models.attention import expanded_sdpa

aten = torch.ops.aten

# Ops that only reinterpret memory (no FLOPs, no traffic worth counting).
_VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.slice.Tensor, aten.select.int, aten.t.default, aten.split.Tensor,
    aten.alias.default, aten.detach.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.sym_size.int, aten._assert_tensor_metadata.default, aten.lift_fresh_copy.default,
}
_LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
# Routed experts' grouped products (collie_compile.models.experts): torch's fused kernel,
# or transformers' per-expert fallback op; rows are the (token, expert) pairs routed.
GROUPED_OPS = {"aten._grouped_mm.default", "aten.grouped_mm.default",
                "transformers.grouped_mm_fallback.default"}
_ADD_OPS = {aten.add.Tensor, aten.add_.Tensor}
# a weight read through one of these is still the linear's weight (x @ W.T, Falcon)
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def weight_of(a: fx.Node) -> fx.Node:
    """The ``get_attr`` node behind ``a`` when ``a`` transposes one, else ``a``."""
    if a.op == "call_function" and a.target in TRANSPOSES and isinstance(a.args[0], fx.Node) \
            and a.args[0].op == "get_attr":
        return a.args[0]
    return a


@dataclass
class NodeInfo:
    """One graph node. Shapes are symbolic (sympy) in the batch and sequence symbols."""

    name: str
    op: str
    module: str
    block: int | None
    params: list[str]
    shape: tuple | None
    dtype: torch.dtype | None
    kind: str  # "linear", "attention", "experts", "view", "other" (layout.MATMUL_KINDS)
    sharded: bool = False
    # inside a mixture-of-experts sublayer (the module holding a routed experts bank):
    # replicated under tp, which splits none of it (ep splits the experts)
    replicated: bool = False
    residual: bool = False  # an add onto the block's residual stream
    flops: object = 0  # sympy expression in (batch, seq)
    bytes: object = 0


@dataclass
class AnnotatedGraph:
    """The captured program with per-node annotations and its repeated blocks."""

    program: ExportedProgram
    gm: fx.GraphModule
    nodes: dict[str, NodeInfo]
    block_prefix: str  # e.g. "model.layers."
    num_blocks: int
    blocks_identical: bool
    batch_sym: sympy.Symbol
    seq_sym: sympy.Symbol
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # the labels' own symbols where export did not unify them with input_ids' (automatic
    # dims), mapped to batch_sym / seq_sym
    aliases: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)

    def subs(self, expr: object, batch: int, seq: int) -> int:
        if isinstance(expr, (int, float)):
            return int(expr)
        expr = sympy.sympify(expr)
        if self.aliases:
            expr = expr.subs(self.aliases)
        return int(expr.subs({self.batch_sym: batch, self.seq_sym: seq}))

    def block_nodes(self, i: int) -> list[NodeInfo]:
        return [n for n in self.nodes.values() if n.block == i]

    def flops(self, batch: int, seq: int, block: int | None | str = "all") -> int:
        """Forward FLOPs of one block, of the non-block part (``None``) or of everything."""
        return sum(self.subs(n.flops, batch, seq) for n in self.nodes.values()
                   if block == "all" or n.block == block)

    def bytes_moved(self, batch: int, seq: int, block: int | None | str = "all") -> int:
        return sum(self.subs(n.bytes, batch, seq) for n in self.nodes.values()
                   if block == "all" or n.block == block)


def _expr(d: object) -> object:
    return d.node.expr if isinstance(d, torch.SymInt) else int(d)


def _val_shape(node: fx.Node) -> tuple | None:
    v = node.meta.get("val")
    return tuple(_expr(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _numel(shape: tuple | None) -> object:
    out = 1
    for d in shape or ():
        out = out * d
    return out if shape is not None else 0


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values() if not p.startswith("_empty")]
    return paths[-1] if paths else ""


def _block_of(path: str, prefix: str) -> int | None:
    if not prefix or not path.startswith(prefix):
        return None
    head = path[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _find_block_prefix(model: torch.nn.Module) -> str:
    """The longest module list of identical-type children: the decoder blocks."""
    best, best_len = "", 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if len({type(c) for c in mod}) == 1 and len(mod) >= best_len:
                best, best_len = name + ".", len(mod)
    return best


def _tensor_bytes(node: fx.Node) -> object:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return _numel(_val_shape(node)) * v.element_size()
    return 0


def _node_cost(node: fx.Node, kind: str, shape: tuple | None) -> tuple[object, object]:
    """(FLOPs, bytes) of one forward node, symbolic in batch and sequence."""
    if kind == "view" or shape is None:
        return 0, 0
    ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    traffic = sum((_tensor_bytes(a) for a in ins), _tensor_bytes(node))
    out = _numel(shape)
    if kind in ("linear", "experts"):  # experts: rows are the routed (token, expert) pairs
        a_shape = _val_shape(ins[1] if node.target == aten.addmm.default else ins[0])
        k = a_shape[-1]
        return 2 * out * k, traffic
    if kind == "attention":
        q, k = _val_shape(ins[0]), _val_shape(ins[1])
        # Dense (non-causal) count, as MFU conventions do: QK^T and AV.
        return 4 * _numel(q[:-1]) * k[-2] * q[-1], traffic
    if node.target == aten.embedding.default:
        return 0, 2 * _tensor_bytes(node)
    return out, traffic


def annotate(ep: ExportedProgram, model: torch.nn.Module) -> AnnotatedGraph:
    """Annotate ``ep`` (captured from ``model`` by
    :func:`collie_compile.capture.export.capture`)."""
    gm = ep.module()
    prefix = _find_block_prefix(model)
    params = dict(gm.named_parameters(remove_duplicate=False))
    nodes: dict[str, NodeInfo] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids_shape = _val_shape(placeholders[0])
    batch_sym, seq_sym = ids_shape[0], ids_shape[1]
    labels_shape = (_val_shape(placeholders[1]) or ()) if len(placeholders) > 1 else ()
    aliases = {a: b for a, b in zip(labels_shape, (batch_sym, seq_sym))
               if isinstance(a, sympy.Symbol) and a != b}

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        used = [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in params]
        grouped = str(node.target) in GROUPED_OPS
        if node.target in _LINEAR_OPS or grouped:
            used += [w.target for a in node.all_input_nodes
                     if (w := weight_of(a)) is not a and w.target in params]
        if node.target in _VIEW_OPS or node.target is operator.getitem:
            kind = "view"
        elif node.target in _LINEAR_OPS and any(len(params[p].shape) == 2 for p in used):
            kind = "linear"
        elif node.target in _ATTENTION_OPS:
            kind = "attention"
        elif grouped:
            kind = "experts"
        else:
            kind = "other"
        module = _module_path(node)
        shape = _val_shape(node)
        v = node.meta.get("val")
        info = NodeInfo(node.name, str(node.target), module, _block_of(module, prefix), used,
                        shape, v.dtype if isinstance(v, torch.Tensor) else None, kind)
        info.flops, info.bytes = _node_cost(node, kind, shape)
        nodes[node.name] = info

    num_blocks = 1 + max((n.block for n in nodes.values() if n.block is not None), default=-1)
    _mark_residual_adds(gm, nodes, prefix)
    _mark_sharded_regions(gm, nodes, prefix)
    # computing tensor ops only: size arithmetic (batch x heads) is computed once and
    # reused, and views differ between sliding-window and full-attention layers (K/V
    # expanded beside a mask, grouped without), which cost no FLOPs
    sigs = [tuple((n.op, n.kind, n.sharded, str(n.shape)) for n in nodes.values()
                  if n.block == i and n.shape is not None and n.kind != "view")
            for i in range(num_blocks)]
    return AnnotatedGraph(ep, gm, nodes, prefix, num_blocks, len(set(sigs)) <= 1,
                          batch_sym, seq_sym, {k: tuple(p.shape) for k, p in params.items()},
                          aliases)


# Ops that pass a value on unchanged (in training, up to dropout's noise): the residual
# stream may run through them before its add.
_SAME_VALUE = {aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.clone.default,
               aten.contiguous.default, aten.alias.default, aten.detach.default}


def _mark_residual_adds(gm: fx.GraphModule, nodes: dict[str, NodeInfo], prefix: str) -> None:
    """Mark the adds onto each block's residual stream: adds owned by the block module
    itself (GPT-NeoX's attention + MLP sum too), and adds with an operand that is the
    block's input (a value from outside the block, of the block's hidden shape) or an
    earlier such add, possibly through dropout and views: data flow finds them where
    another module owns them (Bloom adds the residual inside its attention and MLP)."""
    stream: set[str] = set()

    def source(a: fx.Node, block: int) -> fx.Node:
        while (a.op == "call_function" and a.args and isinstance(a.args[0], fx.Node)
               and (a.target in _SAME_VALUE or (
                   a.name in nodes and nodes[a.name].kind == "view"))
               and nodes[a.name].block == block):
            a = a.args[0]
        return a

    for n in gm.graph.nodes:
        info = nodes.get(n.name)
        if info is None or info.block is None or n.target not in _ADD_OPS:
            continue
        if info.module == f"{prefix}{info.block}":
            stream.add(n.name)
            info.residual = True
            continue
        for a in n.all_input_nodes:
            src = source(a, info.block)
            other = nodes.get(src.name)
            outside = src.op == "placeholder" or (other is not None
                                                  and other.block != info.block)
            if src.name in stream or (outside and _val_shape(src) == info.shape):
                stream.add(n.name)
                info.residual = True
                break


def _mark_sharded_regions(gm: fx.GraphModule, nodes: dict[str, NodeInfo], prefix: str) -> None:
    """Mark the nodes between column-parallel and row-parallel linears of each block.

    A linear is *row-parallel* when its output reaches one of its block's residual adds
    (:func:`_mark_residual_adds`) through view-like ops only, or when its input derives
    from another linear of the block; every other linear in a block is
    *column-parallel*. The sharded region is everything reachable
    from a column linear's output without passing a row linear or a residual add.
    """
    by_name = {n.name: n for n in gm.graph.nodes}

    def is_residual_add(n: fx.Node) -> bool:
        return n.name in nodes and nodes[n.name].residual

    def is_row(n: fx.Node) -> bool:
        frontier = list(n.users)
        for _ in range(6):
            nxt = []
            for u in frontier:
                if is_residual_add(u):
                    return True
                if nodes.get(u.name) and (nodes[u.name].kind == "view"
                                          or u.target == aten.dropout.default):
                    nxt.extend(u.users)
            frontier = nxt
        return False

    # a mixture of experts' sublayer (router, experts, shared experts) runs replicated
    moe = {i.module.rpartition(".")[0] for i in nodes.values() if i.kind == "experts"}
    for i in nodes.values():
        i.replicated = any(i.module == m or i.module.startswith(m + ".") for m in moe)
    linears = [by_name[i.name] for i in nodes.values()
               if i.kind == "linear" and i.block is not None and not i.replicated]
    names = {n.name for n in linears}

    def reads_linear(n: fx.Node) -> bool:
        """Whether ``n``'s input derives from another linear of its block without
        passing a residual add: the second linear of a pair (o_proj after q/k/v,
        down_proj after gate/up), even where a norm follows it (Gemma's sandwich)."""
        block = nodes[n.name].block
        seen, stack = set(), list(n.all_input_nodes)
        while stack:
            a = stack.pop()
            if a.name in seen or a.op != "call_function" or is_residual_add(a):
                continue
            seen.add(a.name)
            if a.name in names:
                return True
            info = nodes.get(a.name)
            if info is not None and info.block == block:
                stack.extend(a.all_input_nodes)
        return False

    row = {n.name for n in linears if is_row(n) or reads_linear(n)}
    for lin in linears:
        if lin.name in row:
            continue
        stack = [lin]
        while stack:
            n = stack.pop()
            info = nodes.get(n.name)
            if info is None or info.sharded or n.name in row or is_residual_add(n):
                continue
            info.sharded = True
            stack.extend(n.users)


@dataclass
class SavedBytes:
    """Bytes kept for backward, split by where they live and how they shard under TP."""

    block_replicated: int = 0  # per block (block 0 of the probe), replicated over tp
    block_sharded: int = 0  # per block, divided by tp
    rest: int = 0  # outside the blocks: embeddings, final norm, LM head, loss
    by_node: dict[str, int] = field(default_factory=dict)


def measure_saved(ag: AnnotatedGraph, batch: int, seq: int, block: int = 0,
                  frozen: bool = False, expand_kv: bool = False) -> SavedBytes:
    """Run the graph on fake CPU tensors and sum the storages autograd saves for backward.

    Each saved storage counts once (views share it) and is attributed to the node that
    produced it, or, for a tensor made inside an op (attention's intermediates), to that
    op's node; parameters and buffers are excluded (they are model states). With
    ``frozen`` only the token embedding requires grad, as the residual stream of a LoRA
    model does: blocks then save just what their input gradients need. With
    ``expand_kv`` grouped-query SDPA calls run with K/V expanded, as they do on devices
    with no fused kernel for groups (:func:`collie_compile.models.attention.expanded_sdpa`).
    """
    gm = ag.gm
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_attrs = {}
        fakes: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
        embeddings = {p for i in ag.nodes.values() if i.op == str(aten.embedding.default)
                      for p in i.params}
        for name, p in gm.named_parameters(remove_duplicate=False):
            if id(p) not in fakes:
                fakes[id(p)] = torch.empty(p.shape, dtype=p.dtype, device="cpu")
                fakes[id(p)].requires_grad_(not frozen or name in embeddings)
            fake_attrs[name] = fakes[id(p)]
        for name, b in gm.named_buffers(remove_duplicate=False):
            fake_attrs[name] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")
        state_keys = {_storage_key(t) for t in fake_attrs.values()}
        producer: dict[int, str] = {}
        running = [""]  # the node being run
        keep: list[torch.Tensor] = []  # keep storages alive so keys stay unique
        saved: dict[int, int] = {}

        class _Run(fx.Interpreter):
            def fetch_attr(self, target: str) -> object:
                if target not in fake_attrs:
                    v = super().fetch_attr(target)
                    if not isinstance(v, torch.Tensor) or v.device.type != "meta":
                        return v
                    # a tensor constant made on meta (GPT-Neo's mask value): CPU too
                    fake_attrs[target] = torch.zeros(v.shape, dtype=v.dtype, device="cpu")
                return fake_attrs[target]

            def call_function(self, target: object, args: tuple, kwargs: dict) -> object:
                # The graph was captured on meta; run it as CPU so SDPA picks a fused kernel.
                if target == aten._assert_tensor_metadata.default:
                    return None
                if target is _SET_GRAD_HOP:  # a no_grad region (older torch.export)
                    enabled, sub, *rest = args
                    with torch.set_grad_enabled(enabled):
                        return _Run(sub, garbage_collect_values=False).run(*rest)
                if expand_kv and target in _ATTENTION_OPS and kwargs.get("enable_gqa"):
                    target = expanded_sdpa
                if isinstance(kwargs.get("device"), torch.device):
                    kwargs = {**kwargs, "device": torch.device("cpu")}
                args = tuple(torch.device("cpu") if isinstance(a, torch.device) else a
                             for a in args)
                return super().call_function(target, args, kwargs)

            def run_node(self, n: fx.Node) -> object:
                running[0] = n.name
                out = super().run_node(n)
                for t in _tensors(out):
                    producer.setdefault(_storage_key(t), n.name)
                    keep.append(t)
                return out

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key not in state_keys and key not in saved:
                saved[key] = t.untyped_storage().nbytes()
                producer.setdefault(key, running[0])
                keep.append(t)
            return t

        ids = torch.zeros(batch, seq, dtype=torch.long, device="cpu")
        labels = torch.zeros(batch, seq, dtype=torch.long, device="cpu")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _Run(gm, garbage_collect_values=False).run(ids, labels)
        del mode
    out = SavedBytes()
    for key, nbytes in saved.items():
        name = producer.get(key, "")
        out.by_node[name] = out.by_node.get(name, 0) + nbytes
        info = ag.nodes.get(name)
        if info is not None and info.block == block:
            if info.sharded:
                out.block_sharded += nbytes
            else:
                out.block_replicated += nbytes
        elif info is None or info.block is None:
            out.rest += nbytes
    return out


# torch.export before 2.13 wraps no_grad regions (rotary tables) in this higher-order op,
# whose body is a submodule: run it with the same interpreter.
_SET_GRAD_HOP = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _tensors(y)]
    return []


# Ops that reduce over the feature (last) dim: their input must be whole on every rank.
_FEATURE_REDUCTIONS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.layer_norm.default, aten._softmax.default,
    aten.softmax.int, aten.amax.default, aten.var_mean.correction, aten.native_layer_norm.default,
}


def block_graph(ag: AnnotatedGraph, seq: int, block: int = 0) -> list[dict]:
    """Block ``block`` as plain data for the sharding ILP: its non-view nodes with their
    per-sample FLOPs, traffic and output bytes, and which of them feed which (through views).
    ``reads_input`` marks nodes fed the block's incoming hidden state (replicated, needing
    a gradient); other inputs from outside (masks, rotary tables) are constants."""
    gm_nodes = {n.name: n for n in ag.gm.graph.nodes}
    block_nodes = [i for i in ag.block_nodes(block) if i.shape is not None]
    hidden = str(block_nodes[-1].shape)  # the block's output: same shape as its input

    def producers(node: fx.Node) -> tuple[set[str], bool]:
        found, from_input = set(), False
        for a in node.all_input_nodes:
            info = ag.nodes.get(a.name)
            if info is None or info.block != block:
                from_input |= info is not None and str(info.shape) == hidden
                continue
            if info.kind == "view" or info.shape is None:  # tuple outputs: chunk, split
                sub, flag = producers(a)
                found |= sub
                from_input |= flag
            else:
                found.add(a.name)
        return found, from_input

    rows = []
    for info in block_nodes:
        if info.kind == "view":
            continue
        node = gm_nodes[info.name]
        itemsize = torch.tensor([], dtype=info.dtype).element_size()
        inputs, reads_input = producers(node)
        rows.append(dict(
            name=info.name, kind=info.kind, module=info.module,
            flops=ag.subs(info.flops, 1, seq), bytes=ag.subs(info.bytes, 1, seq),
            out_bytes=ag.subs(_numel(info.shape), 1, seq) * itemsize,
            inputs=sorted(inputs), reads_input=reads_input,
            residual=info.residual,
            whole_features=(node.target in _FEATURE_REDUCTIONS
                            or not info.shape or ag.subs(info.shape[-1], 1, seq) == 1),
            sharded=info.sharded, replicated=info.replicated))
    return rows
