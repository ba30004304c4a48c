"""Every document the code cites is in the repository, every cited section and equation exists, and
no comment or string names an absolute path of some machine (docs/method.md is the method text)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("tvm", "kernels", "scripts", "bench", "tests", "configs")
SUFFIXES = (".py", ".yaml", ".sh")

# A document name: anything ending in .md (file names, relative paths, absolute paths).
CITED_FILE = re.compile(r"[\w./-]*\w\.md\b")
# ``docs/NAME.md §1.4``, ``docs/NAME.md §3–§5`` or ``docs/NAME.md §2 item 3``; and ``eq. M5`` / ``eq. A1–A3``.
SECTION = re.compile(
    r"(docs/[\w-]+\.md)((?:[ ,;]*(?:§\s?[\d.]+\d|§?\d+(?:\.\d+)*)(?:[–-]§?[\d.]*\d)?"
    r"(?:\s+items?\s[\d,–\- ]+\d)?)+|(?:\s+eq\.\s+[AM]\d+(?:[–-][AM]\d+)?)+)"
)
SECTION_NUMBER = re.compile(r"§\s?(\d+(?:\.\d+)*)")
EQUATION = re.compile(r"\b([AM]\d+)\b")
# Directories that only exist on some machine; ``#!/usr/bin/env`` lines and /proc, /dev are fine.
ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:work|home|Users|root|mnt|scratch|tmp|shared|opt|data|srv)/")


def scanned_files() -> list[Path]:
    files = [p for p in ROOT.glob("*.py")]
    for top in SCANNED:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return sorted(p for p in files if p != Path(__file__).resolve())  # this file's examples are wrong on purpose


def resolve(name: str, citing: Path) -> Path | None:
    """The repository file a cited ``.md`` name means: relative to the root, to docs/, or to the citer."""
    if name.startswith("/"):
        return None
    for base in (ROOT, ROOT / "docs", citing.parent):
        if (base / name).is_file():
            return base / name
    return None


def headings(doc: Path) -> set[str]:
    """Section numbers of a Markdown file: ``## 1. Title`` → "1", ``### 1.4 Title`` → "1.4"."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if match:
            found.add(match.group(1))
    return found


def equations(doc: Path) -> set[str]:
    return set(re.findall(r"\(([AM]\d+)\)", doc.read_text(encoding="utf-8")))


def problems(text: str, citing: Path) -> list[str]:
    """What is wrong with the citations and paths of ``text`` (the content of ``citing``)."""
    where = citing.relative_to(ROOT) if citing.is_relative_to(ROOT) else citing
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#!"):
            continue
        for name in CITED_FILE.findall(line):
            if resolve(name, citing) is None:
                out.append(f"{where}:{number}: cites {name}, which is not in the repository")
        for match in SECTION.finditer(line):
            doc = resolve(match.group(1), citing)
            if doc is None:
                continue
            tail = match.group(2)
            missing = [f"§{n}" for n in SECTION_NUMBER.findall(tail) if n not in headings(doc)]
            if "eq." in tail:
                missing += [e for e in EQUATION.findall(tail) if e not in equations(doc)]
            if missing:
                out.append(f"{where}:{number}: {match.group(1)} has no {', '.join(missing)}")
        if ABSOLUTE.search(line):
            out.append(f"{where}:{number}: absolute path in {line.strip()[:80]!r}")
    return out


def test_the_checker_finds_each_kind_of_problem(tmp_path: Path) -> None:
    citing = ROOT / "tvm" / "example.py"
    text = "\n".join(
        [
            '"""See TVM.md §1.4 and /work/shared/spec/ATTENTION_JVP.md."""',  # 1: two missing files + path
            "# docs/method.md §1.4 and docs/method.md §99.1",  # 2: one missing section
            "# docs/attention_jvp.md eq. A1–A3, docs/method.md eq. M99",  # 3: one missing equation
            "#!/usr/bin/env python",  # 4: fine
            "x = open('/home/me/data.npz')",  # 5: absolute path
            "# docs/method.md §2 item 3; README.md; benchmarks.md",  # 6: fine
        ]
    )
    found = problems(text, citing)
    assert any(":1: cites TVM.md" in p for p in found)
    assert any(":1: cites /work/shared/spec/ATTENTION_JVP.md" in p for p in found)
    assert any(":1: absolute path" in p for p in found)
    assert any(":2: docs/method.md has no §99.1" in p for p in found)
    assert any(":3: docs/method.md has no M99" in p for p in found)
    assert any(":5: absolute path" in p for p in found)
    assert not any(f":{n}:" in p for p in found for n in (4, 6)), found
    assert len(found) == 6, found


@pytest.mark.parametrize("doc", ["method.md", "attention_jvp.md", "attention.md"])
def test_method_documents_are_shipped(doc: str) -> None:
    assert (ROOT / "docs" / doc).is_file()


def test_code_cites_only_documents_in_the_repository() -> None:
    found = [p for path in scanned_files() for p in problems(path.read_text(encoding="utf-8"), path)]
    assert not found, "\n".join(found)
