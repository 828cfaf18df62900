#!/bin/sh
# A sentinel. Sentinel rewrites its own config file, so it is written to a writable
# volume at each start; it monitors the primary the other sentinels name now, else
# pod 0 of the data nodes (the very first start).
set -eu
self="$POD_NAME.llm-gateway-redis-sentinel-headless"
primary=$(timeout 5 redis-cli -h llm-gateway-redis-sentinel -p 26379 --raw \
    sentinel get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)
[ -n "$primary" ] || primary=llm-gateway-redis-0.llm-gateway-redis-headless
cat >/conf/sentinel.conf <<CONF
port 26379
dir /conf
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $self
sentinel monitor mymaster $primary 6379 2
sentinel down-after-milliseconds mymaster 5000
sentinel failover-timeout mymaster 60000
sentinel parallel-syncs mymaster 1
CONF
exec redis-server /conf/sentinel.conf --sentinel
