--[[
  Acknowledge finished tasks and give the lease up at once (graceful stop, or a fair yield).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash
    KEYS[5]      ready sorted set of the shard
    ARGV[1]      lease token
    ARGV[2]      stream name
    ARGV[3]      number of acknowledged task ids k
    ARGV[4]      number of taken tasks the holder never started (at the tail of in-flight)
    ARGV[5]      wake-up channel
    ARGV[6]      shard number
    ARGV[7]      '1' for a hand-off (stop, yield, defer), '0' after an error: the tasks left in
                 flight may have run, so their delivery counts stand
    ARGV[8..]    k task ids, oldest first

  Output:
    -1 if the caller's lease is gone (nothing changed), 1 when released

  Never-started tasks go back to the head of pending, in order, so the next holder takes them
  as first deliveries. A task handed out more than once stays in flight so its count is kept.
  A hand-off is not a crash: the tasks this holder was handed and leaves in flight get their
  delivery count back, so graceful stops never push a healthy task towards "poison".
]]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local nack = tonumber(ARGV[3])
if not ack_head(KEYS[3], KEYS[4], argv_slice(8, nack)) then
  return redis.error_reply('ERR pyfiq: acknowledged tasks are not at the head of the in-flight list')
end
local handed = handed_after(KEYS[4], nack)
local unstarted = tonumber(ARGV[4])
if unstarted > handed or handed ~= redis.call('LLEN', KEYS[3]) then unstarted = 0 end
local moved = 0
for _ = 1, unstarted do
  local entry = redis.call('LINDEX', KEYS[3], -1)
  if redis.call('HEXISTS', KEYS[4], 'd:' .. task_id(entry)) == 1 then break end
  redis.call('RPOP', KEYS[3])
  redis.call('LPUSH', KEYS[2], entry)
  moved = moved + 1
end
local kept = {}
if ARGV[7] == '1' and handed - moved > 0 then kept = redis.call('LRANGE', KEYS[3], 0, handed - moved - 1) end
for _, entry in ipairs(kept) do
  -- The next holder's hand-over adds one back (an absent count means one delivery).
  local field = 'd:' .. task_id(entry)
  redis.call('HSET', KEYS[4], field, tonumber(redis.call('HGET', KEYS[4], field) or '1') - 1)
end
redis.call('DEL', KEYS[1])
if redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[4])
else
  redis.call('HSET', KEYS[4], 'handed', 0)
end
if redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) > 0 then
  redis.call('ZADD', KEYS[5], now_ms(), ARGV[2])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
else
  redis.call('ZREM', KEYS[5], ARGV[2])
end
return 1
