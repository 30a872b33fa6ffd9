#!/usr/bin/env bash
# ferry-proxy under the shared rig's proxy contract: no discovery (destinations are original
# destinations), Istio's sidecar arguments.
exec env POD_NAME="bench-$MB_ROLE" POD_NAMESPACE=bench INSTANCE_IP="$MB_POD_IP" \
  "${FERRY_PROXY:-target/release/ferry-proxy}" proxy sidecar --no-kube \
  --concurrency "${MB_PROXY_WORKERS:-1}" --proxyLogLevel=warning
