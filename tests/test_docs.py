"""The documentation: the site builds strictly, its links and the paths it names resolve, its examples run.

A runnable example is a fenced ```bash or ```python block right after a `<!-- runnable -->` line, in README.md or
a page under docs/. The blocks of one page run in order, in one temporary folder holding `a.jpg` and `b.jpg` (two
photos of one AT&T person) and `photos/PERSON/*.jpg` (five AT&T people), with this checkout's siamkit. Every
`siamkit train` in them runs SIAMKIT_DOCS_STEPS steps: 5 unless that variable says otherwise ("full": the
examples as written).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = "<!-- runnable -->"
DOCS_STEPS = os.environ.get("SIAMKIT_DOCS_STEPS", "5")
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "experiments" / "README.md",
         *sorted((REPO / "docs").rglob("*.md"))]


class Example(NamedTuple):
    language: str
    code: str
    line: int


def runnable_examples(path: Path) -> list[Example]:
    """The runnable blocks of a Markdown file, in order; a marker not followed by a bash/python fence is an error."""
    lines = path.read_text().splitlines()
    examples = []
    for i, line in enumerate(lines):
        if line.strip() != RUNNABLE:
            continue
        fence = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        language = lines[fence].strip()[3:] if fence is not None and lines[fence].startswith("```") else ""
        if language not in ("bash", "python"):
            raise ValueError(f"{path.name}:{i + 1}: {RUNNABLE} must be followed by a ```bash or ```python block")
        end = next(j for j in range(fence + 1, len(lines)) if lines[j].startswith("```"))
        examples.append(Example(language, "\n".join(lines[fence + 1:end]) + "\n", fence + 1))
    return examples


def with_steps(code: str, steps: str) -> str:
    """Every `siamkit train` of a shell block made to run `steps` steps (its own --steps replaced, or one added)."""
    if steps == "full":
        return code
    out = []
    for line in code.splitlines():
        if re.search(r"\bsiamkit train\b", line):
            line, n = re.subn(r"--steps[ =]\d+", f"--steps {steps}", line)
            if not n:
                line = re.sub(r"\bsiamkit train\b", f"siamkit train --steps {steps}", line, count=1)
        out.append(line)
    return "\n".join(out) + "\n"


def test_with_steps_replaces_or_adds_the_step_count():
    code = "siamkit train --data x --steps 300 --out r  # note\npython -m siamkit train --out r\nsiamkit verify r a b\n"
    assert with_steps(code, "5") == ("siamkit train --data x --steps 5 --out r  # note\n"
                                     "python -m siamkit train --steps 5 --out r\nsiamkit verify r a b\n")
    assert with_steps(code, "full") == code


def _pages_with_examples() -> list[Path]:
    return [p for p in PAGES if runnable_examples(p)]


def test_the_readme_has_runnable_examples():
    # the examples test below runs what is marked; a README with nothing marked would leave it testing nothing
    kinds = {e.language for e in runnable_examples(REPO / "README.md")}
    assert kinds == {"bash", "python"}


@pytest.fixture()
def example_folder(tmp_path: Path, att_faces: Path) -> Path:
    """The files the runnable examples name: a.jpg, b.jpg and photos/PERSON/*.jpg, from the AT&T faces."""
    Image.open(att_faces / "s1" / "1.pgm").save(tmp_path / "a.jpg")
    Image.open(att_faces / "s1" / "2.pgm").save(tmp_path / "b.jpg")
    for person in ("s1", "s2", "s3", "s4", "s5"):
        (tmp_path / "photos" / person).mkdir(parents=True)
        for src in sorted((att_faces / person).glob("*.pgm")):
            Image.open(src).save(tmp_path / "photos" / person / f"{src.stem}.jpg")
    return tmp_path


@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_examples_run(page: Path, example_folder: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"),  # this checkout's siamkit, also for the `siamkit` command
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for example in runnable_examples(page):
        if example.language == "bash":
            command = ["bash", "-euo", "pipefail", "-c", with_steps(example.code, DOCS_STEPS)]
        else:
            command = [sys.executable, "-c", example.code]
        done = subprocess.run(command, cwd=example_folder, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (f"{page.name}:{example.line}: the example failed (exit {done.returncode})\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation site, built with `mkdocs build --strict` (a warning, e.g. a broken link, fails it)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    return out


def test_the_site_builds_strictly_with_every_page(site: Path):
    for page in (REPO / "docs").rglob("*.md"):
        relative = page.relative_to(REPO / "docs").with_suffix("")
        built = site / ("index.html" if relative.name == "index" else relative / "index.html")
        assert built.is_file(), f"{page} was not built"


def test_the_cli_reference_lists_every_option_and_the_recipe(site: Path):
    from siamkit.config import RECIPES, TrainConfig

    html = (site / "reference" / "cli" / "index.html").read_text()
    assert "cli-reference" not in html  # the marker was replaced by the generated reference
    for command in ("train", "evaluate", "verify", "embed", "align", "export", "enroll", "identify"):
        assert f"siamkit {command}</h2>" in html or f"siamkit {command}<a" in html, command
    # independent of the generator's path through argparse: the declared fields themselves
    for field in dataclasses.fields(TrainConfig):
        if field.metadata.get("cli", True):
            flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
            assert flag in html, flag
    assert RECIPES["faces"]["backbone"] in html


def _links(text: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [REPO / "README.md", REPO / "benchmarks" / "README.md",
                                  REPO / "experiments" / "README.md"], ids=["README", "benchmarks", "experiments"])
def test_relative_links_of_the_readmes_exist(page: Path):
    links = [link.split("#")[0] for link in _links(page.read_text()) if not re.match(r"[a-z]+:|#", link)]
    assert links
    missing = [link for link in links if not (page.parent / link).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_repository_paths_named_in_the_docs_exist():
    """`src/...`, `tests/...`, `benchmarks/...`, `experiments/...` and `docs/...` named in code spans point at files
    that exist."""
    missing = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # code blocks are checked by running
        for span in re.findall(r"`([^`]+)`", text):
            for path in re.findall(r"(?<![\w/.$-])((?:src|tests|benchmarks|experiments|docs)/[\w./-]*\w)", span):
                if not (REPO / path).exists():
                    missing.append(f"{page.relative_to(REPO)}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
