#!/bin/sh
# A data node. It starts as a replica of the primary the sentinels name now; when no
# sentinel answers (the very first start) pod 0 is the primary. It announces its stable
# DNS name (the headless Service), which the sentinels resolve (resolve-hostnames).
set -eu
domain=llm-gateway-redis-headless
self="$POD_NAME.$domain"
primary=$(timeout 5 redis-cli -h llm-gateway-redis-sentinel -p 26379 --raw \
    sentinel get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)
[ -n "$primary" ] || primary=llm-gateway-redis-0.llm-gateway-redis-headless
set -- redis-server --dir /data --appendonly yes --appendfsync everysec --save "" \
    --maxmemory 768mb --maxmemory-policy noeviction \
    --min-replicas-to-write 1 --min-replicas-max-lag 10 \
    --replica-announce-ip "$self"
case "$primary" in
    "$self" | "$self".*) ;;
    *) set -- "$@" --replicaof "$primary" 6379 ;;
esac
exec "$@"
