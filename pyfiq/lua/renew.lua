--[[
  Extend a lease the caller still holds (heartbeat).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      ready sorted set of the shard
    ARGV[1]      lease token
    ARGV[2]      lease TTL in ms
    ARGV[3]      stream name

  Output:
    1 if renewed, 0 if the lease is gone or held by someone else (the caller is fenced)
]]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local now = now_ms()
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[3])
return 1
