"""YAML text -> a tree of small nodes that remember their line, through libyaml when installed.

The config parser needs every value's line for its messages, so it works on nodes, not on
constructed Python objects. ``yaml.compose`` builds them too, but in pure Python (an explicit
per-tensor mapping of 50 MB took minutes and gigabytes) and, with libyaml, as full ``yaml.Node``
objects with two marks each. This composer reads libyaml's events and keeps, per node, its tag,
value and line: the same tree shape as ``yaml.compose`` (anchors and aliases resolved, one
document), a fraction of the memory. Without libyaml it reads PyYAML's pure-Python events.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

import yaml
from yaml.composer import ComposerError

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NULL_TAG = "tag:yaml.org,2002:null"
STR_TAG = "tag:yaml.org,2002:str"
SEQ_TAG = "tag:yaml.org,2002:seq"
MAP_TAG = "tag:yaml.org,2002:map"
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))  # YAML 1.1's implicit nulls (PyYAML's resolver)


class Node:
    __slots__ = ("tag", "value", "line")

    def __init__(self, tag: str, value, line: int):
        self.tag = tag
        self.value = value  # str; a list of nodes; a list of (key node, value node)
        self.line = line  # 0-based, as yaml marks count


class Scalar(Node):
    __slots__ = ()


class Sequence(Node):
    __slots__ = ()


class Mapping(Node):
    __slots__ = ()


@contextmanager
def no_gc():
    """Millions of small nodes, none of them garbage: the cyclic collector would rescan them all."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compose(text: str) -> Node | None:
    """The single document of ``text`` as nodes (None when empty); raises yaml.YAMLError subclasses
    (with marks where the parser has them) like ``yaml.compose``."""
    loader = LOADER(text)
    try:
        loader.get_event()  # StreamStartEvent
        if loader.check_event(yaml.StreamEndEvent):
            return None
        loader.get_event()  # DocumentStartEvent
        root = _document(loader)
        loader.get_event()  # DocumentEndEvent
        if not loader.check_event(yaml.StreamEndEvent):
            extra = loader.get_event()
            raise ComposerError(None, None, "expected a single document, but found another", extra.start_mark)
        return root
    finally:
        loader.dispose()


def _document(loader) -> Node:
    # One pass over the events, written for speed: a 50 MB mapping is 2 million of them.
    anchors: dict[str, Node] = {}
    stack: list[list] = []  # [collection node, pending mapping key or None]
    get_event = loader.get_event
    scalar_event, alias_event = yaml.ScalarEvent, yaml.AliasEvent
    seq_start, map_start = yaml.SequenceStartEvent, yaml.MappingStartEvent
    ends = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    nulls, no_tag = _NULLS, (None, "!")
    while True:
        event = get_event()
        kind = type(event)
        if kind is scalar_event:
            tag = event.tag
            if tag in no_tag:
                tag = NULL_TAG if event.implicit[0] and event.value in nulls else STR_TAG
            node = Scalar(tag, event.value, event.start_mark.line)
            if event.anchor is not None:
                _anchor(anchors, event, node)
        elif kind in ends:
            node = stack.pop()[0]
        elif kind is alias_event:
            node = anchors.get(event.anchor)
            if node is None:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
        else:
            line = event.start_mark.line
            if kind is seq_start:
                node = Sequence(event.tag or SEQ_TAG, [], line)
            elif kind is map_start:
                node = Mapping(event.tag or MAP_TAG, [], line)
            else:
                raise ComposerError(None, None, f"unexpected {kind.__name__}", event.start_mark)
            if event.anchor is not None:
                _anchor(anchors, event, node)
            stack.append([node, None])
            continue
        if not stack:
            return node
        top = stack[-1]
        parent = top[0]
        if type(parent) is Sequence:
            parent.value.append(node)
        elif top[1] is None:
            top[1] = node
        else:
            parent.value.append((top[1], node))
            top[1] = None


def _anchor(anchors: dict, event, node: Node) -> None:
    if event.anchor in anchors:
        raise ComposerError(None, None, f"found duplicate anchor {event.anchor!r}", event.start_mark)
    anchors[event.anchor] = node
