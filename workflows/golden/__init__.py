"""The committed reference renderings: these settings, rendered, must equal the YAML files beside them
(tests/workflows/test_builder.py); `python workflows/submit.py --regenerate-golden` rewrites them after an intended
change."""

from __future__ import annotations

from pathlib import Path

from workflows import builder as rw

GOLDEN_DIR = Path(__file__).resolve().parent
GOLDEN_IMAGE = "registry.example.com/rethink:0.1.0"
GOLDEN = {
    "smoke": rw.Settings(suite="smoke", profile="local", synthetic=True, image=GOLDEN_IMAGE),
    "table1": rw.Settings(suite="table1", profile="gpu", image=GOLDEN_IMAGE),
    "full": rw.Settings(suite="full", profile="spot", image=GOLDEN_IMAGE),
    # spot, then on-demand from the third retry on (--on-demand-after 3): the training template's podSpecPatch
    "fig2b-fallback": rw.Settings(suite="fig2b", profile="spot", image=GOLDEN_IMAGE, on_demand_after=3),
}


def render_golden(directory: Path | None = None) -> list[Path]:
    """Write every golden workflow as YAML into `directory` (default: this folder)."""
    directory = directory or GOLDEN_DIR
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, settings in GOLDEN.items():
        path = directory / f"{name}.yaml"
        path.write_text(rw.build_workflow(settings).to_yaml())
        written.append(path)
    return written
