"""The repository as a learner meets it: docs whose references resolve, a Makefile that
explains itself, and every imported package declared."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib

import pytest

from harness.support import ROOT

TRACKED = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
MARKDOWN = [ROOT / name for name in TRACKED if name.endswith(".md")]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_resolves(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold no links
    for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"


def test_the_code_points_only_at_design_docs_that_exist():
    for name in TRACKED:
        if name.startswith("step0") and name.endswith(".py") and "design doc" in (ROOT / name).read_text():
            step = (ROOT / name).relative_to(ROOT).parts[0]
            assert (ROOT / step / "docs" / "design.md").is_file(), f"{name} mentions a design doc {step} lacks"


def make(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_make_help_lists_every_target_the_readmes_mention():
    helped = make("help").stdout
    mentioned = {target for doc in MARKDOWN for target in re.findall(r"(?:`|^)make ([a-z]+)", doc.read_text(), re.M)}
    missing = sorted(target for target in mentioned if f"make {target}" not in helped)
    assert mentioned and not missing, f"`make help` does not list: {missing}"


@pytest.mark.parametrize("step", ["", "6", "two"])
def test_make_grade_says_which_steps_exist(step):
    result = make("grade", f"STEP={step}")
    assert result.returncode != 0
    assert "STEP must be one of 1, 2, 3, 4, 5" in result.stderr + result.stdout


@pytest.mark.parametrize("target", ["exercise", "grade", "hint"])
def test_step_05_is_the_product_with_no_tasks(target):
    result = make(target, "STEP=5")
    assert "Step 05 is the product, not an exercise" in result.stdout
    assert not (ROOT / "exercises" / "step05_production").exists()


def test_every_package_the_apps_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[\[<>=!~ ]", spec)[0].lower()
        for spec in project["dependencies"] + project["optional-dependencies"]["local"]
    }
    distributions = importlib.metadata.packages_distributions()
    for name in TRACKED:
        if not re.match(r"(step0\d_\w+|local_llm)/.*\.py$", name):
            continue
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top.startswith(("step0", "local_llm")):
                    continue
                owners = {d.lower() for d in distributions.get(top, [])}
                assert owners & declared, (
                    f"{name} imports {top} ({owners or 'not installed'}), not a declared dependency"
                )


def test_step01_comments_and_readme_number_the_loop_alike():
    code = (ROOT / "step01_echo_ws" / "main.py").read_text().splitlines()
    readme = (ROOT / "step01_echo_ws" / "README.md").read_text()
    section = readme.split("## What the handler does")[1].split("\n## ")[0]
    items = dict(re.findall(r"^(\d)\. (.*)", section, re.M))
    numbered = {m[1]: line for line in code if (m := re.search(r"# (\d)\. ", line))}
    assert sorted(items) == sorted(numbered) == ["1", "2", "3"]
    # An item that quotes code (the exercise's TODOs are not quoted, so 2 and 3 are prose)
    # quotes the line that carries its number.
    for number, text in items.items():
        if snippet := re.match(r"`([^`]+)`", text):
            first_call = re.search(r"(await )?[\w.]+\(|except \w+|while True", snippet[1])[0]
            assert first_call in numbered[number], f"README item {number} ({snippet[1]}) is not on line {number}"
