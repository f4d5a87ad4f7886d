"""Compile the KFP v1 pipeline of the e2e tests with the real KFP SDK (kfp 1.8.22) into tests/fixtures/kfp/.

The compiled Workflow is kept in the repository, so tests and CI need no KFP SDK; run this again (in a virtualenv
with `pip install kfp==1.8.22`) after changing the pipeline:

    python hack/kfp/compile_pipeline.py

The pipeline: `produce` writes a file artifact and a message; `consume` reads the artifact and reports its sha256;
`stamp` reads it too and writes its sha256 and the time, with `max_cache_staleness: P0D` (always runs, still
recorded): on a second run it runs against the artifact a hit of `produce` wrote back. The
KFP API server stamps `pipelines.kubeflow.org/cache_enabled: "true"` on every template when a run is submitted; the
compiled file carries it too, as a submitted run's pods would.
"""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

import kfp  # type: ignore[import-not-found]
from kfp import components, dsl  # type: ignore[import-not-found]

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "kfp" / "produce-consume.yaml"

# Plain shell components (busybox image): KFP v1 passes file outputs as paths under /tmp/outputs/<name>/data.
PRODUCE = components.load_component_from_text(
    """
name: Produce
outputs:
- {name: data, type: String}
- {name: message, type: String}
implementation:
  container:
    image: busybox:1.36.1
    command:
    - sh
    - -ec
    - |
      mkdir -p "${0%/*}" "${1%/*}"
      printf 'payload written by produce\\n' > "$0"
      printf 'hello from produce' > "$1"
    - {outputPath: data}
    - {outputPath: message}
"""
)


def reading_data(name: str, *, output: str, command: str) -> Any:
    """A component that reads the `data` file artifact and writes one output: `command` runs with the input's path
    as $0 and the output's as $1 (whose directory exists by then)."""
    return components.load_component_from_text(
        f"""
name: {name}
inputs:
- {{name: data, type: String}}
outputs:
- {{name: {output}, type: String}}
implementation:
  container:
    image: busybox:1.36.1
    command:
    - sh
    - -ec
    - |
      mkdir -p "${{1%/*}}"
      {command}
    - {{inputPath: data}}
    - {{outputPath: {output}}}
"""
    )


CONSUME = reading_data("Consume", output="digest", command='''sha256sum "$0" | cut -d' ' -f1 | tr -d '\\n' > "$1"''')
STAMP = reading_data(
    "Stamp", output="stamped", command='''printf '%s at %s' "`sha256sum "$0" | cut -d' ' -f1`" "`date +%s%N`" > "$1"'''
)


@dsl.pipeline(name="produce-consume", description="stepcache's KFP v1 e2e pipeline")
def pipeline() -> None:
    produced = PRODUCE()
    CONSUME(data=produced.outputs["data"])
    stamp = STAMP(data=produced.outputs["data"])
    stamp.execution_options.caching_strategy.max_cache_staleness = "P0D"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    kfp.compiler.Compiler().compile(pipeline, str(OUT))
    workflow = yaml.safe_load(OUT.read_text())
    for template in workflow["spec"]["templates"]:
        if "container" in template:
            labels = template.setdefault("metadata", {}).setdefault("labels", {})
            labels["pipelines.kubeflow.org/cache_enabled"] = "true"
    header = f"# Compiled by hack/kfp/compile_pipeline.py with kfp {kfp.__version__}; do not edit by hand.\n"
    OUT.write_text(header + yaml.safe_dump(workflow, sort_keys=False))
    print(OUT)


if __name__ == "__main__":
    main()
