import pytest
from pydantic import ValidationError

from shared.settings import ModelEntry, Settings


def test_embedded_defaults_live_under_home(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'tuneforge.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.storage_root == tmp_path / "storage"
    assert settings.model_registry_file == tmp_path / "models.yaml"


PRODUCTION = {
    "environment": "production",
    "database_url": "postgresql://u@db/tuneforge",
    "broker_url": "redis://redis:6379/0",
    "storage_backend": "s3",
    "s3_access_key_id": "key",
    "s3_secret_access_key": "a-real-secret",
    "secret_key": "another-real-secret",
}


def test_production_accepts_real_settings(tmp_path):
    Settings(home=tmp_path, **PRODUCTION)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"secret_key": "dev-only-insecure-secret"}, "TUNEFORGE_SECRET_KEY"),
        ({"database_url": "sqlite:///x.db"}, "PostgreSQL"),
        ({"broker_url": "filesystem://"}, "Redis"),
        ({"s3_secret_access_key": "minioadmin"}, "default secret"),
    ],
)
def test_production_refuses_defaults(tmp_path, override, message):
    with pytest.raises(ValidationError, match=message):
        Settings(home=tmp_path, **{**PRODUCTION, **override})


def test_registry_file_and_inline_entries_merge(tmp_path):
    settings = Settings(home=tmp_path, models={"inline": {"location": "file:///models/inline"}})
    settings.add_model("stored", ModelEntry(location="s3://bucket/models/stored/", description="d"))
    registry = settings.model_registry()
    assert registry["stored"].location == "s3://bucket/models/stored"
    assert registry["inline"].location == "file:///models/inline"


def test_registry_refuses_unknown_schemes():
    with pytest.raises(ValidationError, match="s3:// or file://"):
        ModelEntry(location="http://example.com/model")
