--[[
  Record a worker's heartbeat in the replica registry, and forget a few long-silent replicas
  (a crashed process never says goodbye), so the registry stays small without a scan.

  Input:
    KEYS[1]      the replica registry (hash: replica id -> JSON)
    ARGV[1]      replica id
    ARGV[2]      what the replica says of itself (a JSON object)
    ARGV[3]      ms of silence after which a replica is forgotten

  Output:
    1
]]
local replicas = KEYS[1]
local now = now_ms()
redis.call('HSET', replicas, ARGV[1], string.sub(ARGV[2], 1, -2) .. string.format(',"seen_ms":%.0f}', now))
local forget = tonumber(ARGV[3])
for _, id in ipairs(redis.call('HRANDFIELD', replicas, 3)) do
  local seen = string.match(redis.call('HGET', replicas, id) or '', '"seen_ms":(%d+)')
  if not seen or now - tonumber(seen) > forget then redis.call('HDEL', replicas, id) end
end
return 1
