"""The repository's shape, checked by parsing every module's imports (README, "Files").

- util/ (the helpers) imports nothing of the project outside util/;
- the method files at the root import only each other and util/;
- no module imports a program (train_draem, test_draem, predict, export_onnx, tools/*), except that a
  benchmark may import what it measures (MEASURES);
- no import cycle, and no import of a project module hidden inside a function, a class or an `if`
  (TYPE_CHECKING), where it could dodge one.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("util", "engine", "tools")
ROOT_PROGRAMS = {"train_draem", "test_draem", "predict", "export_onnx"}
METHOD = {"model_unet", "loss", "data_loader", "perlin", "augment", "device_synthesis"}
# the training benchmark times train_draem.train_step itself
MEASURES = {("tools.bench_draem", "train_draem")}


def project_sources() -> dict[str, str]:
    """Module name -> source of every project module (the root's .py files and the packages)."""
    files = [*ROOT.glob("*.py"), *(path for package in PACKAGES for path in (ROOT / package).glob("*.py"))]
    sources = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return sources


def is_program(module: str) -> bool:
    return module in ROOT_PROGRAMS or (module.startswith("tools.") and module != "tools")


def imported_modules(node: ast.AST, modules: set[str]) -> list[str]:
    """The project modules an import statement names (`from util import x` names util.x when that is a
    module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                 for alias in node.names]
    else:
        return []
    return [name for name in names if name in modules]


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    modules, graph, found = set(sources), {}, []
    for module, source in sources.items():
        tree = ast.parse(source)
        top_level = set(map(id, tree.body))
        graph[module] = set()
        for node in ast.walk(tree):
            for target in imported_modules(node, modules):
                if id(node) not in top_level:
                    found.append(f"{module}: imports {target} inside a function, class or if")
                graph[module].add(target)
    for module, targets in graph.items():
        for target in sorted(targets):
            if module.split(".")[0] == "util" and target.split(".")[0] != "util":
                found.append(f"{module}: a helper imports {target}, outside util/")
            if module in METHOD and target.split(".")[0] != "util" and target not in METHOD:
                found.append(f"{module}: a method file imports {target}")
            if is_program(target) and (module, target) not in MEASURES:
                found.append(f"{module}: imports the program {target}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of the import graph (depth-first search)."""
    state, stack, found = {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_the_repository_keeps_its_shape():
    sources = project_sources()
    assert ({"train_draem", "model_unet", "util.errors", "engine.evaluation", "tools.calibrate"}
            <= set(sources))
    assert violations(sources) == []


def test_the_root_holds_at_most_ten_python_files():
    assert len(list(ROOT.glob("*.py"))) <= 10


def with_line(sources: dict[str, str], module: str, line: str) -> dict[str, str]:
    return {**sources, module: line + "\n" + sources[module]}


def test_the_check_catches_a_helper_importing_a_root_module():
    broken = with_line(project_sources(), "util.metrics", "import model_unet")
    assert violations(broken) == ["util.metrics: a helper imports model_unet, outside util/"]


def test_the_check_catches_a_program_importing_a_program():
    broken = with_line(project_sources(), "tools.bench_synthesis", "from train_draem import train_step")
    assert violations(broken) == ["tools.bench_synthesis: imports the program train_draem"]
    allowed = with_line(project_sources(), "tools.bench_draem", "from train_draem import train_step")
    assert violations(allowed) == []


def test_the_check_catches_a_cycle_and_an_import_hidden_to_dodge_it():
    sources = project_sources()
    assert any(line.startswith("import cycle: ") and "engine.evaluation" in line
               for line in violations(with_line(sources, "engine.evaluation",
                                                "from engine import calibration")))
    hidden = sources["engine.evaluation"] + "\n\ndef late():\n    from engine import calibration\n"
    assert "engine.evaluation: imports engine.calibration inside a function, class or if" in violations(
        {**sources, "engine.evaluation": hidden})
    guarded = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine.validation import "
               "SampleSet\n")
    assert "engine.evaluation: imports engine.validation inside a function, class or if" in violations(
        with_line(sources, "engine.evaluation", guarded))


def test_the_check_catches_a_method_file_importing_the_engine():
    broken = with_line(project_sources(), "loss", "from engine.evaluation import DraemScorer")
    assert violations(broken) == ["loss: a method file imports engine.evaluation"]


def readme_programs() -> set[tuple[str, ...]]:
    """Each program a README command runs (in code blocks and inline), as the words before its flags:
    ("train_draem.py",) or ("-m", "tools.calibrate"); the test runner itself left out."""
    found = re.findall(r"(?:python|torchrun --nproc_per_node \w+)\s+(-m\s+[\w.]*\w\b(?![<.])|[\w/]+\.py)",
                       (ROOT / "README.md").read_text())
    return {tuple(program.split()) for program in found} - {("-m", "pytest")}


def test_every_program_the_readme_shows_answers_help_from_the_repository_root(capsys):
    # In process (the root is on sys.path, as for `python -m` from the root): importing torch once, not per
    # program.
    programs = readme_programs()
    assert {("train_draem.py",), ("test_draem.py",), ("-m", "tools.calibrate")} <= programs
    for program in sorted(programs):
        module = importlib.import_module(program[1] if program[0] == "-m" else program[0].removesuffix(".py"))
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out, program
