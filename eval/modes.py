"""How a policy acts, by name: the modes `eval closed-loop`, `data dagger`, `bench latency` and the study accept,
and the `Policy.act` arguments each stands for. A module of its own, so that a config can name them without
importing the simulator."""

from __future__ import annotations

from typing import Literal, get_args

from unified.errors import UnifiedError

# It reasons first and writes action tokens ("reason"), writes them without reasoning ("direct"), reads its
# continuous head without reasoning ("continuous") or after reasoning ("reason_continuous").
Mode = Literal["reason", "direct", "continuous", "reason_continuous"]
MODES: tuple[str, ...] = get_args(Mode)


def mode_flags(mode: str) -> dict[str, bool]:
    """The `Policy.act` arguments a mode stands for: {"reason": ..., "continuous": ...}."""
    if mode not in MODES:
        raise UnifiedError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    return {"reason": mode in ("reason", "reason_continuous"),
            "continuous": mode in ("continuous", "reason_continuous")}
