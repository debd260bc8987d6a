"""The layout trap of docs/design.md: `tokenizers/` must not shadow Hugging Face's `tokenizers` from the repo root."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_and_unified_tokenizers_import_from_repository_root():
    result = subprocess.run(
        [sys.executable, "-c", "import transformers, tokenizers, unified.tokenizers, unified.eval; "
         "print(tokenizers.__file__); print(unified.tokenizers.__path__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    hf_file, _ = result.stdout.splitlines()[:2]
    assert "site-packages" in hf_file  # Hugging Face's library, not the repository's folder


def test_no_init_in_tokenizers_folder():
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_console_script_is_installed():
    result = subprocess.run([Path(sys.executable).parent / "unified", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "data" in result.stdout


def test_the_repository_refers_to_nothing_outside_it():
    """Design notes live in docs/; no file points a reader at a file this repository does not have."""
    import re

    pattern = re.compile(r"\.\./shared|DESIGN\.md")
    skip = {".git", ".venv", "build", "runs", "__pycache__", ".pytest_cache", ".hypothesis"}
    found = []
    for path in ROOT.rglob("*"):
        if skip & set(path.relative_to(ROOT).parts) or not path.is_file() or path == Path(__file__).resolve():
            continue
        if path.suffix in (".py", ".md", ".toml", ".yaml", ".yml", ".json", ".cfg", ".txt", "") \
                and pattern.search(path.read_text(errors="ignore")):
            found.append(str(path.relative_to(ROOT)))
    assert found == []
    assert (ROOT / "docs" / "design.md").is_file()
