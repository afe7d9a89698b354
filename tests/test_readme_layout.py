"""The README's layout section matches the tree: every module of the package is listed under its
package, and every file the section names exists there."""
import re
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
_FILE = re.compile(r"(?<![\w*])([A-Za-z_]\w*\.(?:py|sh|md))\b")


def layout_sections(readme: str) -> Dict[str, str]:
    """Entry of the layout block -> its text: ``ops/``, ``spec.py`` (inside the package, indented
    two spaces) or ``/benchmarks/`` (a folder of the repository, not indented)."""
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    sections: Dict[str, List[str]] = {}
    current = None
    for line in block.splitlines():
        entry = re.match(r"^( {0,2})(\S+)", line)
        if entry and (entry.group(1) == "  " or entry.group(2).endswith("/")):
            current = entry.group(2) if entry.group(1) else "/" + entry.group(2)
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def unlisted_modules(sections: Dict[str, str], package: Path) -> List[str]:
    """Modules of ``package`` that the layout does not name (a sub-package's under its folder's entry)."""
    package_text = "\n".join(text for name, text in sections.items() if not name.startswith("/"))
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.name == "__init__.py" and len(relative.parts) > 1:
            continue  # a package is listed by its folder
        text = package_text if len(relative.parts) == 1 else sections.get(relative.parts[0] + "/", "")
        if relative.name not in text:
            missing.append(str(relative))
    return missing


def absent_files(sections: Dict[str, str], root: Path, package: Path) -> List[str]:
    """``entry: file`` for every file the layout names that is not in that entry's folder."""
    absent = []
    for name, text in sections.items():
        if name.startswith("/"):
            folder = root / name.strip("/")
        else:
            folder = package / name if name.endswith("/") else package
        absent += [f"{name}: {f}" for f in sorted(set(_FILE.findall(text))) if not any(folder.rglob(f))]
    return absent


def test_every_package_module_is_listed_under_its_package():
    sections = layout_sections((ROOT / "README.md").read_text())
    assert not unlisted_modules(sections, ROOT / "harmonizer_fast")


def test_every_file_the_layout_names_exists():
    sections = layout_sections((ROOT / "README.md").read_text())
    assert not absent_files(sections, ROOT, ROOT / "harmonizer_fast")


def test_the_checks_catch_a_missing_and_an_invented_module(tmp_path):
    package = tmp_path / "pkg"
    (package / "ops").mkdir(parents=True)
    for name in ("cli.py", "ops/pyramid.py", "ops/saliency_cut.py"):
        (package / name).write_text("")
    readme = "## Layout\n\n```\npkg/\n  ops/           pyramid.py, invented.py\n  cli.py   the CLI\n```\n"
    sections = layout_sections(readme)
    assert set(sections) == {"/pkg/", "ops/", "cli.py"}
    assert unlisted_modules(sections, package) == ["ops/saliency_cut.py"]
    assert absent_files(sections, tmp_path, package) == ["ops/: invented.py"]
