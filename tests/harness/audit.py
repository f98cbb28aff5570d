"""What a user did, read from the apiserver's audit log, held against the RBAC rules it is granted.

`calls` turns audit events into (apiGroup, resource[/subresource], verb) triples; `granted_rules`
collects, from the live cluster, every rule bound to a ServiceAccount (ClusterRoleBindings and
RoleBindings alike); `compare` says which granted verbs were never used and which calls were not
granted. Nothing here knows what the operator does: rerun the test after the operator changes and
the difference is the ClusterRole edit to make.

    python -m tests.harness.audit <audit.log> system:serviceaccount:<ns>:<name>   # prints the triples
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

Call = tuple[str, str, str]  # (apiGroup, "resource" or "resource/subresource", verb)


@dataclass(frozen=True)
class Event:
    call: Call
    namespace: str
    name: str
    code: int


def events(log: Path, username: str) -> list[Event]:
    """The resource requests (not discovery URLs) `username` made, in order, with response codes."""
    found = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef")
        if entry.get("user", {}).get("username") != username or not ref or not ref.get("resource"):
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        found.append(Event((ref.get("apiGroup", ""), resource, entry["verb"]), ref.get("namespace", ""), ref.get("name", ""),
                           (entry.get("responseStatus") or {}).get("code", 0)))
    return found


def calls(log: Path, username: str) -> Counter:
    return Counter(e.call for e in events(log, username))


def expand(rules: list[dict]) -> set[Call]:
    """RBAC rules as triples (no wildcards: the chart writes none)."""
    out = set()
    for rule in rules:
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    out.add((group, resource, verb))
    return out


def granted_rules(kube, namespace: str, service_account: str) -> list[dict]:
    """Every rule of every Role and ClusterRole bound to this ServiceAccount, read from the cluster."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(kube)

    def binds(binding) -> bool:
        return any(s.kind == "ServiceAccount" and s.name == service_account and s.namespace == namespace
                   for s in binding.subjects or [])

    rules = []
    for binding in rbac.list_cluster_role_binding().items:
        if binds(binding):
            rules += rbac.read_cluster_role(binding.role_ref.name).rules or []
    for binding in rbac.list_role_binding_for_all_namespaces().items:
        if binds(binding):
            ref, ns = binding.role_ref, binding.metadata.namespace
            role = rbac.read_cluster_role(ref.name) if ref.kind == "ClusterRole" else rbac.read_namespaced_role(ref.name, ns)
            rules += role.rules or []
    return [kube.sanitize_for_serialization(r) for r in rules]


def collapse(calls: set[Call], group: str, resources: set[str], label: str) -> set[Call]:
    """Counts a call on any of `resources` (and their subresources) as a call on all of them: for
    kinds the code handles alike, so a test that runs one kind speaks for every kind."""
    out = set()
    for g, resource, verb in calls:
        name, _, sub = resource.partition("/")
        out.add((g, label + (f"/{sub}" if sub else ""), verb) if g == group and name in resources else (g, resource, verb))
    return out


def compare(used: set[Call], granted: set[Call], checked_by_admission: set[Call] = frozenset()) -> dict[str, list[Call]]:
    """`unused`: granted, never called (and not needed by an admission check); `ungranted`: called
    without a rule (the apiserver answered 403)."""
    return {"unused": sorted(granted - used - set(checked_by_admission)), "ungranted": sorted(used - granted)}


def main(argv: list[str]) -> int:
    for call, count in sorted(calls(Path(argv[1]), argv[2]).items()):
        print(f"{count:6d}  {call[0] or 'core'} {call[1]} {call[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
