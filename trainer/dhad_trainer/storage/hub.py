"""`output.hub`: the final model and its card pushed to a Hugging Face Hub repository.

huggingface_hub does the protocol (create_repo, preupload, LFS or Xet transfers, one commit); the
endpoint is HF_ENDPOINT (a self-hosted Hub, or the test server), the token comes from the Secret
`output.hub.tokenSecretRef` names, as DHAD_HUB_TOKEN, and is never logged. The launcher checks the
token with whoami before any training (`check_token`), so a wrong token fails in seconds, not after
the run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dhad_api.layout import MANIFEST
from dhad_api.outputs import HUB_TOKEN_ENV, HubPush

log = logging.getLogger(__name__)

SKIP = [MANIFEST, ".dhad-complete", "checkpoint-*/**"]


class HubError(Exception):
    """The Hub refused or could not take the push; the message names output.hub and never the token."""


def token(environ=os.environ) -> str | None:
    return environ.get(HUB_TOKEN_ENV) or environ.get("HF_TOKEN") or None


def _api(hub_token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=hub_token, library_name="dhad")


def _explain(error: Exception, hub: HubPush, what: str) -> HubError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    reason = {401: "the token was refused (output.hub.tokenSecretRef)",
              403: f"the token may not write {hub.repo_id} (output.hub.tokenSecretRef)"}.get(status, f"{type(error).__name__}: {error}")
    text = f"output.hub: {what} {hub.repo_id} failed: {reason}"
    secret = token()
    return HubError(text.replace(secret, "***") if secret else text)


def check_token(hub: HubPush) -> str:
    """The user the token belongs to; raises HubError when there is no token or the Hub refuses it."""
    hub_token = token()
    if not hub_token:
        raise HubError(f"output.hub: no token: {HUB_TOKEN_ENV} is unset (the operator fills it from output.hub.tokenSecretRef)")
    try:
        return _api(hub_token).whoami()["name"]
    except Exception as error:  # noqa: BLE001 - explained, token scrubbed
        raise _explain(error, hub, "checking the token for") from None


def push(folder: Path, hub: HubPush, message: str) -> str:
    """Creates the repository when missing and uploads `folder` as one commit; returns the commit URL."""
    hub_token = token()
    if not hub_token:
        raise HubError(f"output.hub: no token: {HUB_TOKEN_ENV} is unset")
    api = _api(hub_token)
    try:
        api.create_repo(hub.repo_id, repo_type="model", private=hub.private, exist_ok=True)
        commit = api.upload_folder(repo_id=hub.repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=message, ignore_patterns=SKIP)
    except Exception as error:  # noqa: BLE001 - explained, token scrubbed
        raise _explain(error, hub, "pushing to") from None
    log.info("pushed %s to the Hub: %s", folder, commit.commit_url)
    return commit.commit_url
