"""Validate InferenceService documents offline against KServe's own CRD schema (crd/, see its README).

    python deploy/kserve/validate_crd.py FILE...   (YAML; documents of other kinds are skipped)

As strict as ``kubectl apply --validate=strict``: a field the schema does not define is an error
(the API server would drop it silently), so every object schema without
``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import jsonschema
import yaml

CRD = Path(__file__).resolve().parent / "crd" / "serving.kserve.io_inferenceservices.yaml"


def strict(schema: dict) -> dict:
    """The schema, with unknown fields refused wherever Kubernetes would prune them."""
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for child in schema.get(key, {}).values():
            strict(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for child in schema.get(key, []):
            strict(child)
    return schema


@cache
def validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> a validator of every version the CRD serves. OpenAPI v3 schemas are
    JSON Schema draft 4, give or take Kubernetes' x- extensions (ignored here)."""
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {(f"{group}/{version['name']}", kind): jsonschema.Draft4Validator(
                strict(version["schema"]["openAPIV3Schema"]))
            for version in crd["spec"]["versions"] if version.get("served")}


def problems(document: dict) -> list[str]:
    """What the CRD schema says is wrong with one InferenceService document (empty: valid)."""
    validator = validators()[(document.get("apiVersion"), document.get("kind"))]
    return [f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def main(paths: list[str]) -> int:
    failed = checked = 0
    for path in paths:
        for document in yaml.safe_load_all(Path(path).read_text()):
            if not document or (document.get("apiVersion"), document.get("kind")) not in validators():
                continue
            checked += 1
            name = f"{path}: {document['kind']} {document.get('metadata', {}).get('name')}"
            found = problems(document)
            failed += bool(found)
            print(f"{name}: " + ("; ".join(found) if found else f"valid against {CRD.name}"))
    if not checked:
        print("no InferenceService found in " + ", ".join(paths))
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
