"""Give every decoder block its own submodule again.

A captured graph is flat: block 3's ops read ``model.layers.3.self_attn.q_proj.weight``
directly. This pass moves each block's nodes into a GraphModule installed at the
block's own path (``model.layers.3``) and calls it, so parameter names are unchanged
while per-block wrappers work: FSDP2 gathers one block at a time, activation
checkpointing wraps one block, the pipeline split cuts between blocks.
"""

from __future__ import annotations

import operator

from torch import fx

from collie_compile.errors import CollieError

from .subgraph import extract, live_in, live_out


def node_block(node: fx.Node, prefix: str) -> int | None:
    """The decoder block a node belongs to (from its module stack), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path.startswith(prefix):
            head = path[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    if node.op == "call_module" and str(node.target).startswith(prefix):
        head = str(node.target)[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None
    return None


def outline_blocks(gm: fx.GraphModule, prefix: str) -> fx.GraphModule:
    """Replace the nodes of each block ``prefix + i`` by one call of a submodule at that
    path. Assumes each block's nodes are contiguous in graph order (true for captured
    decoder stacks, after :func:`_gather` moves what runs in between but does not belong)
    and that the blocks' parameters live under their path."""
    runs: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            b = node_block(n, prefix)
            if b is not None:
                runs.setdefault(b, []).append(n)
    for b, nodes in runs.items():
        calls = {k for n in nodes for k, (path, _) in (n.meta.get("nn_module_stack") or
                                                      {}).items() if path == f"{prefix}{b}"}
        if len(calls) > 1:  # export names a module's second call "path@1"
            raise CollieError(f"the model runs block {prefix}{b} {len(calls)} times a step "
                              "(looped depth, weights reused), which one submodule per block "
                              "cannot express")
        _gather(nodes)
        inside, n = set(nodes), nodes[0]
        while n is not nodes[-1]:
            n = n.next
            if n not in inside and n.op != "get_attr":
                raise CollieError(f"block {prefix}{b} is not contiguous in the captured "
                                  f"graph ({n.name} runs in between, reading the block "
                                  "and read by it)")
        path = f"{prefix}{b}"
        ins, outs = live_in(nodes), live_out(nodes)
        sub = extract(gm, nodes, ins, tuple(outs), name="Block")
        # The block module owns its parameters under their names relative to its path.
        sub = _rebase(sub, path)
        gm.get_submodule(prefix.rstrip(".")).add_module(str(b), sub)
        with gm.graph.inserting_before(nodes[0]):
            call = gm.graph.call_module(path, tuple(ins))
            call.meta["nn_module_stack"] = {path: (path, "Block")}
            for k, o in enumerate(outs):
                get = gm.graph.call_function(operator.getitem, (call, k))
                get.meta = dict(o.meta)
                o.replace_all_uses_with(get)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _op_body(gm: fx.GraphModule, target: str) -> fx.GraphModule | None:
    """The GraphModule at ``target`` if it is code only (no parameters or buffers)."""
    try:
        mod = gm.get_submodule(target)
    except AttributeError:
        return None
    if not isinstance(mod, fx.GraphModule) or any(True for _ in mod.parameters()) \
            or any(True for _ in mod.buffers()):
        return None
    return mod


def _gather(nodes: list[fx.Node]) -> None:
    """Move the nodes that run between a block's first and last node without belonging to
    it (a mask's ``arange`` built on first use, a shape assert on a block's output): one
    that reads nothing made in between goes before the block, one that nothing in
    between reads goes after it. Others stay (the block is then refused as interleaved)."""
    first, last, inside = nodes[0], nodes[-1], set(nodes)
    between: set[fx.Node] = set()  # nodes still in the span, in graph order
    n = first.next
    while n is not last:
        between.add(n)
        n = n.next
    after, n = last, first.next
    while n is not last:
        nxt = n.next
        if n not in inside and n.op != "get_attr":
            if not any(a in between or a in inside for a in n.all_input_nodes):
                first.prepend(n)
                between.discard(n)
            elif not any(u in between or u in inside for u in n.users):
                after.append(n)
                after = n
                between.discard(n)
        n = nxt


def _rebase(sub: fx.GraphModule, path: str) -> fx.GraphModule:
    """The same module with attribute targets relative to ``path``. The body of a
    higher-order op the block calls (export puts a ``torch.no_grad()`` region, such as
    a router's, in a top-level ``submod_k`` holding no weights) moves into the block."""
    root = sub
    for part in path.split("."):
        root = getattr(root, part)
    for n in sub.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            t = str(n.target)
            if not t.startswith(path + "."):
                body = _op_body(sub, t)
                if body is None:
                    raise CollieError(f"block {path} reads {t}, which lives outside it; "
                                      "blocks sharing weights are not supported")
                root.add_module(t.replace(".", "_"), body)
                t = f"{path}.{t.replace('.', '_')}"
            n.target = t[len(path) + 1:]
    return fx.GraphModule(root, sub.graph, class_name="Block")
