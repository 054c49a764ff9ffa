"""The two ways submit.py reaches a cluster, behind one interface, and the one error they raise.

Like the argo CLI: the Kubernetes API with the user's kubeconfig (or a pod's service account) by default
(`workflows.kube`), or an Argo Server's REST API when one is named (`workflows.argo_server`). Either creates
the Workflow object and reads it back; what Argo then does with it is the same.
"""

from __future__ import annotations

from typing import Protocol


class ClusterError(Exception):
    """A cluster could not be reached or refused a request: one line saying what was wrong and what to do."""

    exit_code = 1


class Submitter(Protocol):
    """Creates Workflow objects in one namespace and reads them back."""

    namespace: str
    where: str  # for messages: "the Kubernetes API at https://... (context kind-rethink)"

    def create(self, workflow: dict) -> str:
        """Create the workflow (a Workflow object as a dict); its generated name."""
        ...

    def get(self, name: str) -> dict:
        """The Workflow object `name`, status included."""
        ...


def one_line(text: object, limit: int = 300) -> str:
    """A server's message squeezed onto one line and cut to `limit` characters."""
    squeezed = " ".join(str(text).split())
    return squeezed if len(squeezed) <= limit else squeezed[: limit - 3] + "..."
