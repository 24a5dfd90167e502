--[[
  Take the lease of a claimable stream (SET NX PX semantics, fenced by a monotonic token).

  Input:
    KEYS[1]      ready sorted set of the shard
    KEYS[2]      fencing epoch counter of the shard
    KEYS[3]      lease key of the stream
    KEYS[4]      meta hash of the stream (field 'handed', fields 'd:<id>' delivery counts)
    KEYS[5]      pending list of the stream
    KEYS[6]      in-flight list of the stream
    KEYS[7]      dead-letter list of the stream
    KEYS[8]      dead-letter index set of the shard
    ARGV[1]      stream name
    ARGV[2]      lease TTL in ms
    ARGV[3]      random nonce of the caller
    ARGV[4]      how many tasks to take at once (0: none; as take.lua)
    ARGV[5]      max deliveries before a task counts as poison

  Output:
    { 0 } when the stream is not claimable (not due, or empty and now forgotten)
    { 0, ms } when its lease is still held for ms more (e.g. it lapses within this millisecond)
    { 1, token, fencing token, entry, deliveries, ... } on success: the lease and the first
      tasks, taken as take.lua would, so a claim costs one round trip

  The fencing token is max(previous + 1, Redis time in microseconds): it keeps rising even
  when a failover loses the counter. The lease token is "<fencing token>:<nonce>" and scripts compare it
  whole, so two holders can never share one.
]]
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > now then return { 0 } end
local ttl = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- The holder renewed after its ready score was read as due: resynchronise the score.
  local left = redis.call('PTTL', KEYS[3])
  if left < 0 then left = ttl end
  redis.call('ZADD', KEYS[1], now + left, ARGV[1])
  return { 0, left }
end
local npending = redis.call('LLEN', KEYS[5])
local ninflight = redis.call('LLEN', KEYS[6])
if npending + ninflight == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[4])
  return { 0 }
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
if epoch < now_us then epoch = now_us end
local fence = string.format('%.0f', epoch)
redis.call('SET', KEYS[2], fence)
local token = fence .. ':' .. ARGV[3]
redis.call('SET', KEYS[3], token, 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
-- Everything already in flight belongs to an earlier holder: hand it out again one by one.
local out = { 1, token, fence }
local handed = 0
if tonumber(ARGV[4]) > 0 then
  handed = hand_out({ pending = KEYS[5], inflight = KEYS[6], meta = KEYS[4], dlq = KEYS[7],
                      dlq_index = KEYS[8], stream = ARGV[1] }, 0, tonumber(ARGV[4]), tonumber(ARGV[5]), out)
  if #out == 3 and redis.call('LLEN', KEYS[6]) == 0 then
    -- Everything pending had expired: nothing to hold.
    redis.call('DEL', KEYS[3], KEYS[4])
    redis.call('ZREM', KEYS[1], ARGV[1])
    return { 0 }
  end
end
redis.call('HSET', KEYS[4], 'handed', handed)
return out
