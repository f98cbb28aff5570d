"""What a job reports and publishes besides its checkpoints: experiment tracking and the final model's
card and Hub repository.

TensorBoard needs no field: every training sub-stage writes event files under the job's S3 root
(`<root>/tensorboard/<stage>/`, see `dhad_api.layout.tensorboard_uri`). MLflow and Weights & Biases
are optional and reached through transformers' `report_to`, from rank 0 only. Credentials come from
Secrets: `secret_env_refs()` lists the env names the operator fills from them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from dhad_api.base import DhadModel
from dhad_api.common import SecretKeySelector, ShortText

TRACKING_URI = r"^(https?://[^@\s]+|file:/[^\s]*|databricks(://[^\s]*)?)$"
HUB_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
LICENSE_ID = r"^[a-z0-9][a-z0-9.+-]{0,63}$"

# Env names the operator fills from the Secrets below (also in common.RESERVED_ENV).
WANDB_API_KEY_ENV = "WANDB_API_KEY"
MLFLOW_TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
HUB_TOKEN_ENV = "DHAD_HUB_TOKEN"


class MLflowTracking(DhadModel):
    """An MLflow tracking server the training sub-stages log to."""

    tracking_uri: Annotated[str, StringConstraints(pattern=TRACKING_URI, max_length=1024)] = Field(
        description="trackingUri is the MLflow tracking server, http(s)://host[:port][/path], file:/path or databricks. Required."
    )
    experiment: ShortText | None = Field(
        None, description="experiment is the MLflow experiment name. Empty means the job's namespace/name."
    )
    token_secret_ref: SecretKeySelector | None = Field(
        None, description="tokenSecretRef is the Secret key with a bearer token for the server (MLFLOW_TRACKING_TOKEN). Empty means none."
    )


class WandbTracking(DhadModel):
    """A Weights & Biases project the training sub-stages log to."""

    project: ShortText = Field(description="project is the W&B project. Required.")
    entity: ShortText | None = Field(None, description="entity is the W&B team or user. Empty means the API key's default entity.")
    api_key_secret_ref: SecretKeySelector | None = Field(
        None,
        description="apiKeySecretRef is the Secret key with the W&B API key (WANDB_API_KEY). Empty means none "
        "(for example WANDB_MODE=offline in env).",
    )


class Tracking(DhadModel):
    """Experiment tracking besides the always-on TensorBoard event files."""

    mlflow: MLflowTracking | None = Field(None, description="mlflow logs metrics and parameters to an MLflow server. Empty means off.")
    wandb: WandbTracking | None = Field(None, description="wandb logs metrics to Weights & Biases. Empty means off.")

    def integrations(self) -> list[str]:
        """transformers `report_to` names, TensorBoard first."""
        return ["tensorboard"] + (["mlflow"] if self.mlflow else []) + (["wandb"] if self.wandb else [])


class HubPush(DhadModel):
    """A Hugging Face Hub repository the final model is pushed to."""

    repo_id: Annotated[str, StringConstraints(pattern=HUB_REPO_ID, max_length=193)] = Field(
        description="repoId is the model repository, org/name; it is created when missing. Required."
    )
    private: bool = Field(True, description="private creates the repository as private. Default true.")
    token_secret_ref: SecretKeySelector = Field(
        description="tokenSecretRef is the Secret key with a Hub token that may write the repository. Required."
    )


class Output(DhadModel):
    """What the final model says about itself and where it is published besides the job's bucket."""

    license: Annotated[str, StringConstraints(pattern=LICENSE_ID)] | None = Field(
        None,
        description="license is the model card's license (a Hub license id such as apache-2.0, llama2, other). "
        "Empty means the base model card's license.",
    )
    hub: HubPush | None = Field(None, description="hub pushes the final model and its card to the Hugging Face Hub. Empty means no push.")


def secret_env_refs(tracking: Tracking, output: Output) -> list[tuple[str, SecretKeySelector]]:
    """(env name, Secret key) for every tracking or publishing credential the trainer pods need."""
    refs: list[tuple[str, SecretKeySelector]] = []
    if tracking.mlflow and tracking.mlflow.token_secret_ref:
        refs.append((MLFLOW_TOKEN_ENV, tracking.mlflow.token_secret_ref))
    if tracking.wandb and tracking.wandb.api_key_secret_ref:
        refs.append((WANDB_API_KEY_ENV, tracking.wandb.api_key_secret_ref))
    if output.hub:
        refs.append((HUB_TOKEN_ENV, output.hub.token_secret_ref))
    return refs
