--[[
  Move dead letters back to their stream's pending list (an operator action), in bounded
  steps: one call looks at no more than ARGV[5] records, found through the sorted set and the
  id index, never by reading the whole dead-letter set. The client pages with ARGV[6].

  Input:
    KEYS[1]      dead letters of the stream (sorted set by sequence)
    KEYS[2]      dead letter ids of the stream (hash: task id -> sequence)
    KEYS[3]      pending list
    KEYS[4]      ready set of the stream's queue in this shard
    KEYS[5]      queue index of the shard
    KEYS[6]      dead-letter index set of the shard
    KEYS[7]      delayed tasks of the stream (those due join ahead of tasks requeued to the back)
    KEYS[8]      the counter ordering delayed tasks
    KEYS[9]      lease key of the stream
    ARGV[1]      stream name
    ARGV[2]      wake-up channel
    ARGV[3]      shard number
    ARGV[4]      'front' to put them before pending work, 'back' to append them
    ARGV[5]      how many records to look at at most in this call
    ARGV[6]      lowest sequence to look at (a ZRANGEBYSCORE bound: '-inf', '12', '(12')
    ARGV[7]      highest sequence to look at (a bound, e.g. '+inf', '(40')
    ARGV[8]      a task id to move only that task ('' for any)

  Output:
    { moved, skipped, last sequence looked at (0 if none) }

  A requeued task starts afresh: its deadline is cleared, since it has passed for an expired
  one. A record whose task entry is malformed cannot run and stays a dead letter (skipped).
  'back' looks oldest first and appends; 'front' looks newest first and pushes each task to
  the head, so a client paging downwards ends with every page in order ahead of pending work.
]]
local dead = KEYS[1]
local dead_ids = KEYS[2]
local pending = KEYS[3]
local ready = KEYS[4]
local queues = KEYS[5]
local dlq_index = KEYS[6]
local later = KEYS[7]
local later_seq = KEYS[8]
local lease = KEYS[9]
local picked = {}
if ARGV[8] ~= '' then
  local seq = redis.call('HGET', dead_ids, ARGV[8])
  if seq then picked = redis.call('ZRANGEBYSCORE', dead, seq, seq, 'WITHSCORES') end
elseif ARGV[4] == 'front' then
  picked = redis.call('ZREVRANGEBYSCORE', dead, ARGV[7], ARGV[6], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
else
  picked = redis.call('ZRANGEBYSCORE', dead, ARGV[6], ARGV[7], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
end
local fresh = {}
local skipped = 0
local last = 0
for i = 1, #picked, 2 do
  local record = picked[i]
  last = tonumber(picked[i + 1])
  local cut = string.find(record, '\n', 1, true)
  local entry = cut and string.sub(record, cut + 1) or ''
  local id = parse_entry(entry)
  if id then
    local p2 = string.find(entry, '|', ID_LENGTH + 2, true)
    local p3 = string.find(entry, '|', p2 + 1, true)
    fresh[#fresh + 1] = string.sub(entry, 1, p2) .. '0' .. string.sub(entry, p3)
    redis.call('ZREM', dead, record)
    if redis.call('HGET', dead_ids, id) == picked[i + 1] then redis.call('HDEL', dead_ids, id) end
  else
    skipped = skipped + 1
  end
end
local now = now_ms()
local s = { pending = pending, later = later, later_seq = later_seq, lease = lease, ready = ready, queues = queues,
            stream = ARGV[1], channel = ARGV[2], shard = ARGV[3] }
if ARGV[4] == 'front' then
  for i = 1, #fresh do redis.call('LPUSH', pending, fresh[i]) end
  if #fresh > 0 then arrived(s, now, first_due(later) ~= nil) end
else
  push(s, fresh, now)
end
if redis.call('ZCARD', dead) == 0 then
  redis.call('SREM', dlq_index, ARGV[1])
  redis.call('DEL', dead_ids)
end
return { #fresh, skipped, last }
