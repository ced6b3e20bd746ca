#!/bin/sh
# One-shot MinIO setup for docker-compose.yml (runs in the minio/mc image): creates the Tuneforge bucket and
# the MinIO user Tuneforge signs in as, with a policy that allows that bucket only. Safe to run again: every
# step leaves things as they are when they are already done.
set -eu

: "${MINIO_ENDPOINT:=http://minio:9000}"
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${TUNEFORGE_STORAGE_BUCKET:?}" "${TUNEFORGE_S3_ACCESS_KEY_ID:?}" "${TUNEFORGE_S3_SECRET_ACCESS_KEY:?}"

bucket="$TUNEFORGE_STORAGE_BUCKET"
user="$TUNEFORGE_S3_ACCESS_KEY_ID"

if [ "$user" = "$MINIO_ROOT_USER" ]; then
    echo "minio-init: TUNEFORGE_S3_ACCESS_KEY_ID must differ from MINIO_ROOT_USER (Tuneforge gets its own user)" >&2
    exit 1
fi

# The server passed its healthcheck already; a few retries cover a slow first start all the same.
tries=0
until mc alias set tuneforge-admin "$MINIO_ENDPOINT" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        echo "minio-init: cannot reach MinIO at $MINIO_ENDPOINT" >&2
        exit 1
    fi
    sleep 2
done

mc mb --ignore-existing "tuneforge-admin/$bucket"

policy_file=/tmp/tuneforge-bucket-policy.json
printf '%s\n' \
    '{' \
    '  "Version": "2012-10-17",' \
    '  "Statement": [' \
    '    {' \
    '      "Effect": "Allow",' \
    '      "Action": ["s3:*"],' \
    "      \"Resource\": [\"arn:aws:s3:::$bucket\", \"arn:aws:s3:::$bucket/*\"]" \
    '    }' \
    '  ]' \
    '}' > "$policy_file"

# `policy create` replaces a policy of the same name; `user add` of an existing user sets its secret.
mc admin policy create tuneforge-admin tuneforge-bucket "$policy_file"
mc admin user add tuneforge-admin "$user" "$TUNEFORGE_S3_SECRET_ACCESS_KEY"
if ! out=$(mc admin policy attach tuneforge-admin tuneforge-bucket --user "$user" 2>&1); then
    case "$out" in
        *already*) ;;
        *) echo "$out" >&2; exit 1 ;;
    esac
fi

echo "minio-init: bucket $bucket ready for user $user"
