"""Write editor-format (UI) workflows from a few lines of Python, laying the nodes out left to right.

``devtools/examples/`` describes every example workflow with a :class:`Builder`;
``scripts/build_workflows.py`` writes them to ``example_workflows/``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from ..workflows import extra_widget_values, input_spec, is_widget, ordered_inputs


class Output(tuple):
    """(node id, output slot): what a Builder node's output is wired with."""


class Builder:
    """Write UI-format workflows in Python.

    >>> wf = Builder(info)
    >>> ckpt = wf.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    >>> wf.add("PatchLab_ModelSamplingDiscrete", model=ckpt[0], sampling="eps", zsnr=False)

    ``info`` maps node types to their object_info entries. Inputs given a value are
    widgets (missing ones take their default); inputs given an :class:`Output` are links.
    """

    def __init__(self, object_info: Dict[str, Dict]):
        self.info = object_info
        self.nodes: List[Dict] = []
        self.links: List[List] = []
        self.notes: List[Tuple[str, str]] = []

    def add(self, kind: str, **values: Any) -> NodeRef:
        info = self.info[kind]
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": kind, "inputs": [], "outputs": [], "widgets_values": [],
                "properties": {"Node name for S&R": kind}, "flags": {}, "mode": 0, "_depth": 0}
        unknown = set(values) - set(ordered_inputs(info))
        if unknown:
            raise KeyError(f"{kind} has no input(s) {sorted(unknown)}")
        for name in ordered_inputs(info):
            input_kind, options = input_spec(info, name)
            value = values.get(name)
            if isinstance(value, Output):
                self._link(value, node, name, input_kind)
            elif is_widget(input_kind, options):
                node["widgets_values"].append(_widget_value(name, input_kind, options, value))
                if extra_widget_values(name, input_kind, options):
                    node["widgets_values"].append("fixed" if input_kind == "INT" else "image")
            elif value is not None:
                raise TypeError(f"{kind}.{name} is a {input_kind} input; wire it to an output")
        for slot, (out_kind, out_name) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            node["outputs"].append({"name": out_name, "type": out_kind, "links": [], "slot_index": slot})
        self.nodes.append(node)
        return NodeRef(node_id)

    def note(self, title: str, text: str) -> None:
        """A Note node (documentation shown in the editor; ignored when queued)."""
        self.notes.append((title, text))

    def _link(self, source: Output, node: Dict, name: str, kind: Any) -> None:
        from_id, from_slot = source
        link_id = len(self.links) + 1
        origin = self.nodes[from_id - 1]
        link_type = origin["outputs"][from_slot]["type"]
        self.links.append([link_id, from_id, from_slot, node["id"], len(node["inputs"]), link_type])
        origin["outputs"][from_slot]["links"].append(link_id)
        node["inputs"].append({"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": link_id})
        node["_depth"] = max(node["_depth"], origin["_depth"] + 1)

    def to_ui(self) -> Dict:
        """The workflow in the editor's format (version 0.4), nodes laid out by depth."""
        columns: Dict[int, int] = {}
        nodes = []
        for order, node in enumerate(self.nodes):
            node = dict(node)
            depth = node.pop("_depth")
            row = columns.get(depth, 0)
            height = 46 + 26 * (len(node["widgets_values"]) + max(len(node["inputs"]), len(node["outputs"])))
            node["pos"] = [40 + 360 * depth, 40 + row]
            node["size"] = [320, height]
            node["order"] = order
            columns[depth] = row + height + 60
            nodes.append(node)
        for index, (title, text) in enumerate(self.notes):
            nodes.append({"id": len(self.nodes) + index + 1, "type": "Note", "pos": [40 + 380 * index, -260],
                          "size": [360, 220], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
                          "outputs": [], "properties": {}, "widgets_values": [text], "title": title,
                          "color": "#432", "bgcolor": "#653"})
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


class NodeRef(int):
    """A node id; ``ref[i]`` is its i-th output."""

    def __getitem__(self, slot: int) -> Output:
        return Output((int(self), slot))


def _widget_value(name: str, kind: Any, options: Dict, value: Any) -> Any:
    if value is not None:
        return value
    if "default" in options:
        return options["default"]
    if isinstance(kind, list) and kind:
        return kind[0]
    if kind == "COMBO" and options.get("options"):
        return options["options"][0]
    raise ValueError(f"input {name!r} needs a value (it has no default)")
