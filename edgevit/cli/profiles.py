"""``edgevit profiles``: device profiles found in the profiles directory."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


def profiles() -> None:
    """List the device profiles (profiles/*.yaml)."""
    found = sorted(PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []
    console = Console()
    if not found:
        console.print(f"no device profiles yet (looked in {PROFILES_DIR})")
        return
    for p in found:
        console.print(p.stem)
