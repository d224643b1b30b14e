"""Addressing text inside JSON documents by path, so edits go back exactly where they came from."""

from __future__ import annotations

from typing import Any

from douane.interaction import JsonPath

CONTAINERS = (dict, list)


def get(doc: Any, path: JsonPath) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def set_(doc: Any, path: JsonPath, value: Any) -> None:
    get(doc, path[:-1])[path[-1]] = value


def delete(doc: Any, paths: list[JsonPath]) -> None:
    """Remove items; list indices are removed from the highest down so the others stay valid."""
    for path in sorted(paths, key=lambda p: [(isinstance(k, int), k if isinstance(k, int) else 0)
                                             for k in p], reverse=True):
        del get(doc, path[:-1])[path[-1]]


def expand(doc: Any, pattern: str) -> list[tuple[JsonPath, str]]:
    """The string values at a dotted pattern such as `messages[*].content` or `output.text`."""
    steps: list[str | int | None] = []
    for part in pattern.replace("[", ".[").split("."):
        if not part:
            continue
        if part == "[*]":
            steps.append(None)
        elif part.startswith("[") and part.endswith("]"):
            steps.append(int(part[1:-1]))
        else:
            steps.append(part)
    found: list[tuple[JsonPath, str]] = []

    def walk(node: Any, i: int, path: JsonPath) -> None:
        if i == len(steps):
            if isinstance(node, str):
                found.append((path, node))
            return
        step = steps[i]
        if step is None and isinstance(node, list):
            for j, item in enumerate(node):
                walk(item, i + 1, path + (j,))
        elif isinstance(step, int) and isinstance(node, list) and -len(node) <= step < len(node) or isinstance(step, str) and isinstance(node, dict) and step in node:
            walk(node[step], i + 1, path + (step,))

    walk(doc, 0, ())
    return found


def strings(doc: Any, path: JsonPath = ()) -> list[tuple[JsonPath, str]]:
    """Every string leaf under `doc` (tool arguments are free-form JSON)."""
    found: list[tuple[JsonPath, str]] = []
    _strings(doc, path, found)
    return found


def _strings(node: Any, path: JsonPath, found: list[tuple[JsonPath, str]]) -> None:
    # (one list for the whole walk, leaves read inline: every MCP message pays it)
    if isinstance(node, str):
        found.append((path, node))
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for k, v in items:
        if isinstance(v, str):
            found.append(((*path, k), v))
        elif isinstance(v, CONTAINERS):
            _strings(v, (*path, k), found)


def keys(doc: Any) -> list[str]:
    """Every object key under `doc`, in document order."""
    found: list[str] = []
    _keys(doc, found)
    return found


def _keys(node: Any, found: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            found.append(k)
            if isinstance(v, CONTAINERS):
                _keys(v, found)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, CONTAINERS):
                _keys(v, found)
