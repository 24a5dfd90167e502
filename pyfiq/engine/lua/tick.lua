--[[
  Fire a periodic schedule's tick: move the schedule's last tick from what the caller last heard
  to the tick now due and enqueue that tick's task, in one step, so that of every replica asking
  for the same move exactly one succeeds (see pyfiq/engine/ticks.py).

  Input:
    KEYS[1]      the schedule's record (hash: last, version, rule, stream, next, task, at, by,
                 fired, skipped)
    KEYS[2]      the record as an operator's forget left it (expires): its last tick still counts
    KEYS[3]      the names of the shard's schedules
    KEYS[4]      pending list of the schedule's stream
    KEYS[5]      ready set of the stream's queue in this shard
    KEYS[6]      queue index of the shard
    KEYS[7]      layout key of the shard
    KEYS[8]      delayed tasks of the stream
    KEYS[9]      the counter ordering delayed tasks
    KEYS[10]     lease key of the stream
    KEYS[11]     paused queues and streams of the shard
    ARGV[1]      schedule name
    ARGV[2]      stream name
    ARGV[3]      wake-up channel
    ARGV[4]      shard number
    ARGV[5]      the caller's shard count
    ARGV[6]      the caller's version of the schedule
    ARGV[7]      the caller's rule, as text (shown to operators)
    ARGV[8]      expected last tick: the stored one as the caller heard it, '' for no record,
                 '?' to read only (and register a newer version)
    ARGV[9]      the new last tick (Redis ms)
    ARGV[10]     the tick after it by the caller's rule (shown to operators)
    ARGV[11]     the caller's replica id
    ARGV[12]     number of tasks n (one per tick fired; 0 moves last only)
    ARGV[13..]   n triples: task id, expires-in ms (0: never), payload

  Output:
    { status, Redis ms now, stored last tick or '', stored version }
    status: 'state' (read only), 'fired' (moved, tasks enqueued), 'paused' (moved, the stream or
    its queue is paused: the ticks are skipped, nothing enqueued), 'moved' (the stored last
    tick is not the expected one: another replica fired it, nothing changed), 'early' (the new
    last tick is ahead of Redis's clock: nothing changed), 'superseded' (a replica with a newer
    version of the schedule ran: nothing changed).
]]
local record = KEYS[1]
local forgotten = KEYS[2]
local schedules = KEYS[3]
local pending = KEYS[4]
local ready = KEYS[5]
local queues = KEYS[6]
local layout = KEYS[7]
local later = KEYS[8]
local later_seq = KEYS[9]
local lease = KEYS[10]
local paused = KEYS[11]
local refused = check_layout(layout, ARGV[5])
if refused then return refused end
local now = now_ms()
local stored = redis.call('HMGET', record, 'last', 'version')
local last = stored[1] or ''
local version = tonumber(stored[2] or '0')
-- A forgotten record's last tick stands until its copy expires: a replica that starts meanwhile
-- must not take the tick that fired just before the forget for one still owed (its version and
-- rule are forgotten).
if last == '' then last = redis.call('HGET', forgotten, 'last') or '' end
local mine = tonumber(ARGV[6])
if version > mine then return { 'superseded', now, last, version } end
if ARGV[8] == '?' then
  -- A newer definition stands the older ones down from the moment a replica running it looks.
  if last ~= '' and mine > version then
    redis.call('HSET', record, 'version', ARGV[6], 'rule', ARGV[7])
    version = mine
  end
  return { 'state', now, last, version }
end
if last ~= ARGV[8] then return { 'moved', now, last, version } end
local new_last = tonumber(ARGV[9])
if new_last > now then return { 'early', now, last, version } end
local n = tonumber(ARGV[12])
redis.call('SADD', schedules, ARGV[1])
redis.call('HSET', record, 'last', ARGV[9], 'version', ARGV[6], 'rule', ARGV[7], 'stream', ARGV[2],
           'next', ARGV[10])
if n == 0 then return { 'fired', now, ARGV[9], mine } end
if is_paused(paused, ARGV[2]) then
  -- The last tick enqueued nothing: the task of an earlier one is not its task.
  redis.call('HDEL', record, 'task')
  redis.call('HINCRBY', record, 'skipped', n)
  return { 'paused', now, ARGV[9], mine }
end
local entries = {}
for i = 1, n do
  local base = 12 + (i - 1) * 3
  entries[i] = new_entry(ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3], now)
end
push({ pending = pending, later = later, later_seq = later_seq, lease = lease, ready = ready, queues = queues,
       stream = ARGV[2], channel = ARGV[3], shard = ARGV[4] }, entries, now)
redis.call('HSET', record, 'task', ARGV[12 + 3 * (n - 1) + 1], 'at', string.format('%.0f', now), 'by', ARGV[11])
redis.call('HINCRBY', record, 'fired', n)
return { 'fired', now, ARGV[9], mine }
