#!/usr/bin/env python3
"""The module graph of src/: one node per file, an edge for every
`crate::…` or `super::…` path a file names outside its tests. Prints the
edges of each file and exits 1 if any cycle exists (a file that imports,
directly or through others, a module that imports it back).

    python3 .ci/module-graph.py            # check (CI)
    python3 .ci/module-graph.py --edges    # also print every edge
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def code_outside_tests(text: str) -> str:
    # Unit tests sit in a trailing `#[cfg(test)] mod tests` block (or a
    # tests.rs file); their imports are not part of the module graph.
    cut = re.search(r"#\[cfg\(test\)\]\s*mod tests\b", text)
    text = text[: cut.start()] if cut else text
    # Doc and line comments name modules in prose.
    return re.sub(r"//[^\n]*", "", text)


def main() -> int:
    files = [p for p in SRC.rglob("*.rs") if p.name != "tests.rs"]
    modules = {module_of(p): p for p in files}
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        code = code_outside_tests(path.read_text())
        paths = set()
        # `use crate::a::{b, c::d}` and inline `crate::a::b` paths.
        for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)", code):
            paths.add(m.group(1))
        for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)::\{([^}]*)\}", code):
            for item in m.group(2).split(","):
                item = item.strip().split(" as ")[0]
                if item and item[0].islower() and item != "self":
                    paths.add(f"{m.group(1)}::{item}")
        parent = module.rsplit("::", 1)[0] if "::" in module else "crate"
        for m in re.finditer(r"\bsuper::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)", code):
            prefix = "" if parent == "crate" else parent + "::"
            paths.add(prefix + m.group(1))
        for p in paths:
            parts = p.split("::")
            # The longest prefix that is a module file.
            target = None
            for n in range(len(parts), 0, -1):
                candidate = "::".join(parts[:n])
                if candidate in modules:
                    target = candidate
                    break
            if target and target != module:
                edges[module].add(target)
    if "--edges" in sys.argv:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    # Cycles: depth-first search with colours.
    colour = {m: 0 for m in modules}
    stack = []
    cycles = []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if colour[n] == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif colour[n] == 0:
                visit(n)
        stack.pop()
        colour[m] = 2

    for m in sorted(modules):
        if colour[m] == 0:
            visit(m)
    if cycles:
        for c in cycles:
            print("cycle: " + " -> ".join(c))
        return 1
    print(f"module graph: {len(modules)} modules, {sum(len(e) for e in edges.values())} edges, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
