--[[
  Where one task of a stream is now, read in one call and changing nothing: succeeded (its
  stored result, for a store_result function), dead-lettered (its record's header), in flight (handed to a holder or about to be again), pending (its place),
  or none of these.

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash of the stream
    KEYS[5]      dead letters of the stream
    KEYS[6]      dead letter ids of the stream
    KEYS[7]      prefix of the stream's stored results (see take.lua)
    KEYS[8]      delayed tasks of the stream (see enqueue.lua)
    ARGV[1]      task id
    ARGV[2]      how many pending entries, and then delayed ones, to look through at most (the
                 scans are O(place))

  Output:
    { 'dead', header }                 the task's dead-letter record header (JSON)
    { 'result', value }                the task succeeded and its result is stored
    { 'inflight', index, handed, started ms or '', deliveries, running id or '', lease or '', now,
      attempt or '' }                  attempt: "<attempt>:<ms of the next, 0 while one runs>",
                                       for the running task when its holder retries it
                                       index: 0-based in the in-flight list; handed: how many
                                       leading entries the holder was given
    { 'pending', place, deliveries }   place: how many tasks of the stream are ahead of it,
                                       in flight included
    { 'scheduled', due ms, now }       delayed: it joins the stream at its due time (Redis ms);
                                       once due it is 'pending', behind the stream's tasks
    { 'none', 1, 'deleted' }           an operator deleted it while it was pending (a day ago at most)
    { 'none', complete }               not found: complete = 1 when the whole pending list and
                                       every delayed task were looked through, 0 when either is
                                       longer than ARGV[2]
]]
local lease = KEYS[1]
local pending = KEYS[2]
local inflight = KEYS[3]
local meta = KEYS[4]
local dead = KEYS[5]
local dead_ids = KEYS[6]
local results = KEYS[7]
local later = KEYS[8]
local id = ARGV[1]
-- A dead letter is the last word on its task until it is requeued (which forgets its id).
local seq = redis.call('HGET', dead_ids, id)
if seq then
  local record = redis.call('ZRANGEBYSCORE', dead, seq, seq, 'LIMIT', 0, 1)[1]
  if record then
    local newline = string.find(record, '\n', 1, true)
    return { 'dead', newline and string.sub(record, 1, newline - 1) or record }
  end
end
local value = redis.call('GET', results .. id)
if value then return { 'result', value } end
if redis.call('EXISTS', results .. id .. '#deleted') == 1 then return { 'none', 1, 'deleted' } end
local flying = redis.call('LRANGE', inflight, 0, -1)
for i, entry in ipairs(flying) do
  if task_id(entry) == id then
    local marks = redis.call('HMGET', meta, 'handed', 's:' .. id, 'd:' .. id, 'running', 'attempt')
    return { 'inflight', i - 1, tonumber(marks[1] or '0'), marks[2] or '', tonumber(marks[3] or '1'),
             marks[4] or '', redis.call('GET', lease) or '', now_ms(), marks[5] or '' }
  end
end
local limit = tonumber(ARGV[2])
local total = redis.call('LLEN', pending)
local page = 500
local from = 0
while from < total and from < limit do
  local upto = math.min(from + page, limit, total) - 1
  local entries = redis.call('LRANGE', pending, from, upto)
  for i, entry in ipairs(entries) do
    if task_id(entry) == id then
      return { 'pending', #flying + from + i - 1, tonumber(redis.call('HGET', meta, 'd:' .. id) or '0') }
    end
  end
  from = upto + 1
end
local waiting = redis.call('ZCARD', later)
local now = now_ms()
from = 0
while from < waiting and from < limit do
  local upto = math.min(from + page, limit, waiting) - 1
  local members = redis.call('ZRANGE', later, from, upto, 'WITHSCORES')
  for i = 1, #members, 2 do
    -- "<seq>|<entry>": the entry, hence its id, starts after the seq and its bar.
    if string.sub(members[i], SEQ_DIGITS + 2, SEQ_DIGITS + 1 + ID_LENGTH) == id then
      if tonumber(members[i + 1]) <= now then
        -- Due: it has joined the stream, behind what it holds, whatever has moved it there yet.
        return { 'pending', #flying + total + from + (i - 1) / 2, 0 }
      end
      return { 'scheduled', members[i + 1], now }
    end
  end
  from = upto + 1
end
return { 'none', (total <= limit and waiting <= limit) and 1 or 0 }
