"""The library never imports training code: model packages must stay usable without deepspeed, peft or train/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rice_mllm"
MODEL_CODE = [
    *sorted((PACKAGE / "vision").glob("*.py")),
    *sorted((PACKAGE / "mllm").glob("*.py")),
    *sorted((PACKAGE / "pretrain").glob("*.py")),
    PACKAGE / "loading.py",
]
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


def test_model_code_imports_no_training_code():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in MODEL_CODE
        if path.exists()
        for name in _imported_modules(path.read_text(), ".".join(path.relative_to(PACKAGE.parent).parts[:-1]))
        if name.split(".")[0] in FORBIDDEN or name.startswith(FORBIDDEN)
    ]
    assert not offenders, offenders
    assert any(path.exists() for path in MODEL_CODE)


def test_scanner_resolves_relative_imports():
    """The scan must catch `from ..train import x` written inside the package, not only absolute imports."""
    names = _imported_modules("from ..train import stages\nfrom . import anyres\nimport peft\n", "rice_mllm.mllm")
    assert names == ["rice_mllm.train", "rice_mllm.mllm", "peft"]
