"""The layout trap of DESIGN.md: `tokenizers/` must not shadow Hugging Face's `tokenizers` from the repo root."""

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
