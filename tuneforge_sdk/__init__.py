"""The Python client of the Tuneforge HTTP API: httpx and the standard library only (no torch, no server code).

    from tuneforge_sdk import Tuneforge

    with Tuneforge() as tf:  # TUNEFORGE_URL / TUNEFORGE_API_KEY, or the embedded default's key file
        file = tf.upload_file("train.jsonl")
        job = tf.create_job({"base_model": "smollm2-135m-instruct", "dataset": file["id"]})
        for event in tf.follow_events(job["id"]):
            print(event["message"])
        folder = tf.download_adapter(job["id"], "adapters/")  # every file checked against its sha256

`client` holds Tuneforge, `errors` the TuneforgeError family, `archive` the checks of a downloaded folder.
"""

from tuneforge_sdk.archive import verify_folder
from tuneforge_sdk.client import DEFAULT_URL, TERMINAL_STATUSES, Tuneforge
from tuneforge_sdk.errors import APIConnectionError, ChecksumMismatch, TuneforgeError

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "ChecksumMismatch",
    "Tuneforge",
    "TuneforgeError",
    "verify_folder",
]
