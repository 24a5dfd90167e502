--[[
  Dead-letter the head task of a stream as 'operator' (a blocked head: a task retried forever,
  or one that keeps outliving its lease), so the stream moves on. The head is the task a live
  holder said it runs at its last renewal ('running' in meta: in flight behind it may be tasks it
  finished and has not acknowledged yet), else the first task in flight, or the first pending
  one when none is.

  A stream nobody holds is claimable at once. A held one has its lease revoked: its value
  becomes '!' .. token, so every call of the holder is refused (which ends its retries of the
  head), yet nobody else may claim the stream until that holder lets go (a release under
  '!' .. token, once it runs nothing of the stream but the skipped task) or, if it died, the
  revocation lapses with the lease's TTL. So tasks it took ahead never run on two replicas at
  once. The holder is told at once on the wake-up channel ('h' .. shard: renew now).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash
    KEYS[5]      ready set of the stream's queue in this shard
    KEYS[6]      queue index of the shard
    KEYS[7]      dead letters of the stream
    KEYS[8]      dead letter ids of the stream
    KEYS[9]      dead-letter index set of the shard
    KEYS[10]     per-minute counts of finished tasks of the stream's queue in this shard
    KEYS[11]     prefix of the stream's stored results (a result() waiter hears of the skip)
    KEYS[12]     delayed tasks of the stream (those due join it first: one may be the head)
    KEYS[13]     the counter ordering delayed tasks
    ARGV[1]      stream name
    ARGV[2]      dead-letter record header (a JSON object on one line)
    ARGV[3]      wake-up channel
    ARGV[4]      shard number

  Output:
    { 0 } when the stream holds no task; { 1, entry } with the entry dead-lettered (and the
    stream claimable); { 2, entry } the same, the lease revoked and its holder told
]]
local lease = KEYS[1]
local pending = KEYS[2]
local inflight = KEYS[3]
local meta = KEYS[4]
local ready = KEYS[5]
local queues = KEYS[6]
local dead = KEYS[7]
local dead_ids = KEYS[8]
local dlq_index = KEYS[9]
local counts = KEYS[10]
local results = KEYS[11]
local later = KEYS[12]
local later_seq = KEYS[13]
-- A delayed task joins its stream at its due time, whether or not anything has moved it yet.
promote({ pending = pending, later = later, later_seq = later_seq }, now_ms())
local held = redis.call('GET', lease)
local source = inflight
local entry = nil
local running = held and redis.call('HGET', meta, 'running')
if running then
  for _, e in ipairs(redis.call('LRANGE', inflight, 0, -1)) do
    if task_id(e) == running then entry = e break end
  end
end
if entry then
  redis.call('LREM', inflight, 1, entry)
  redis.call('HDEL', meta, 'running', 'attempt')
else
  entry = redis.call('LINDEX', inflight, 0)
  if not entry then
    source = pending
    entry = redis.call('LINDEX', pending, 0)
  end
  if not entry then return { 0 } end
  redis.call('LPOP', source)
end
local id = parse_entry(entry)
if id then clear_marks(meta, id) end
dead_add({ dead = dead, dead_ids = dead_ids, dlq_index = dlq_index, stream = ARGV[1], counts = counts, results = results },
         ARGV[2], entry, id)
if held then
  if source == inflight then
    -- The holder was handed this entry: its count of leading in-flight entries shrinks by it.
    local handed = tonumber(redis.call('HGET', meta, 'handed') or '0') - 1
    if handed < 0 then handed = 0 end
    redis.call('HSET', meta, 'handed', handed)
  end
  if string.sub(held, 1, 1) ~= '!' then
    redis.call('SET', lease, '!' .. held, 'KEEPTTL')
  end
  -- Every task skipped under this lease: its holder lets go at once if it runs one of them.
  local skipped = redis.call('HGET', meta, 'skipped')
  redis.call('HSET', meta, 'skipped', (skipped and (skipped .. ' ') or '') .. (id or ''))
  local left = redis.call('PTTL', lease)
  if left < 0 then left = 0 end
  ready_set({ ready = ready, queues = queues, queue = queue_of(ARGV[1]) }, ARGV[1], now_ms() + left)
  wake(ARGV[3], 'h' .. ARGV[4])
  return { 2, entry }
end
give_up_lease({ lease = lease, pending = pending, inflight = inflight, later = later, meta = meta, ready = ready,
                queues = queues, stream = ARGV[1], channel = ARGV[3], shard = ARGV[4] }, 0)
return { 1, entry }
