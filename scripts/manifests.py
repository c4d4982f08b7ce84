"""The rendered install (manifests/dask-gateway-rs.yaml, `helm template` of the chart with its
default values) as Python objects, for the test and benchmark harnesses that install pieces of
it by hand: the CRD once, and the gateway's ServiceAccount, Role and RoleBinding per namespace.
"""

from pathlib import Path

import yaml

RENDERED = Path(__file__).resolve().parents[1] / "manifests" / "dask-gateway-rs.yaml"
SERVICE_ACCOUNT = "dask-gateway-rs"


def documents():
    return [d for d in yaml.safe_load_all(RENDERED.read_text()) if d]


def crd():
    """The DaskCluster CustomResourceDefinition."""
    [crd] = [d for d in documents() if d["kind"] == "CustomResourceDefinition"]
    return crd


def gateway_rbac(namespace):
    """The chart's ServiceAccount, Role and RoleBinding, moved to `namespace`."""
    out = []
    for d in documents():
        if d["kind"] not in ("ServiceAccount", "Role", "RoleBinding"):
            continue
        d["metadata"]["namespace"] = namespace
        for subject in d.get("subjects", []):
            subject["namespace"] = namespace
        out.append(d)
    return out
