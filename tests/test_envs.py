"""Every rule's conda env lists what its script imports (for `--sdm conda` runs).

Read from the sources with `ast`, nothing imported: a script's own imports, and for each
n6qat module it reaches, the imports that run when the module is imported plus those inside
the functions and classes the script (or a function it reaches) uses by name.
"""

import ast
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "workflow/rules"
SRC = ROOT / "src"

# conda-forge names of PyPI distributions, and conda packages that are no Python package
CONDA_TO_PYPI = {"pysoundfile": "soundfile", "soxr-python": "soxr"}
NOT_PYTHON = {"python", "pip", "libsndfile"}


def rule_blocks() -> dict[str, dict[str, str]]:
    """Each rule's `conda:` and `script:` paths, from the workflow as Snakemake parses it.

    It is parsed twice, with the default config and with a user checkpoint (`model.pretrained`),
    since some rules exist only with one (prepare_pretrained). A rule made in a loop
    (report.smk's table) names its script by its own name at run time
    (`../scripts/<rule>.py`); every other script path is a constant of the rule.
    """
    import tempfile
    import zipfile

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    rules: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config").symlink_to(ROOT / "config")
        with zipfile.ZipFile(Path(tmp) / "user.keras", "w") as archive:  # parsing checks
            archive.writestr("config.json", "{}")  # that it is a .keras zip, nothing more
        for overrides in ({}, {"model": {"pretrained": "user.keras"}}):
            with SnakemakeApi(OutputSettings()) as api:
                workflow = api.workflow(
                    resource_settings=ResourceSettings(), snakefile=ROOT / "Snakefile",
                    workdir=Path(tmp), config_settings=ConfigSettings(config=overrides),
                )._workflow  # fmt: skip
                for rule in workflow.rules:
                    found = {"conda": rule.conda_env} if rule.conda_env else {}
                    if rule.is_script:
                        constants = [c for c in rule.run_func.__code__.co_consts
                                     if isinstance(c, str) and c.startswith("..")
                                     and c.endswith(".py")]  # fmt: skip
                        found["script"] = (constants[0] if constants
                                           else f"../scripts/{rule.name}.py")  # fmt: skip
                    rules[rule.name] = found
    return rules


def env_distributions(env_file: Path) -> set[str]:
    """Normalised PyPI names of the packages an env lists (conda and pip entries).

    What a listed package happens to pull in does not count: a module the code imports
    must be listed itself, or a change in someone else's requirements breaks the env.
    """
    listed = set()
    for entry in yaml.safe_load(env_file.read_text())["dependencies"]:
        for spec in entry["pip"] if isinstance(entry, dict) else [entry]:
            name = re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0]
            if name not in NOT_PYTHON:
                listed.add(normalise(CONDA_TO_PYPI.get(name, name)))
    return listed


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------- imports from the sources

Import = tuple[str, str, str]  # (module, imported name or "", name bound here)


def _is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(node: ast.AST, deep: bool) -> list[Import]:
    """The import statements under `node`, skipping `if TYPE_CHECKING:` blocks; nested
    functions and classes (their bodies run only when used) only when `deep`."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            found += [(alias.name, "", alias.asname or alias.name) for alias in child.names]
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            found += [(child.module, a.name, a.asname or a.name) for a in child.names]
        elif _is_type_checking(child):
            continue
        elif deep or not isinstance(child, ast.FunctionDef | ast.ClassDef):
            found += _imports(child, deep)
    return found


@cache
def _module(name: str) -> ast.Module | None:
    path = SRC / Path(*name.split(".")).with_suffix(".py")
    return ast.parse(path.read_text()) if path.is_file() else None


def _used_names(nodes: list[ast.AST]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def third_party_imports(script: Path) -> set[str]:
    """Top-level names of the non-stdlib, non-n6qat modules the script may import.

    The script runs all its imports; an n6qat module runs its module-level imports; a
    function or class adds its own imports and whatever it uses by name (a function of its
    module or a name the module imported from n6qat).
    """
    found: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = []  # (n6qat module, "" for the module itself, or a name)

    def add(imports: list[Import], follow_names: bool) -> None:
        for module, name, _ in imports:
            top = module.split(".")[0]
            if top == "n6qat":
                todo.append((module, ""))
                if name and _module(f"{module}.{name}"):  # from n6qat import dataset
                    todo.append((f"{module}.{name}", ""))
                elif name and follow_names:
                    todo.append((module, name))
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)

    add(_imports(ast.parse(script.read_text()), deep=True), follow_names=True)
    while todo:
        item = todo.pop()
        module, name = item
        tree = _module(module)
        if item in seen or tree is None:
            continue
        seen.add(item)
        definitions = {
            n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)
        }
        bound = {binding: (m, n) for m, n, binding in _imports(tree, deep=False) if n}
        if name:
            if name not in definitions:
                continue
            used = [definitions[name]]
            add(_imports(definitions[name], deep=True), follow_names=True)
        else:
            add(_imports(tree, deep=False), follow_names=False)
            used = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
        names = _used_names(used)
        todo += [(module, n) for n in names & set(definitions)]
        todo += [bound[n] for n in names & set(bound) if bound[n][0].startswith("n6qat")]
    return found


@cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distribution_of(top_level: str) -> str:
    """The PyPI distribution that provides an importable top-level name (installed here)."""
    (name, *_) = _distributions().get(top_level, [top_level])
    return normalise(name)


SCRIPTED = {name: rule for name, rule in rule_blocks().items() if "script" in rule}


def test_the_rule_files_were_read():
    assert {"index_dataset", "qat", "evaluate_summary", "report_config"} <= set(SCRIPTED)
    assert all("conda" in rule for rule in SCRIPTED.values()), "a rule names no conda env"


def test_the_import_scan_follows_the_package():
    """evaluate_summary reaches soundfile and soxr only through n6qat.dataset -> n6qat.audio."""
    script = ROOT / "workflow/scripts/evaluate_summary.py"
    assert {"numpy", "pandas", "tqdm", "soundfile", "soxr"} <= third_party_imports(script)
    assert "tensorflow" not in third_party_imports(script)  # only n6qat.model's unused parts


def test_an_env_without_the_audio_libraries_is_caught(tmp_path):
    """The report env as it was: evaluate_summary's n6qat.dataset needs tqdm, soundfile, soxr."""
    env = tmp_path / "report.yaml"
    env.write_text(
        "dependencies:\n  - python=3.11\n  - numpy>=1.26\n  - pandas>=2.2\n  - pyyaml\n  - pip\n"
        "  - pip:\n      - keras>=3.10\n"
    )
    script = ROOT / "workflow/scripts/evaluate_summary.py"
    needed = {distribution_of(name) for name in third_party_imports(script)}
    assert needed - env_distributions(env) == {"tqdm", "soundfile", "soxr"}


@pytest.mark.parametrize("rule", sorted(SCRIPTED))
def test_the_rule_env_lists_what_its_script_imports(rule):
    env = (RULES / SCRIPTED[rule]["conda"]).resolve()
    script = (RULES / SCRIPTED[rule]["script"]).resolve()
    needed = {distribution_of(name) for name in third_party_imports(script)}
    missing = sorted(needed - env_distributions(env))
    assert not missing, f"{env.name} lacks {missing}, imported by {script.name} (rule {rule})"
