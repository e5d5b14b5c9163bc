"""YAML text read with bounds, for configs and for any YAML a user or a run folder supplies.

The safe loader only; on top of it, these are refused with their line: a document whose anchors
and aliases would expand it past MAX_VALUES values (a "billion laughs" file is a dozen lines), an
alias that refers to the node holding it, a key given twice in one mapping (PyYAML keeps the last),
text with a lone surrogate (an escape such as "\\ud800": no tokenizer or file takes it), and nesting
deeper than MAX_DEPTH levels. A value the safe loader cannot build (`2001-02-30`, `!!int abc`)
is refused without a line. All as `Refused`, a `yaml.YAMLError`, so callers catch one kind. Code that
walks a loaded value (flattening keys, checking every path in a list) then does work in proportion to
the text, never exponential in it.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 100_000   # scalars, lists and mappings once aliases are expanded; a project.yaml has ~100
# Lists and mappings inside one another, as written (a project.yaml nests 4); as deep as data rows may nest
# (data/io.py). PyYAML's pure-Python scanner does work in proportion to the depth for every token, so a
# 400 KB `[[[[...` took minutes to refuse when the bound was Python's recursion limit.
MAX_DEPTH = 64


class Refused(yaml.YAMLError):
    """A document refused as above (problem and problem_mark as PyYAML's own errors carry them)."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None, hint: str = "write the values out") -> None:
        super().__init__(problem)
        self.problem, self.problem_mark, self.hint = problem, mark, hint


def load(text: str) -> tuple[yaml.Node | None, Any]:
    """(the composed node tree, for line numbers; the value) of one YAML document, refused as above."""
    try:
        root = yaml.compose(text, Loader=_BoundedLoader)
        if root is None:
            return None, None
        expanded_size(root)
        # The value from a second parse: building it from `root` would rewrite merge keys (<<) in the
        # tree the caller reads line numbers from.
        return root, yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader, bounded)
    except RecursionError:  # constructing values through chains of aliases
        raise Refused("the document nests too deeply", None, "nest fewer levels") from None
    except (ValueError, OverflowError) as e:  # a date, number or tag the safe loader cannot build
        raise Refused(f"a value YAML cannot build ({e})", hint="quote it to keep it as text") from None


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing a list or mapping opened MAX_DEPTH levels deep at the line that opens it
    (before the scanner reads further)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH and self.check_event(yaml.CollectionStartEvent):
            raise Refused(f"the document nests deeper than {MAX_DEPTH} levels", self.peek_event().start_mark,
                          "nest fewer levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_load(text: str) -> Any:
    """The value of one YAML document (yaml.safe_load with the bounds above)."""
    return load(text)[1]


def expanded_size(root: yaml.Node) -> int:
    """How many values `root` holds with every alias expanded, computed without expanding (each node
    is counted once and its count reused); Refused past MAX_VALUES, on a node that holds itself, or on
    a mapping that gives one key twice."""
    counted: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in counted:
            return counted[id(node)]
        if id(node) in open_nodes:
            raise Refused("an alias refers to the node that holds it", node.start_mark)
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            _unique_keys(node)
        elif isinstance(node, yaml.ScalarNode):
            _valid_unicode(node)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_VALUES:
                raise Refused(f"anchors and aliases expand the document past {MAX_VALUES:,} values",
                              node.start_mark, "write the repeated values out, or use fewer aliases")
        open_nodes.discard(id(node))
        counted[id(node)] = total
        return total

    try:
        return size(root)
    except RecursionError:
        raise Refused("the document nests too deeply", root.start_mark, "nest fewer levels") from None


def _valid_unicode(node: yaml.ScalarNode) -> None:
    """Refused for a lone surrogate (`"\\ud800"` is a valid YAML escape): no tokenizer or file takes it."""
    try:
        node.value.encode("utf-8")
    except UnicodeEncodeError as e:
        escape = f"\\u{ord(node.value[e.start]):04x}"
        raise Refused(f"text that is not valid Unicode (a lone surrogate, escaped as {escape})", node.start_mark,
                      "remove the escape") from None


def _unique_keys(node: yaml.MappingNode) -> None:
    """Refused at the second of two equal keys: PyYAML keeps the last silently, and a setting written
    twice (an edit that left the old line) would be read from the line a reader does not expect."""
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            if key.value in seen:
                raise Refused(f"the key '{key.value[:80]}' is given twice (first on line {seen[key.value] + 1})",
                              key.start_mark, "keep one of them")
            seen[key.value] = key.start_mark.line
