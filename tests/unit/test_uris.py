from pathlib import Path

import pytest

from shared.errors import InvalidRequest
from shared.settings import Settings
from shared.uris import resolve_dataset_uri


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path, storage_bucket="data-bucket", allowed_file_roots=[tmp_path / "datasets"])


def test_uploaded_file_id(settings):
    source = resolve_dataset_uri("file-" + "ab" * 12, settings, param="dataset", team_id="team-a")
    assert source.kind == "upload"
    assert source.file_id == "file-" + "ab" * 12


def test_s3_inside_allowed_bucket(settings):
    source = resolve_dataset_uri(
        "s3://data-bucket/teams/a/train.jsonl", settings, param="dataset", team_id="team-a"
    )
    assert (source.bucket, source.key) == ("data-bucket", "teams/a/train.jsonl")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://other-bucket/x.jsonl", "not allowed"),
        ("s3://data-bucket/", "names no object"),
        ("s3://data-bucket/a/../b.jsonl", "'..'"),
        ("http://169.254.169.254/latest", "http(s) datasets are disabled"),
        ("ftp://host/data.jsonl", "unsupported URI scheme 'ftp'"),
        ("train.jsonl", "neither an uploaded file id"),
        ("org/colors", "takes nothing from the Hub (TUNEFORGE_HUB_ALLOWLIST is empty); upload the dataset"),
    ],
)
def test_refusals_name_the_field(settings, uri, message):
    with pytest.raises(InvalidRequest) as info:
        resolve_dataset_uri(uri, settings, param="validation_dataset", team_id="team-a")
    assert message in info.value.message
    assert info.value.param == "validation_dataset"


def test_file_uris_only_under_allowed_roots(settings, tmp_path):
    inside = tmp_path / "datasets" / "train.jsonl"
    assert resolve_dataset_uri(f"file://{inside}", settings, param="dataset", team_id="team-a").path == inside
    with pytest.raises(InvalidRequest, match="outside the allowed"):
        resolve_dataset_uri("file:///etc/passwd", settings, param="dataset", team_id="team-a")
    with pytest.raises(InvalidRequest, match=r"'\.\.'"):
        resolve_dataset_uri(
            f"file://{tmp_path}/datasets/../secret.jsonl", settings, param="dataset", team_id="team-a"
        )


def test_file_uris_disabled_without_roots(tmp_path):
    settings = Settings(home=tmp_path)
    with pytest.raises(InvalidRequest, match="disabled"):
        resolve_dataset_uri(f"file://{Path('/tmp/x.jsonl')}", settings, param="dataset", team_id="team-a")


def test_the_deployments_own_bucket_is_partitioned_by_team(tmp_path):
    settings = Settings(home=tmp_path, storage_bucket="tf")
    own = resolve_dataset_uri(
        "s3://tf/files/team-a/file-1/d.jsonl", settings, param="dataset", team_id="team-a"
    )
    assert own.key == "files/team-a/file-1/d.jsonl"
    assert (
        resolve_dataset_uri("s3://tf/shared/d.jsonl", settings, param="dataset", team_id="team-a").bucket
        == "tf"
    )
    for key in (
        "files/team-b/file-1/d.jsonl",
        "artifacts/team-b/ftjob-1/attempt-1/adapter/x",
        "models/m/config.json",
    ):
        with pytest.raises(InvalidRequest) as info:
            resolve_dataset_uri(f"s3://tf/{key}", settings, param="dataset", team_id="team-a")
        assert info.value.param == "dataset"
