"""Imports point one way: protocol < hypervisor < helper < toolstack < bench,
and inside the toolstack from the CLI and the daemon down to the policies.

Only module-level imports count: a function may reach up when it runs (the
`ferry bench` command loads bench/ that way), a module may not at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["protocol", "hypervisor", "helper", "toolstack", "bench"]
# what each toolstack subpackage may import from its siblings
TOOLSTACK = {
    "policies": set(),
    "host": {"policies"},
    "migration": {"host", "policies"},
    "daemon": {"host", "migration", "policies"},
    "cli": set(),  # a client: it speaks the control API, it does not run jobs
    "harness": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path) -> list[str]:
    """Absolute names of what a module imports when it is imported."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = []

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                names.append(target)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def project_modules():
    for layer in [*LAYERS, "codegen"]:
        yield from sorted((ROOT / layer).rglob("*.py"))


def test_packages_import_only_from_below():
    wrong = []
    for path in project_modules():
        own = module_name(path).split(".")[0]
        for name in top_level_imports(path):
            other = name.split(".")[0]
            if other == own or other not in [*LAYERS, "codegen"]:
                continue
            if own == "codegen" or other == "codegen" or LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{module_name(path)} imports {name}")
    assert not wrong, "imports pointing up: " + "; ".join(wrong)


def test_toolstack_subpackages_import_only_from_below():
    wrong = []
    for path in sorted((ROOT / "toolstack").rglob("*.py")):
        parts = module_name(path).split(".")
        if len(parts) < 2 or parts[1] not in TOOLSTACK:
            continue
        own = parts[1]
        for name in top_level_imports(path):
            target = name.split(".")
            if target[0] != "toolstack" or len(target) < 2 or target[1] == own:
                continue
            if target[1] not in TOOLSTACK[own]:
                wrong.append(f"{module_name(path)} imports {name}")
    assert not wrong, "; ".join(wrong)


def test_the_toolstack_reaches_bench_only_when_the_command_runs():
    for path in sorted((ROOT / "toolstack").rglob("*.py")):
        assert not [n for n in top_level_imports(path) if n.split(".")[0] == "bench"], path


def test_the_command_line_starts_without_the_heavy_modules():
    """Every `ferry` command pays its imports: the control API needs neither
    numpy (the stream layers) nor trio (the daemon) nor the policies."""
    probe = "import sys, toolstack.cli.main; print(sorted(set(sys.modules) & HEAVY))"
    heavy = {"numpy", "trio", "toolstack.policies", "protocol.libxc", "hypervisor.memory"}
    r = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {heavy!r}\n{probe}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    from toolstack import Decision, Policy  # still there for policy authors, loaded on use

    assert Policy.__name__ == "Policy" and Decision.__name__ == "PrecopyDecision"


def test_the_layout_test_sees_an_upward_import(tmp_path):
    """The checker itself: a relative import that climbs is resolved and caught."""
    fake = ROOT / "toolstack" / "policies" / "_layout_probe.py"
    try:
        fake.write_text("from ..host import Job\nfrom bench import report\n")
        names = top_level_imports(fake)
        assert names == ["toolstack.host", "bench"]
    finally:
        fake.unlink()
