"""The layering of docs/architecture.md, checked on the source: which package may import which,
stages that do not import stages, one definition per convention, no citation of documents outside
the repository. Every import counts, also those inside functions."""
from __future__ import annotations

import ast
import os
import re
import subprocess
from collections import defaultdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("schemas", "pipeline", "trainer", "bench")
STAGES = ("train_dit", "fit_decoder", "sample", "reconstruct", "rfid", "evaluate", "interop")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, pkg)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


MODULES = _modules()


def _imports(path: str) -> set[str]:
    """Project modules a file imports anywhere in it (``from a import b`` counts as ``a.b`` when
    ``a.b`` is a module, else as ``a``)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m.split(".")[0] in PACKAGES}


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _violations(src_pred, dst_pred) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, deps in IMPORTS.items() if src_pred(src)
                  for dst in deps if dst_pred(dst))


def _in(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_project_is_seen():
    assert {"pipeline.encode", "pipeline.store", "pipeline.cli", "trainer.sample", "schemas.store_v1"} <= set(MODULES)
    assert "trainer.train_dit" in IMPORTS["pipeline.cli.train"]  # imports inside functions count


def test_schemas_import_nothing_above_them():
    assert _violations(lambda s: _in(s, "schemas"), lambda d: _in(d, "pipeline", "trainer", "bench")) == []


def test_pipeline_library_never_imports_trainer_or_the_commands():
    library = lambda s: _in(s, "pipeline") and not _in(s, "pipeline.cli")  # noqa: E731
    assert _violations(library, lambda d: _in(d, "trainer", "bench", "pipeline.cli")) == []


def test_trainer_never_imports_the_commands_or_bench():
    assert _violations(lambda s: _in(s, "trainer"), lambda d: _in(d, "pipeline.cli", "bench")) == []


def test_no_stage_imports_another_stage():
    stages = {f"trainer.{s}" for s in STAGES}
    assert stages <= set(MODULES)
    bad = [f"{src} imports {dst}" for src in stages for dst in IMPORTS[src] if dst in stages and dst != src]
    assert bad == []


def _definitions() -> dict[str, list[str]]:
    found = defaultdict(list)
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found[node.name].append(name)
    return found


@pytest.mark.parametrize("name", [
    "shift_alpha", "checkpoint_shift_alpha", "sincos_pos_embed_2d", "read_state_dict", "to_uint8",
    "SourceFetcher", "encoder_mismatch", "load_dit", "load_decoder", "UserError",
])
def test_one_home_per_convention(name):
    assert len(_definitions()[name]) == 1, f"{name} is defined in {_definitions()[name]}"


def test_decode_latents_is_not_a_name_of_two_things():
    assert len(_definitions()["decode_latents"]) <= 1


def _tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if f]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in files if f.endswith((".py", ".md", ".toml", ".json", ".txt", ".cfg", ".yaml", ".yml"))
            or os.path.basename(f) in ("Makefile", "run")]


# A document cited by a path that leaves the repository: a parent-relative .md path, the team folder up one level, or an absolute
# path under a home or work folder. Data paths in examples (/data/imagenet, s3://...) are fine.
_OUTSIDE = re.compile(r"(?:\.\./)+[\w./-]*\.(?:md|rst|txt|pdf)\b|\.\./shared\b|(?<![\w:/.])/(?:work|home|root|Users)/[\w./-]+")


def test_no_tracked_file_cites_a_document_outside_the_repository():
    hits = []
    for rel in _tracked_text_files():
        path = os.path.join(REPO, rel)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if _OUTSIDE.search(line):
                    hits.append(f"{rel}:{lineno}: {line.strip()[:120]}")
    assert hits == []


def test_outside_citation_pattern():
    up = "../"  # built here so that this file does not cite anything itself
    assert _OUTSIDE.search(f"see {up}shared/docs/rae-reference.md")
    assert _OUTSIDE.search(f"(`{up}docs/x.md`)")
    assert _OUTSIDE.search("Project root: /" + "work/main")
    assert not _OUTSIDE.search("--data /data/imagenet --out s3://bucket/stores")
    assert not _OUTSIDE.search("see docs/checkpoint-format.md")
