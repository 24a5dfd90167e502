--[[
  Acknowledge finished tasks and take the next ones, in one round trip (the hot path).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash ('handed': how many leading in-flight entries the holder has been
                 given; 'd:<id>': delivery count of a task handed out more than once)
    KEYS[5]      ready sorted set of the shard
    KEYS[6]      dead-letter list of the stream
    KEYS[7]      dead-letter index set of the shard
    ARGV[1]      lease token
    ARGV[2]      stream name
    ARGV[3]      number of acknowledged task ids k
    ARGV[4]      how many tasks to take at most (0: acknowledge only)
    ARGV[5]      max deliveries before a task counts as poison
    ARGV[6..]    k task ids, oldest first

  Output:
    { -1 }                       the caller's lease is gone: nothing was changed
    { 2 }                        acknowledged, nothing taken (ARGV[4] was 0)
    { 0 }                        the stream is empty: the lease was released and forgotten
    { 1, entry, deliveries, ...} the tasks handed over, in order (possibly none)

  In-flight entries an earlier holder left behind (it crashed or lost its lease) are handed
  over one at a time, each with its delivery count raised, so a task that kills its consumer
  is the only one whose count rises, and it is dead-lettered as poison past the limit.
  Entries past their deadline are dead-lettered as expired instead of being handed over.
]]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return { -1 } end
local nack = tonumber(ARGV[3])
if not ack_head(KEYS[3], KEYS[4], argv_slice(6, nack)) then
  return redis.error_reply('ERR pyfiq: acknowledged tasks are not at the head of the in-flight list')
end
local handed = handed_after(KEYS[4], nack)
local want = tonumber(ARGV[4])
if want == 0 then
  redis.call('HSET', KEYS[4], 'handed', handed)
  return { 2 }
end
local maxd = tonumber(ARGV[5])
local out = { 1 }
local now = nil

while #out == 1 do
  local entry = redis.call('LINDEX', KEYS[3], handed)
  if not entry then break end
  local id = task_id(entry)
  local deliveries = tonumber(redis.call('HGET', KEYS[4], 'd:' .. id) or '1') + 1
  if deliveries > maxd then
    now = now or now_ms()
    redis.call('LREM', KEYS[3], 1, entry)
    redis.call('HDEL', KEYS[4], 'd:' .. id)
    redis.call('RPUSH', KEYS[6], string.format(
      '{"reason":"poison","deliveries":%d,"at_ms":%.0f}\n', deliveries - 1, now) .. entry)
    redis.call('SADD', KEYS[7], ARGV[2])
  else
    redis.call('HSET', KEYS[4], 'd:' .. id, deliveries)
    handed = handed + 1
    out[#out + 1] = entry
    out[#out + 1] = deliveries
  end
end

if #out == 1 then
  while #out < 2 * want + 1 do
    local entry = redis.call('LPOP', KEYS[2])
    if not entry then break end
    local p1 = string.find(entry, '|', 34, true)
    local p2 = string.find(entry, '|', p1 + 1, true)
    local expires = tonumber(string.sub(entry, p1 + 1, p2 - 1))
    now = now or now_ms()
    if expires > 0 and expires <= now then
      redis.call('RPUSH', KEYS[6], string.format(
        '{"reason":"expired","deliveries":0,"at_ms":%.0f}\n', now) .. entry)
      redis.call('SADD', KEYS[7], ARGV[2])
    else
      redis.call('RPUSH', KEYS[3], entry)
      handed = handed + 1
      out[#out + 1] = entry
      out[#out + 1] = 1
    end
  end
end

if #out == 1 and redis.call('LLEN', KEYS[3]) == 0 then
  -- Nothing left anywhere: forget the stream so idle streams leave no keys behind.
  redis.call('DEL', KEYS[1], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[2])
  return { 0 }
end
redis.call('HSET', KEYS[4], 'handed', handed)
return out
