--[[
  Take the lease of a claimable stream (SET NX PX semantics, fenced by a monotonic token).

  Input:
    KEYS[1]      queue index of the shard (queue -> earliest claimable-at)
    KEYS[2]      ready set of the stream's queue in this shard
    KEYS[3]      fencing epoch counter of the shard
    KEYS[4]      lease key of the stream
    KEYS[5]      meta hash of the stream (see keys.py)
    KEYS[6]      pending list of the stream
    KEYS[7]      in-flight list of the stream
    KEYS[8]      dead letters of the stream (sorted set)
    KEYS[9]      dead letter ids of the stream (hash)
    KEYS[10]     dead-letter index set of the shard
    KEYS[11]     paused queues and streams of the shard
    KEYS[12]     per-minute counts of finished tasks of the stream's queue in this shard
    KEYS[13]     prefix of the stream's stored results (see take.lua)
    KEYS[14]     delayed tasks of the stream (see enqueue.lua)
    KEYS[15]     the counter ordering delayed tasks
    ARGV[1]      stream name
    ARGV[2]      lease TTL in ms
    ARGV[3]      "<holder>/<random>": who holds the lease (for operators), and a unique part
    ARGV[4]      how many tasks to take at once (0: none; as take.lua)
    ARGV[5]      lost consumers after which a task is dead-lettered (max deliveries)

  Output:
    { 0 } when the stream is not claimable (not due, paused, or empty and now forgotten, or
      scored at its first delayed task's due time)
    { 0, ms } when it is claimable only in ms: its lease is held that much longer (another
      replica claimed it first, or it lapses within this millisecond), or its first delayed task
      falls due then: look again then
    { 1, token, fencing token, Redis ms, entry, deliveries, ... } on success: the lease and the
      first tasks, taken as take.lua would, so a claim costs one round trip

  The fencing token is max(previous + 1, Redis time in microseconds). It rises as long as the
  shard's counter survives; if the counter is lost (an empty restart, a failover that lost the
  write) it still rises provided the new server's clock is ahead of the lost tokens' time. The
  lease token is "<fencing token>:<nonce>" and scripts compare it whole, so two holders can
  never share one.
]]
local queues = KEYS[1]
local ready = KEYS[2]
local epoch = KEYS[3]
local lease = KEYS[4]
local meta = KEYS[5]
local pending = KEYS[6]
local inflight = KEYS[7]
local dead = KEYS[8]
local dead_ids = KEYS[9]
local dlq_index = KEYS[10]
local paused = KEYS[11]
local counts = KEYS[12]
local results = KEYS[13]
local later = KEYS[14]
local later_seq = KEYS[15]
local now = now_ms()
local r = { ready = ready, queues = queues, queue = queue_of(ARGV[1]) }
local score = redis.call('ZSCORE', ready, ARGV[1])
if not score or is_paused(paused, ARGV[1]) then return { 0 } end
score = tonumber(score)
if score > now then
  -- Claimed a moment ago by another replica (scored at its lease's expiry), or scored at a due
  -- time: the caller looks again then, so a holder that dies is taken over by those who lost.
  return { 0, score - now }
end
local ttl = tonumber(ARGV[2])
if redis.call('EXISTS', lease) == 1 then
  -- The holder renewed after its ready score was read as due: resynchronise the score.
  local left = redis.call('PTTL', lease)
  if left < 0 then left = ttl end
  ready_set(r, ARGV[1], now + left)
  return { 0, left }
end
-- Delayed tasks due by now join the stream first (a poll claims a stream at its first due time).
promote({ pending = pending, later = later, later_seq = later_seq }, now)
if redis.call('LLEN', pending) + redis.call('LLEN', inflight) == 0 then
  local due_at = rest(r, ARGV[1], later)
  redis.call('DEL', meta)
  if due_at then return { 0, due_at - now } end
  return { 0 }
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next_fence = tonumber(redis.call('GET', epoch) or '0') + 1
if next_fence < now_us then next_fence = now_us end
local fence = string.format('%.0f', next_fence)
redis.call('SET', epoch, fence)
local token = fence .. ':' .. ARGV[3]
redis.call('SET', lease, token, 'PX', ttl)
ready_set(r, ARGV[1], now + ttl)
-- Everything already in flight belongs to an earlier holder: hand it out again one by one.
local out = { 1, token, fence, now }
local handed = 0
if tonumber(ARGV[4]) > 0 then
  handed = hand_out({ pending = pending, inflight = inflight, meta = meta, dead = dead, dead_ids = dead_ids,
                      dlq_index = dlq_index, stream = ARGV[1], counts = counts, results = results }, 0,
                    tonumber(ARGV[4]), tonumber(ARGV[5]), now, out)
  if #out == 4 and redis.call('LLEN', inflight) == 0 then
    -- Everything pending was dead-lettered (expired, undecodable): nothing to hold.
    redis.call('DEL', lease, meta)
    local due_at = rest(r, ARGV[1], later)
    if due_at then return { 0, due_at - now } end
    return { 0 }
  end
end
redis.call('HSET', meta, 'handed', handed)
-- What an operator's action or a renewal said of an earlier holder is not about this one.
redis.call('HDEL', meta, 'running', 'attempt', 'skipped', 'halted')
return out
