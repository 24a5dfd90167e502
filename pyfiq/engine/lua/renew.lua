--[[
  Extend a lease the caller still holds (heartbeat).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      ready set of the stream's queue in this shard
    KEYS[3]      queue index of the shard
    ARGV[1]      lease token
    ARGV[2]      lease TTL in ms
    ARGV[3]      stream name

  Output:
    1 if renewed, 0 if the lease is gone or held by someone else (the caller is fenced)
]]
local lease = KEYS[1]
local ready = KEYS[2]
local queues = KEYS[3]
if redis.call('GET', lease) ~= ARGV[1] then return 0 end
local now = now_ms()
redis.call('PEXPIRE', lease, ARGV[2])
ready_set({ ready = ready, queues = queues, queue = queue_of(ARGV[3]) }, ARGV[3], now + tonumber(ARGV[2]), 'XX')
return 1
