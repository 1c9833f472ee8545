"""Layering: model code never imports training code, and the used-by paths (inference, chat, eval, export, the
checkpoint layout) load a model without the training package, deepspeed or peft."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rice_mllm"
MODEL_CODE = [
    *sorted((PACKAGE / "vision").glob("*.py")),
    *sorted((PACKAGE / "mllm").glob("*.py")),
    *sorted((PACKAGE / "pretrain").glob("*.py")),
    PACKAGE / "loading.py",
]
USED_BY = ["inference", "chat", "eval", "export", "checkpoint_layout"]
FORBIDDEN = ("deepspeed", "peft", "bitsandbytes", "rice_mllm.train")


def _imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of every module a source file imports; `package` is the file's own package."""
    names = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{parent}.{node.module}" if node.module else parent)
            else:
                names.append(node.module)
    return names


def _offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in paths
        for name in _imported_modules(path.read_text(), ".".join(path.relative_to(PACKAGE.parent).parts[:-1]))
        if name.split(".")[0] in forbidden or name.startswith(forbidden)
    ]


def test_model_code_imports_no_training_code():
    assert all(path.exists() for path in MODEL_CODE)
    assert not _offenders(MODEL_CODE, FORBIDDEN)


def _used_by_files() -> list[Path]:
    """Each used-by module's file, or every file of it when it is a package (export)."""
    return [
        path
        for name in USED_BY
        for path in (
            [PACKAGE / f"{name}.py"] if (PACKAGE / f"{name}.py").exists() else sorted((PACKAGE / name).glob("*.py"))
        )
    ]


def test_used_by_code_imports_nothing_from_the_training_package():
    """peft and bitsandbytes may be imported where a LoRA or 4-bit model is loaded; the trainer never."""
    files = _used_by_files()
    assert len(files) > len(USED_BY) and all(path.exists() for path in files)
    assert not _offenders(files, ("rice_mllm.train",))


def test_model_code_list_covers_every_model_module():
    listed = {path.name for path in MODEL_CODE if path.parent.name == "pretrain"}
    assert {"modeling.py", "clusters.py", "region_data.py", "region_head.py", "losses.py"} <= listed


def test_used_by_paths_load_nothing_of_training():
    """Imported in a fresh interpreter: what chat and eval pull in, transitively, must not include training code."""
    imports = "; ".join(f"import rice_mllm.{name}" for name in USED_BY)
    training = ("rice_mllm.train", "peft", "deepspeed")
    probe = f"import sys; {imports}; print(sorted(m for m in sys.modules if m.startswith({training!r})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_scanner_resolves_relative_imports():
    """The scan must catch `from ..train import x` written inside the package, not only absolute imports."""
    names = _imported_modules("from ..train import stages\nfrom . import anyres\nimport peft\n", "rice_mllm.mllm")
    assert names == ["rice_mllm.train", "rice_mllm.mllm", "peft"]
