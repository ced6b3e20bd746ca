"""/v1/models: the base models this deployment can fine-tune."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerTeam, SettingsDep
from api.schemas import ModelList, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(settings: SettingsDep, team: CallerTeam) -> ModelList:
    """Lists the model registry."""
    registry = settings.model_registry()
    return ModelList(
        data=[
            ModelOut(id=name, description=entry.description, location=entry.location)
            for name, entry in sorted(registry.items())
        ]
    )
