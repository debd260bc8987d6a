"""unified: one autoregressive transformer that is a vision-language-action policy and a world model."""

import pkgutil

# tokenizers/ and eval/ are installed as unified.tokenizers and unified.eval through a package-dir
# mapping. Run from the repository root, this source folder is found before the installed package and
# does not hold those two, so the installed package's folder joins this one's search path.
__path__ = pkgutil.extend_path(__path__, __name__)

from unified.errors import UnifiedError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["UnifiedError", "__version__"]
