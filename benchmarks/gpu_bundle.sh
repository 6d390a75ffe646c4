#!/usr/bin/env bash
# Pack the Python packages a bare GPU image lacks (Ray, MLflow and what they need) for its Python, so that
# benchmarks/gpu_check.sh can run `gan-pipeline train --gpu` there without network access.
# Wheels come from PyPI (run this where PyPI is reachable); the image's own torch, numpy, pyarrow, pandas,
# grpcio, aiohttp... are kept. Output: .gpusite/site.tar.xz (about 45 MB; ignored by git).
#   bash benchmarks/gpu_bundle.sh [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
WHEELS="$(mktemp -d)"; SITE="$(mktemp -d)"
trap 'rm -rf "$WHEELS" "$SITE"' EXIT
platforms=""
for p in manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms="$platforms --platform $p"
done
python3 -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp $platforms -d "$WHEELS" \
    "ray[default,train,tune]==2.60.0" "mlflow==3.17.2" pydantic
# Only what the image lacks (its package list: /work/.library/device/KINDS.md here).
need="ray mlflow mlflow_skinny mlflow_tracing pydantic pydantic_core annotated_types typing_inspection alembic mako
sqlalchemy jsonschema jsonschema_specifications referencing rpds_py tensorboardx cachetools databricks_sdk google_auth
pyasn1 pyasn1_modules fastapi starlette uvicorn gitpython gitdb smmap importlib_metadata opentelemetry_api
opentelemetry_proto opentelemetry_sdk opentelemetry_semantic_conventions python_dotenv sqlparse typing_extensions
annotated_doc cryptography cffi pycparser aiohttp_cors colorful opencensus opencensus_context
opentelemetry_exporter_prometheus smart_open platformdirs python_discovery google_api_core googleapis_common_protos
proto_plus"
for n in $need; do
  wheel=$(ls "$WHEELS" | awk -v n="$n" '{split($0, a, "-"); if (tolower(a[1]) == n) print}' | head -1)
  if [ -z "$wheel" ]; then echo "no wheel for $n" >&2; exit 1; fi
  unzip -q -o "$WHEELS/$wheel" -d "$SITE"
done
# Not used by the pipeline (and over the transfer limit): Ray's Java jars, RLlib, Serve, LLM; source maps.
rm -rf "$SITE/ray/jars" "$SITE/ray/rllib" "$SITE/ray/serve" "$SITE/ray/llm" "$SITE/mlflow/server/js"
find "$SITE" -name "*.map" -delete
mkdir -p .gpusite
tar -C "$SITE" -cf - . | xz -T0 -6 > .gpusite/site.tar.xz.tmp && mv .gpusite/site.tar.xz.tmp .gpusite/site.tar.xz
ls -la .gpusite/site.tar.xz
